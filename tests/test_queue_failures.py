"""The queue and the times it can hold: an --at it cannot schedule is refused before
anything is stored; a job stored with one before is still queued."""

from __future__ import annotations

import json

import pytest

from jobs.store import Chunk, Store
from worker.queue import Queue


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(3)))
    return path


def stored_jobs() -> list:
    return Store().list_jobs()


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
