"""Deadlines (`submit --deadline`, a batch's ``completion_window``): requests not finished
by then are expired, whether queued or running, no worker spends time on them, and
every result finished before stays."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest
from nightshift.jobs.schema import jobs
from nightshift.jobs.store import Store
from nightshift.jobs.submit import parse_deadline
from nightshift.jobs.vocabulary import EXPIRED, Result

from tests.chaos import run_cli, start_worker
from tests.test_store import lines, make_job
from tests.workers import run_worker, wait_for


def test_a_deadline_is_a_duration_or_a_time():
    now = dt.datetime(2026, 12, 4, 22, 0).astimezone()
    start = now.timestamp()
    assert parse_deadline("8h", now) == start + 8 * 3600
    assert parse_deadline("1h30m", now) == start + 5400
    assert parse_deadline("90s", now) == start + 90
    assert parse_deadline("2d", now) == start + 2 * 86400
    at = dt.datetime.fromtimestamp(parse_deadline("07:00", now)).astimezone()
    assert (at.day, at.hour, at.minute) == (5, 7, 0)  # the next 07:00: tomorrow morning
    assert parse_deadline("2026-12-05T06:30:00+00:00", now) == dt.datetime(
        2026, 12, 5, 6, 30, tzinfo=dt.timezone.utc).timestamp()
    for bad in ("soon", "0h", "-1h", "8 hours", "7:00pm", "2026-12-04T21:00"):
        with pytest.raises(ValueError, match="--deadline"):
            parse_deadline(bad, now)


def past_deadline(store: Store, job_id: str) -> None:
    with store.write() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job_id)
                     .values(deadline=time.time() - 1))


def test_the_store_expires_what_its_deadline_leaves_unfinished(store):
    job_id, _ = make_job(store, 5, deadline=time.time() + 3600)
    other, _ = make_job(store, 2)  # no deadline: untouched throughout
    assert store.expire() == {}
    first, second = store.claim(store.chunks(job_id)[0], "w", 2)
    now = time.time()
    store.finish([Result(first.id, job_id, now, now, response="kept", completion_tokens=1)], "w")
    assert store.ended_among({job_id, other}) == {}

    past_deadline(store, job_id)
    # Nothing more starts: no chunk, no claim, nothing runnable...
    assert [c.job_id for c in store.runnable_chunks()] == [other]
    assert store.claim(store.chunks(job_id)[0], "w", 5) == []
    # ... the worker holding one is told to drop it, and the queued ones expire.
    assert store.ended_among({job_id, other}) == {job_id: EXPIRED}
    assert store.mark_dropped([second.id], "w", EXPIRED) == 1
    assert store.expire() == {job_id: 3}
    assert store.expire() == {}
    job = store.job(job_id)
    assert job.counts == {"done": 1, "expired": 4} and job.state == "expired"
    assert job.expired_at is not None and job.remaining == 0
    rows = {r.seq: r for r in store.iter_requests(job_id)}
    assert rows[0].response == "kept"
    assert all("deadline" in rows[s].error and rows[s].finished_at for s in range(1, 5))
    assert store.job(other).counts == {"queued": 2}

    # retry asks for the answers again: the passed deadline is lifted.
    assert store.retry(job_id) == 4
    job = store.job(job_id)
    assert job.deadline is None and job.state == "queued" and job.counts["queued"] == 4
    assert len(store.claim(store.chunks(job_id)[0], "w", 5)) == 4


def test_submit_deadline_on_the_command_line(invoke, tiny_model, tmp_path, home):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(lines(*[{"prompt": f"q{i}", "max_tokens": 2} for i in range(3)])
                        .getvalue())
    bad = invoke("submit", prompts, "-m", tiny_model, "--deadline", "soon", expect=2)
    assert "8h" in bad.output and "07:00" in bad.output
    bad = invoke("submit", prompts, "-m", tiny_model, "--at", "2099-01-01T02:00",
                 "--deadline", "2099-01-01T01:00", expect=2)
    assert "not after --at" in bad.output

    submitted = json.loads(invoke("submit", prompts, "-m", tiny_model, "--deadline", "2s",
                                  "--json").output)
    assert submitted["deadline"] == pytest.approx(time.time() + 2, abs=1.5)
    job = submitted["id"]
    assert "deadline" in invoke("status", job).output
    time.sleep(2.2)
    # No worker ran meanwhile: one that starts now runs none of them.
    worker = run_worker("--drain", timeout=120)
    assert worker.returncode == 0, worker.stderr
    status = json.loads(invoke("status", job, "--json").output)
    assert status["state"] == "expired" and status["counts"]["expired"] == 3
    assert status["counts"]["done"] == 0
    records = [json.loads(x) for x in invoke("export", job).output.splitlines()]
    assert [r["error"]["code"] for r in records] == ["batch_expired"] * 3
    assert all(r["nightshift"]["status"] == "expired" for r in records)

    assert json.loads(invoke("retry", job, "--json").output)["requeued"] == 3
    assert run_worker("--drain", timeout=120).returncode == 0
    assert json.loads(invoke("status", job, "--json").output)["counts"]["done"] == 3


def test_a_running_worker_drops_requests_at_the_deadline(tiny_model, tmp_path, home):
    """Long answers (each step slowed to 50 ms: a minute each) are dropped within
    moments of the deadline; the short ones finished before it stay."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(lines(
        *[{"custom_id": f"short{i}", "prompt": f"q{i}", "max_tokens": 1} for i in range(2)],
        *[{"custom_id": f"long{i}", "prompt": f"q{i}", "max_tokens": 1200} for i in range(6)],
    ).getvalue())
    worker = start_worker("--batch-size", "4", log_path=tmp_path / "worker.log",
                          NIGHTSHIFT_TEST_STEP_SECONDS="0.05")
    try:
        wait_for(lambda: json.loads(run_cli("status", "--json").stdout)["workers"], 120)
        wait_for(lambda: any(w["state"] == "idle" for w in json.loads(
            run_cli("status", "--json").stdout)["workers"]), 120)
        job = json.loads(run_cli("submit", prompts, "-m", tiny_model, "--deadline", "4s",
                                 "--json").stdout)["id"]
        deadline = time.time() + 4

        def ended():
            status = json.loads(run_cli("status", job, "--json").stdout)
            return status if status["state"] == "expired" else None

        status = wait_for(ended, timeout=60, interval=0.2)
        assert time.time() - deadline < 8, "the worker kept running them past the deadline"
        assert status["counts"]["done"] == 2 and status["counts"]["expired"] == 6
        records = {r["custom_id"]: r for r in map(
            json.loads, run_cli("export", job).stdout.splitlines())}
        assert all(records[f"short{i}"]["response"] for i in range(2))
        dropped = [records[f"long{i}"] for i in range(6)]
        assert all(r["error"]["code"] == "batch_expired" for r in dropped)
        # Some were running when the deadline came (claimed once), the rest never ran.
        attempts = sorted(r["nightshift"]["attempts"] for r in dropped)
        assert attempts[0] == 0 and attempts[-1] == 1
        log = (tmp_path / "worker.log").read_text()
        assert "past their deadline" in log and "expired" in log
        # The worker has nothing left to do: it is idle, not decoding dropped answers.
        wait_for(lambda: json.loads(run_cli("status", "--json").stdout)["workers"][0]["state"]
                 == "idle", timeout=10)
    finally:
        worker.terminate()
        worker.wait(60)
