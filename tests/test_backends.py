"""The distributed parts for real: results in PostgreSQL, the queue in Redis."""

from __future__ import annotations

import io
import json
import pickle
import time

import pytest
from nightshift.jobs.submit import JobOptions, submit
from nightshift.jobs.vocabulary import Chunk, Result
from nightshift.worker.queue import Queue

from tests.backends import redis_queue


def job(store, n, **kw):
    data = io.BytesIO("".join(json.dumps({"prompt": f"q{i}", "custom_id": f"c{i}"}) + "\n"
                              for i in range(n)).encode())
    return submit(store, data, "f.jsonl", JobOptions(model="m", **kw), lambda m: m)[0]


def test_store_lifecycle_on_each_database(store):
    job_id = job(store, 4)
    assert store.job(job_id).counts == {"queued": 4}
    chunk = store.chunks(job_id)[0]
    a, b = store.claim(chunk, "w1", 2), store.claim(chunk, "w2", 5)
    assert [c.seq for c in a] == [0, 1] and [c.seq for c in b] == [2, 3]
    now = time.time()
    ok = Result(a[0].id, job_id, now - 1, now, first_token_at=now - 0.5, response="r",
                finish_reason="stop", prompt_tokens=3, completion_tokens=2)
    assert store.finish([ok], "w1", peak_memory=1000) == 1
    assert store.finish([ok], "w1", peak_memory=1000) == 0
    bad = Result(a[1].id, job_id, now, now, error="boom")
    assert store.finish([bad], "w1") == 1
    summary = store.job(job_id)
    assert summary.counts == {"done": 1, "failed": 1, "running": 2}
    assert summary.completion_tokens == 2 and summary.peak_memory == 1000
    assert store.release([c.id for c in b], "w2") == 2
    assert store.cancel(job_id) == 2
    assert store.retry(job_id) == 1
    rows = list(store.iter_requests(job_id))
    assert [r.status for r in rows] == ["done", "queued", "cancelled", "cancelled"]
    assert store.has_runnable("m") and not store.has_runnable("other")


def test_whole_or_nothing_on_each_database(store):
    bad = io.BytesIO(b'{"prompt": "fine"}\n{"prompt": 3}\n')
    with pytest.raises(Exception, match="f.jsonl:2"):
        submit(store, bad, "f.jsonl", JobOptions(model="m"), lambda m: m)
    assert store.list_jobs() == []


def test_redis_queue_serves_higher_priority_first_and_refuses_pickle():
    with redis_queue() as url:
        seen = []
        queue = Queue(url, handler=seen.append)
        queue.enqueue([Chunk("low", 0, 9, priority=0, model="m"),
                       Chunk("high", 0, 9, priority=5, model="m")])
        assert queue.pending() == 2
        for _ in range(2):
            queue.huey.execute(queue.huey.dequeue())
        assert [c.job_id for c in seen] == ["high", "low"]

        class Exploit:
            def __reduce__(self):
                return (seen.append, ("pwned",))

        queue.huey.storage.enqueue(pickle.dumps(Exploit()), 0)
        with pytest.raises(ValueError):
            queue.huey.dequeue()
        assert "pwned" not in seen
