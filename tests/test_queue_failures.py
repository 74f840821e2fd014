"""The queue after the job is stored: whatever fails there, the job stays stored, the
command says so and exits 0, and workers find the job in the database. A damaged
SQLite queue file is set aside and rebuilt empty; a time the queue cannot schedule is
refused before anything is stored."""

from __future__ import annotations

import json
import sqlite3

import pytest
from nightshift.jobs import settings
from nightshift.jobs.store import Store
from nightshift.jobs.vocabulary import Chunk
from nightshift.worker.dispatch import queue_job
from nightshift.worker.queue import Queue, make_huey


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(3)))
    return path


def stored_jobs() -> list:
    return Store().list_jobs()


def test_a_queue_that_fails_after_the_commit_is_a_warning_and_the_job_still_runs(
        invoke, prompts, tmp_path, monkeypatch):
    monkeypatch.setenv(settings.QUEUE_URL_ENV, f"sqlite:///{tmp_path / 'no' / 'queue.db'}")
    result = invoke("submit", prompts, "--model", "org/m", "--json")
    out = json.loads(result.stdout)
    job_id = out["id"]
    assert (out["requests"], out["queue_tasks"]) == (3, 0)
    assert job_id in out["warning"] and "do not submit it again" in out["warning"]
    assert f"warning: job {job_id} is stored but could not be queued" in result.stderr
    assert "Traceback" not in result.output
    # What a worker's sweep of the database finds.
    [chunk] = Store().runnable_chunks()
    assert (chunk.job_id, chunk.lo, chunk.hi) == (job_id, 0, 2)

    plain = invoke("submit", prompts, "--model", "org/m")
    assert "stored 3 requests as job" in plain.stderr and "warning: job" in plain.stderr
    assert len(stored_jobs()) == 2


def test_an_interrupt_while_queueing_still_reports_the_stored_job(invoke, prompts, monkeypatch):
    def interrupted(self, chunks, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(Queue, "enqueue", interrupted)
    out = json.loads(invoke("submit", prompts, "--model", "org/m", "--json").stdout)
    assert (out["queue_tasks"], out["warning"].split(" (")[0]) == (
        0, f"job {out['id']} is stored but could not be queued")
    tasks, warning = queue_job(Store(), out["id"])
    assert tasks == 0 and "could not be queued (interrupted)" in warning


def test_retry_with_a_failing_queue_warns_and_the_requests_are_queued(
        invoke, prompts, tmp_path, monkeypatch):
    job_id = json.loads(invoke("submit", prompts, "--model", "org/m", "--json").stdout)["id"]
    store = Store()
    assert store.fail_model("org/m", "could not load") == 3
    monkeypatch.setenv(settings.QUEUE_URL_ENV, f"sqlite:///{tmp_path / 'no' / 'queue.db'}")
    result = invoke("retry", job_id, "--json")
    out = json.loads(result.stdout)
    assert out["requeued"] == 3 and job_id in out["warning"]
    assert store.job(job_id).counts == {"queued": 3} and store.has_runnable()


@pytest.mark.parametrize("at", ["9999-12-31T23:59-12:00", "9999-12-31T12:00",
                                "0001-01-01T00:00"])
def test_an_at_the_queue_cannot_schedule_is_refused_before_storing(invoke, prompts, at):
    result = invoke("submit", prompts, "--model", "org/m", "--at", at, expect=2)
    assert "--at" in result.stderr and "beyond the times the queue can schedule" in result.stderr
    assert "Traceback" not in result.output
    assert stored_jobs() == []


def test_an_existing_job_scheduled_past_year_9999_is_still_queued(home):
    queue = Queue()
    assert queue.enqueue([Chunk("j", 0, 1, not_before=1e15, model="m")]) == 1
    [message] = queue.huey.storage.enqueued_items()
    assert json.loads(bytes(message))["eta"] == {"datetime": "9999-12-31T00:00:00"}


def garbage(path) -> bytes:
    data = b"this is not a database\n" * 300
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def test_a_damaged_queue_file_is_set_aside_by_submit(invoke, prompts, home, caplog):
    data = garbage(home / "queue.db")
    (home / "queue.db-wal").write_bytes(b"old log")
    out = json.loads(invoke("submit", prompts, "--model", "org/m", "--json").stdout)
    assert (out["queue_tasks"], out["warning"]) == (1, None)
    [aside] = home.glob("queue.db.damaged-*[0-9]")
    assert aside.read_bytes() == data
    assert (home / f"{aside.name}-wal").read_bytes() == b"old log"
    assert "is damaged" in caplog.text and aside.name in caplog.text
    assert Queue().pending() == 1


def test_a_worker_starts_on_a_damaged_queue(home):
    from nightshift.worker.service import Worker

    garbage(home / "queue.db")
    worker = Worker(Store())
    assert worker.queue.pending() == 0
    assert len(list(home.glob("queue.db.damaged-*[0-9]"))) == 1


def test_a_queue_file_damaged_inside_is_set_aside(home):
    path = home / "queue.db"
    home.mkdir(parents=True, exist_ok=True)
    queue = Queue()
    queue.enqueue([Chunk(f"job{i}", 0, 511, model="m" * 200) for i in range(400)])
    queue.huey.storage.close()
    with sqlite3.connect(path) as conn:  # fold the log into the file
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = path.stat().st_size
    with open(path, "r+b") as f:  # the middle pages, header intact
        f.seek(size // 2)
        f.write(b"\xff" * 8192)
    huey = make_huey()
    assert huey.pending_count() == 0
    assert len(list(home.glob("queue.db.damaged-*[0-9]"))) == 1


def test_a_sound_queue_is_kept(home):
    Queue().enqueue([Chunk("j", 0, 1, model="m")])
    assert Queue().pending() == 1 and not list(home.glob("queue.db.damaged-*[0-9]"))
