"""Durability: the SQLite settings are in force, a result reported done is on disk
before the worker goes on, and a submission is whole or absent whatever kills it."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nightshift.jobs.schema import jobs, requests
from nightshift.jobs.store import Store
from nightshift.jobs.vocabulary import DONE
from sqlalchemy import func, select

from tests.chaos import REPO, env, run_cli

N_BIG = 60_000  # lines in the file a submit is killed in the middle of


def test_sqlite_settings_are_in_force_on_every_connection(home):
    store = Store()
    expected = {"journal_mode": "wal", "synchronous": 2, "busy_timeout": 60000,
                "foreign_keys": 1}
    # Several connections at once, so the pool opens more than one.
    with store.read() as a, store.read() as b, store.write() as c:
        for conn in (a, b, c):
            for pragma, value in expected.items():
                assert conn.exec_driver_sql(f"PRAGMA {pragma}").scalar() == value, pragma


_FINISH_SCRIPT = """
import io, os, time
from nightshift.jobs.formats import iter_requests
from nightshift.jobs.store import Store
from nightshift.jobs.vocabulary import Result
store = Store()
mark = os.open(os.devnull, os.O_WRONLY)
os.write(mark, b"SUBMIT")
job, _ = store.create_job(model="m", defaults={}, source="f",
                          specs=iter_requests(io.BytesIO(b'{"prompt": "hi"}'), "f"))
os.write(mark, b"SUBMITTED")
chunk = store.chunks(job)[0]
[c] = store.claim(chunk, "w", 1)
now = time.time()
os.write(mark, b"FINISH")
assert store.finish([Result(c.id, job, now, now, now, "answer", "stop", 1, 0, 1)], "w") == 1
os.write(mark, b"FINISHED")
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (.ci/run installs it)")
def test_a_result_reported_done_is_on_disk_before_the_call_returns(home, tmp_path):
    """A power cut loses what is in the page cache; SQLite's WAL survives it only if it
    was synced. Every commit that matters syncs the WAL before returning."""
    trace = tmp_path / "trace"
    run = subprocess.run(["strace", "-f", "-y", "-e", "trace=fsync,fdatasync,write", "-o",
                          trace, sys.executable, "-c", _FINISH_SCRIPT], cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=120)
    if run.returncode != 0 and "ptrace" in run.stderr:
        pytest.skip(f"strace cannot trace here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    calls = trace.read_text().splitlines()

    def synced_between(start: str, end: str) -> bool:
        a = next(i for i, line in enumerate(calls) if f'"{start}"' in line)
        b = next(i for i, line in enumerate(calls) if f'"{end}"' in line)
        return any("sync(" in line and "nightshift.db-wal>" in line for line in calls[a:b])

    assert synced_between("SUBMIT", "SUBMITTED"), "a submitted job is not synced"
    assert synced_between("FINISH", "FINISHED"), "a stored result is not synced"


def _whole_or_absent(store: Store, n: int) -> int:
    """Every job stored has all its n requests, once what killed submits left (a partial
    job, never listed) is removed; returns how many jobs there are."""
    listed = {j.id for j in store.list_jobs()}
    store.remove_abandoned_jobs()
    with store.read() as conn:
        totals = dict(conn.execute(select(jobs.c.id, jobs.c.total)).all())
        rows = dict(conn.execute(select(requests.c.job_id, func.count())
                                 .group_by(requests.c.job_id)).all())
    assert set(rows) <= set(totals), "requests without their job"
    assert set(totals) == listed, "a job listed before it was whole, or never"
    for job_id, total in totals.items():
        assert total == n and rows.get(job_id) == n, (job_id, total, rows.get(job_id))
    return len(totals)


def _big_file(path: Path) -> Path:
    with open(path, "w") as f:
        for i in range(N_BIG):
            f.write(json.dumps({"custom_id": f"r{i}", "prompt": f"Question {i}: why?"}) + "\n")
    return path


@pytest.mark.slow
def test_a_submission_killed_at_any_moment_is_whole_or_absent(tiny_model, tmp_path):
    big = _big_file(tmp_path / "big.jsonl")
    started = time.monotonic()
    assert run_cli("submit", big, "--model", "tiny", "-q").returncode == 0
    took = time.monotonic() - started
    store = Store()
    assert _whole_or_absent(store, N_BIG) == 1
    rng = random.Random()
    outcomes = []
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-m", "nightshift.cli", "submit", big, "--model",
                                 "tiny", "-q"], cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, took))
        proc.send_signal(signal.SIGKILL)
        outcomes.append(proc.wait())
        _whole_or_absent(store, N_BIG)
    assert -signal.SIGKILL in outcomes  # most were killed in the middle, not after


@pytest.mark.slow
def test_a_submission_from_a_pipe_killed_midway_stores_nothing(tiny_model, tmp_path):
    big = _big_file(tmp_path / "big.jsonl").read_bytes()
    store = Store()
    for fraction in (0.1, 0.5, 0.99):
        proc = subprocess.Popen([sys.executable, "-m", "nightshift.cli", "submit", "-", "--model",
                                 "tiny", "-q"], cwd=REPO, env=env(), stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc.stdin.write(big[: int(len(big) * fraction)])
        proc.stdin.flush()
        time.sleep(0.5)
        proc.kill()
        proc.wait()
        proc.stdin.close()
        assert _whole_or_absent(store, N_BIG) == 0


@pytest.mark.slow
def test_a_job_stored_but_never_queued_still_runs(tiny_model, tmp_path):
    """A submit killed after its commit and before it queued the job: the worker finds
    the job in the database."""
    import io

    from nightshift.jobs.formats import iter_requests

    store = Store()
    lines = b"".join(b'{"prompt": "question %d", "max_tokens": 4}\n' % i for i in range(6))
    job, _ = store.create_job(model="tiny", defaults={}, source="f",
                              specs=iter_requests(io.BytesIO(lines), "f"))
    result = run_cli("worker", "--drain", "--model", "tiny", "--batch-size", "4", timeout=300)
    assert result.returncode == 0, result.stderr
    assert store.job(job).counts == {DONE: 6}
