"""The store on a real SQLite file: submission is whole or absent, claims are exclusive,
results are written once, cancel and retry do what they say."""

from __future__ import annotations

import io
import json
import time

import pytest

from jobs import migrations as migrations_module
from jobs import settings
from jobs.errors import InputError, NotFound
from jobs.store import Chunk, Result, Store
from jobs.submit import JobOptions, parse_at, submit


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
    from jobs.formats import Params

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
    assert store.recover("me") == 1
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
    from sqlalchemy import select

    from jobs.schema import migrations

    with store.read() as conn:
        names = conn.execute(select(migrations.c.name)).scalars().all()
    assert names == migrations_module.names()
