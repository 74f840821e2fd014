"""The store on a real SQLite file: submission is whole or absent, claims are exclusive,
results are written once, cancel and retry do what they say."""

from __future__ import annotations

import io
import json
import time

import pytest
from nightshift.jobs import migrations as migrations_module
from nightshift.jobs import settings
from nightshift.jobs.errors import InputError, NotFound
from nightshift.jobs.store import Store, spread_by_size
from nightshift.jobs.submit import JobOptions, parse_at, submit
from nightshift.jobs.vocabulary import Chunk, Recovered, Result


def lines(*objs) -> io.BytesIO:
    return io.BytesIO("".join(json.dumps(o) + "\n" for o in objs).encode())


def make_job(store, n=3, model="m", **kw):
    opts = JobOptions(model=model, **kw)
    return submit(store, lines(*[{"prompt": f"q{i}", "custom_id": f"c{i}"} for i in range(n)]),
                  "in.jsonl", opts, lambda m: m)


def test_submit_stores_job_and_requests(home):
    store = Store()
    job_id, n = make_job(store, 5, name="first")
    assert n == 5
    job = store.job(job_id)
    assert (job.total, job.name, job.model, job.state) == (5, "first", "m", "queued")
    assert job.counts == {"queued": 5}
    rows = list(store.iter_requests(job_id))
    assert [r.custom_id for r in rows] == [f"c{i}" for i in range(5)]
    assert [r.line_no for r in rows] == [1, 2, 3, 4, 5]
    assert (home / "nightshift.db").exists()


def test_bad_file_stores_nothing(home):
    store = Store()
    data = lines({"prompt": "ok"}, {"prompt": ""}, {"nope": 1})
    with pytest.raises(InputError) as err:
        submit(store, data, "bad.jsonl", JobOptions(model="m"), lambda m: m)
    assert err.value.problems[0].startswith("bad.jsonl:2: ")
    assert err.value.problems[1].startswith("bad.jsonl:3: ")
    assert store.list_jobs() == []


def test_empty_file_is_an_error(home):
    with pytest.raises(InputError, match="no requests"):
        submit(Store(), io.BytesIO(b"\n  \n"), "e.jsonl", JobOptions(model="m"), lambda m: m)


def test_unknown_model_is_an_error_and_stores_nothing(home):
    store = Store()
    with pytest.raises(InputError, match="unknown model 'nope'"):
        submit(store, lines({"prompt": "x"}), "f", JobOptions(model="nope"), lambda m: None)
    assert store.list_jobs() == []


def test_model_from_openai_lines(home):
    store = Store()
    body = {"messages": [{"role": "user", "content": "hi"}], "model": "tiny"}
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    job_id, _ = submit(store, lines(line), "f", JobOptions(), lambda m: m if m == "tiny" else None)
    assert store.job(job_id).model == "tiny"
    other = dict(line, custom_id="b", body=dict(body, model="other"))
    with pytest.raises(InputError, match="differs from 'tiny' on line 1"):
        submit(store, lines(line, other), "f", JobOptions(), lambda m: m)


def test_claim_is_exclusive_and_finish_is_once(home):
    store = Store()
    job_id, _ = make_job(store, 4)
    chunk = store.chunks(job_id)[0]
    a = store.claim(chunk, "w1", 3)
    b = store.claim(chunk, "w2", 3)
    assert [c.seq for c in a] == [0, 1, 2] and [c.seq for c in b] == [3]
    now = time.time()
    result = Result(a[0].id, job_id, now - 1, now, first_token_at=now - 0.5, response="x",
                    finish_reason="stop", prompt_tokens=5, completion_tokens=3)
    assert store.finish([result], "w2") == 0  # not w2's request
    assert store.finish([result], "w1") == 1
    assert store.finish([result], "w1") == 0  # never written twice
    job = store.job(job_id)
    assert job.counts == {"done": 1, "running": 3}
    assert job.completion_tokens == 3 and job.prompt_tokens == 5


def test_params_merge_job_defaults_with_line_overrides(home):
    store = Store()
    data = lines({"prompt": "a"}, {"prompt": "b", "max_tokens": 7, "temperature": 0.5})
    from nightshift.jobs.formats import Params

    job_id, _ = submit(store, data, "f", JobOptions(model="m", params=Params(max_tokens=99),
                                                    system="be brief"), lambda m: m)
    a, b = store.claim(store.chunks(job_id)[0], "w", 10)
    assert a.params["max_tokens"] == 99 and a.params["temperature"] == 0.0
    assert b.params["max_tokens"] == 7 and b.params["temperature"] == 0.5
    assert a.system == "be brief" and a.body == [{"role": "user", "content": "a"}]


def test_release_and_recover_put_work_back(home):
    store = Store()
    job_id, _ = make_job(store, 2)
    claimed = store.claim(store.chunks(job_id)[0], "gone-worker", 2)
    assert store.release([claimed[0].id], "gone-worker") == 1
    # "gone-worker" never registered a heartbeat: it is taken as dead.
    assert store.recover("me").requeued == 1
    assert store.job(job_id).counts == {"queued": 2}


def test_cancel_and_retry(home):
    store = Store()
    job_id, _ = make_job(store, 3)
    first = store.claim(store.chunks(job_id)[0], "w", 1)[0]
    now = time.time()
    store.finish([Result(first.id, job_id, now, now, error="boom")], "w")
    assert store.cancel(job_id) == 2
    assert store.claim(Chunk(job_id, 0, 2), "w", 5) == []
    assert store.job(job_id).state == "cancelled"
    assert store.retry(job_id) == 1
    again = store.claim(store.chunks(job_id)[0], "w", 5)
    assert [c.seq for c in again] == [0]


def test_chunks_split_big_jobs(home, monkeypatch):
    monkeypatch.setattr(settings, "CHUNK_SIZE", 4)
    store = Store()
    job_id, _ = make_job(store, 10, priority=3)
    chunks = store.chunks(job_id)
    assert [(c.lo, c.hi) for c in chunks] == [(0, 3), (4, 7), (8, 9)]
    assert all(c.priority == 3 and c.model == "m" for c in chunks)


def test_missing_job_is_not_found(home):
    with pytest.raises(NotFound, match="no job 'nope'"):
        Store().job("nope")


def test_parse_at_time_of_day_is_the_next_one():
    import datetime as dt

    now = dt.datetime(2026, 11, 29, 23, 0).astimezone()
    at = dt.datetime.fromtimestamp(parse_at("02:00", now)).astimezone()
    assert (at.day, at.hour, at.minute) == (30, 2, 0)
    assert parse_at("2026-12-01T02:00:00+00:00") == dt.datetime(
        2026, 12, 1, 2, tzinfo=dt.timezone.utc).timestamp()
    with pytest.raises(ValueError, match="time of day"):
        parse_at("tomorrow")


def test_migrations_are_recorded_once(home):
    Store()
    store = Store()
    from nightshift.jobs.schema import migrations
    from sqlalchemy import select

    with store.read() as conn:
        names = conn.execute(select(migrations.c.name)).scalars().all()
    assert names == migrations_module.names()


def test_concurrent_claims_hand_out_each_request_once(store):
    """Eight workers claim from the same chunks at once while the job is cancelled and
    retried: no request is handed to two, none is lost, and no transaction deadlocks
    (on PostgreSQL a claim and a cancel used to lock rows in opposite orders)."""
    import threading

    job_id, n = make_job(store, 600)
    got: dict[str, list[int]] = {f"w{i}": [] for i in range(8)}
    errors: list[BaseException] = []

    def work(worker):
        try:
            while True:
                claimed = [c for ch in store.chunks(job_id)
                           for c in store.claim(ch, worker, 7)]
                if not claimed and not store.job(job_id).counts.get("queued"):
                    return
                got[worker] += [c.id for c in claimed]
                now = time.time()
                store.finish([Result(c.id, job_id, now, now, response="x") for c in claimed],
                             worker)
        except BaseException as exc:  # reported below, with the thread's traceback
            errors.append(exc)
            raise

    def meddle():
        try:
            for _ in range(5):
                store.cancel(job_id)
                store.retry(job_id)  # failed only: cancelled ones stay cancelled
                time.sleep(0.01)
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=work, args=(w,)) for w in got]
    threads.append(threading.Thread(target=meddle))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    handed = [i for ids in got.values() for i in ids]
    assert len(handed) == len(set(handed))  # never the same request to two workers
    rows = list(store.iter_requests(job_id))
    done = {r.id for r in rows if r.status == "done"}
    assert done == set(handed)
    assert {r.status for r in rows} <= {"done", "cancelled"}
    assert store.job(job_id).counts.get("done", 0) == len(done)


def test_a_request_lost_with_its_worker_three_times_is_failed_with_the_reason(store):
    """The "dead-N" workers never registered a heartbeat: each is taken as gone."""
    job_id, _ = make_job(store, 20)
    batch = store.claim(store.chunks(job_id)[0], "dead-1", 20)
    assert store.recover("me", max_attempts=3).requeued == 20
    # Lost once: no longer claimed with healthy work, but apart, in small groups.
    assert store.claim(store.chunks(job_id)[0], "w", 20) == []
    assert store.has_lost("m")
    group = store.claim_lost("dead-2", "m", group=8)
    assert len(group) == 8 and {c.lost for c in group} == {1}
    assert store.recover("me", max_attempts=3).requeued == 8
    # Lost twice: alone, the most-lost first.
    alone = store.claim_lost("dead-3", "m", group=8)
    assert len(alone) == 1 and alone[0].lost == 2 and alone[0].id == group[0].id
    assert store.recover("me", max_attempts=3) == Recovered(requeued=0, failed=1)
    failed = next(r for r in store.iter_requests(job_id) if r.id == alone[0].id)
    assert failed.status == "failed" and failed.lost == 3
    assert failed.error.startswith("the worker died 3 times while running it")
    # The rest still run (the lost-twice ones alone, then the lost-once in groups).
    left = []
    while claimed := store.claim_lost("w", "m", group=8):
        left += claimed
        now = time.time()
        store.finish([Result(c.id, job_id, now, now, response="x") for c in claimed], "w")
    assert len(left) == 19 and not store.has_lost("m")
    assert store.job(job_id).counts == {"done": 19, "failed": 1}
    assert len(batch) == 20
    # retry forgives the losses: it runs with healthy work again.
    assert store.retry(job_id) == 1
    assert [c.lost for c in store.claim(store.chunks(job_id)[0], "w", 5)] == [0]


def test_fail_model_spares_jobs_held_for_later(store):
    now_job, _ = make_job(store, 2, model="broken")
    later, _ = make_job(store, 2, model="broken", not_before=time.time() + 3600)
    other, _ = make_job(store, 2, model="fine")
    assert store.fail_model("broken", "cannot load") == 2
    assert store.job(now_job).counts == {"failed": 2}
    assert store.job(later).counts == {"queued": 2}
    assert store.job(other).counts == {"queued": 2}


def test_a_locked_database_is_retried_not_fatal(home, monkeypatch, caplog):
    """SQLite: a writer that holds the lock past busy_timeout makes the next write fail
    with "database is locked"; the store retries it instead of failing the worker."""
    import sqlite3
    import threading

    from nightshift.jobs import store as store_module

    monkeypatch.setattr(store_module, "SQLITE_PRAGMAS", tuple(
        "busy_timeout=100" if p.startswith("busy_timeout") else p
        for p in store_module.SQLITE_PRAGMAS))
    store = Store()
    job_id, _ = make_job(store, 3)
    holder = sqlite3.connect(home / "nightshift.db", isolation_level=None,
                             check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(1.0, holder.rollback)
    release.start()
    with caplog.at_level("WARNING", logger="nightshift.store"):
        assert store.cancel(job_id) == 3
    release.join()
    assert any("locked" in r.getMessage() and "retrying" in r.getMessage()
               for r in caplog.records)


def test_heartbeats_are_judged_on_the_database_clock(store, monkeypatch):
    """A worker host whose clock runs an hour behind still looks alive, and one whose
    heartbeat the database saw long ago is dead, whatever this host's clock says."""
    from nightshift.jobs.hosts import host_id
    from nightshift.jobs.schema import workers
    from sqlalchemy import update

    job_id, _ = make_job(store, 4)
    store.register_worker("far-host:1:1", "elsewhere-123456789abc", 1, None)
    store.claim(store.chunks(job_id)[0], "far-host:1:1", 2)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600)  # our clock is off
    store.update_worker("far-host:1:1", state="running")
    assert store.recover("me").requeued == 0
    assert [w.id for w in store.live_workers()] == ["far-host:1:1"]
    monkeypatch.setattr(time, "time", real_time)
    with store.write() as conn:  # the database last heard from it a minute ago
        conn.execute(update(workers).values(heartbeat_at=workers.c.heartbeat_at - 60))
    assert store.recover("me").requeued == 2
    assert store.live_workers() == []
    assert host_id().count("-") >= 1


def test_a_real_deadlock_and_a_lost_connection_are_transient(store):
    """What PostgreSQL raises when two transactions lock in a circle, or a connection
    dies, is retried (``_transient``); a constraint violation is not."""
    import threading

    from nightshift.jobs.store import _transient
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    if store.dialect != "postgresql":
        pytest.skip("SQLite locks the whole database: no deadlock between rows")
    a, _ = make_job(store, 1)
    b, _ = make_job(store, 1)
    errors: list[DBAPIError] = []
    barrier = threading.Barrier(2)

    def lock(first, second):
        try:
            with store.engine.connect() as conn, conn.begin():
                conn.execute(text("SELECT 1 FROM jobs WHERE id = :id FOR UPDATE"), {"id": first})
                barrier.wait()
                conn.execute(text("SELECT 1 FROM jobs WHERE id = :id FOR UPDATE"),
                             {"id": second})
        except DBAPIError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=lock, args=p) for p in ((a, b), (b, a))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(errors) == 1 and _transient(errors[0]), errors

    with store.engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        with store.engine.connect() as killer:
            killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            killer.commit()
        with pytest.raises(DBAPIError) as dropped:
            conn.execute(text("SELECT 1"))
    assert _transient(dropped.value)

    with pytest.raises(DBAPIError) as duplicate, store.write() as conn:
        conn.execute(text("INSERT INTO nightshift_migrations (name, applied_at) "
                          "VALUES ('m001_initial', 0)"))
    assert "duplicate key" in str(duplicate.value) and not _transient(duplicate.value)


def test_host_ids_tell_containers_and_boots_apart(monkeypatch):
    """Same hostname, different pid namespace (two containers) or boot: different hosts."""
    from nightshift.jobs import hosts

    def host_id_with(**parts):
        hosts.host_id.cache_clear()
        for name, value in parts.items():
            monkeypatch.setattr(hosts, name, lambda value=value: value)
        try:
            return hosts.host_id()
        finally:
            hosts.host_id.cache_clear()

    here = host_id_with()
    assert host_id_with(_pid_namespace="pid:[1]") != host_id_with(_pid_namespace="pid:[2]")
    assert host_id_with(_boot_marker="boot-a") != host_id_with(_boot_marker="boot-b")
    monkeypatch.undo()
    hosts.host_id.cache_clear()
    assert hosts.host_id() == here and here.startswith(__import__("socket").gethostname())


def test_workers_splitting_a_job_take_a_share_of_every_size(store):
    lengths = [37, 900, 120, 64, 480, 33, 250, 700, 90, 310, 45, 600]
    job_id, _ = submit(store, lines(*[{"prompt": "x" * n, "custom_id": f"c{i}"}
                                      for i, n in enumerate(lengths)]),
                       "in.jsonl", JobOptions(model="m"), lambda m: m)
    chunk = store.chunks(job_id)[0]
    first = store.claim(chunk, "w1", 6, spread=True)
    second = store.claim(chunk, "w2", 6, spread=True)  # what is left: all of it
    assert sorted(c.seq for c in first + second) == list(range(12))
    assert [c.seq for c in first] == sorted(c.seq for c in first)  # handed out in input order
    a, b = (sum(lengths[c.seq] for c in claimed) for claimed in (first, second))
    in_order = abs(sum(lengths[:6]) - sum(lengths[6:]))  # 361: what input order gave
    assert abs(a - b) <= 125 < in_order
    assert store.claim(chunk, "w3", 6, spread=True) == []


def test_spread_by_size_takes_one_of_each_window_of_sizes():
    sizes = [(i, size) for i, size in enumerate([5, 80, 20, 60, 40, 10, 70, 30, 50, 90])]
    assert spread_by_size(sizes, 10) == list(range(10))  # all of them: input order
    assert spread_by_size(sizes, 20) == list(range(10))
    # Ranked 90 80 70 60 50 40 30 20 10 5: windows of 2.5 -> ranks 0, 4, 5, 9.
    assert spread_by_size(sizes, 4) == [9, 8, 4, 0]
    assert spread_by_size(sizes, 1) == [9]


def test_a_workers_fair_share_is_the_models_outstanding_work_over_its_live_workers(store):
    job_id, _ = make_job(store, 9)
    make_job(store, 5, model="other")
    make_job(store, 4, not_before=time.time() + 3600)  # held for later: not outstanding
    assert store.fair_share("m") == 9  # nobody serves it yet: one worker takes it all
    for n, worker in enumerate(("w1", "w2", "w3", "w4")):
        store.register_worker(worker, "this-host", 100 + n, None)
    store.update_worker("w1", model="m", state="running")
    store.update_worker("w2", model="m", state="idle")
    store.update_worker("w3", model="m", state="loading")  # not serving yet
    store.update_worker("w4", model="other", state="idle")
    assert store.fair_share("m") == 5  # 9 over 2, rounded up
    store.claim(store.chunks(job_id)[0], "w1", 5)
    assert store.fair_share("m") == 5  # running requests are still outstanding
    store.update_worker("w3", state="idle")
    assert store.fair_share("m") == 3
    store.update_worker("w2", state="stopped", stopped_at=time.time())
    assert store.fair_share("m") == 5
    assert store.fair_share("nothing") == 1  # never 0: a worker may always take one
