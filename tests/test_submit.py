"""A big submit is stored in short transactions, on a job nobody sees until it is whole:
other writers get in between, workers never claim or count it, and whatever stops a
submit (bad lines, an interrupt, a SIGKILL) leaves no job and no request rows behind
(on SQLite and PostgreSQL)."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from nightshift.jobs import migrations, settings
from nightshift.jobs.errors import InputError, NotFound
from nightshift.jobs.reads import SqliteReads
from nightshift.jobs.store import INSERT_BATCH, Store
from nightshift.jobs.submit import JobOptions, submit
from sqlalchemy import text

from tests.chaos import REPO

BIG = 300_000  # lines: several seconds of storing, 75 transactions


def prompts(n: int, start: int = 0) -> bytes:
    return b"".join(b'{"prompt": "question %d", "custom_id": "c%d"}\n' % (i, i)
                    for i in range(start, start + n))


def rows(store: Store) -> tuple[int, int]:
    """(jobs, requests) rows in the database, partial or whole."""
    with store.read() as conn:
        return (conn.execute(text("SELECT COUNT(*) FROM jobs")).scalar(),
                conn.execute(text("SELECT COUNT(*) FROM requests")).scalar())


def partial_jobs(store: Store) -> list[str]:
    with store.read() as conn:
        return list(conn.execute(text("SELECT id FROM jobs WHERE submitter IS NOT NULL"))
                    .scalars())


def submit_bytes(store: Store, data, source: str = "in.jsonl") -> tuple[str, int]:
    stream = data if hasattr(data, "readline") else io.BytesIO(data)
    return submit(store, stream, source, JobOptions(model="m"), lambda m: m)


def test_a_big_submit_lets_other_writes_in_and_stays_unseen_until_whole(store):
    """While 300,000 lines are stored, a heartbeat from another connection never waits
    2 s, and the sweep, the claims and the listing never see the partial job."""
    store.register_worker("w", "host", 1, None)
    other = Store(store.url)  # another pool: the worker's own connections
    data = prompts(BIG)
    done = threading.Event()
    result: list = []

    def big_submit():
        try:
            result.append(submit_bytes(store, data))
        except BaseException as exc:  # reported by the main thread
            result.append(exc)
        finally:
            done.set()

    waits: list[float] = []
    seen_partial = claimed_whole = 0
    thread = threading.Thread(target=big_submit)
    thread.start()
    try:
        while not done.is_set():
            t0 = time.monotonic()
            other.update_worker("w", state="running")
            waits.append(time.monotonic() - t0)
            runnable = other.runnable_chunks()
            has_runnable = other.has_runnable()
            listed = other.list_jobs()
            claimed = [c for chunk in runnable[:1] for c in other.claim(chunk, "w", 10)]
            claimed_whole += len(claimed)
            # Read after: a job partial now was partial during the reads above.
            if partial_jobs(other):
                seen_partial += 1
                assert (runnable, has_runnable, listed, claimed) == ([], False, [], [])
            time.sleep(0.01)
    finally:
        thread.join()
    assert not isinstance(result[0], BaseException), result[0]
    job_id, count = result[0]
    assert count == BIG and seen_partial >= 3, seen_partial
    assert max(waits) < 2.0, f"a heartbeat waited {max(waits):.2f} s for the submit"
    job = other.job(job_id)
    assert (job.total, job.model) == (BIG, "m")
    assert job.counts == {"queued": BIG - claimed_whole, "running": claimed_whole} \
        if claimed_whole else {"queued": BIG}
    assert other.has_runnable() and other.runnable_chunks()[0].job_id == job_id
    assert partial_jobs(other) == []
    other.close()


class Interrupted(io.BytesIO):
    """A file whose reading is interrupted (Ctrl-C) after ``after`` lines."""

    def __init__(self, data: bytes, after: int, exc: BaseException):
        super().__init__(data)
        self.lines, self.after, self.exc = 0, after, exc

    def readline(self, *args):
        self.lines += 1
        if self.lines > self.after:
            raise self.exc
        return super().readline(*args)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError("read error")])
def test_an_interrupted_submit_leaves_nothing(store, exc):
    stream = Interrupted(prompts(3 * INSERT_BATCH), 2 * INSERT_BATCH + 10, exc)
    with pytest.raises(type(exc)):
        submit_bytes(store, stream)
    assert stream.lines > 2 * INSERT_BATCH  # two batches had been stored
    assert rows(store) == (0, 0)


def test_bad_lines_after_many_batches_store_nothing_and_are_all_reported(store):
    data = prompts(3 * INSERT_BATCH) + b'{"prompt": ""}\n' + prompts(10, 10**6) + b"nope\n" * 60
    with pytest.raises(InputError) as err:
        submit_bytes(store, data, "big.jsonl")
    first = 3 * INSERT_BATCH + 1
    assert err.value.problems[0].startswith(f"big.jsonl:{first}: ")
    assert err.value.problems[1].startswith(f"big.jsonl:{first + 11}: ")
    assert (len(err.value.problems), err.value.more) == (50, 11)
    assert rows(store) == (0, 0)


def test_an_unknown_model_after_many_batches_stores_nothing(store):
    with pytest.raises(InputError, match="unknown model 'nope'"):
        submit(store, io.BytesIO(prompts(2 * INSERT_BATCH + 1)), "f", JobOptions(model="nope"),
               lambda m: None)
    assert rows(store) == (0, 0)


# A submit that stores two batches, then hangs before the rest (as if killed mid-file).
_STUCK_SUBMIT = f"""
import io, time
from nightshift.jobs.formats import iter_requests
from nightshift.jobs.store import Store

def specs():
    yield from iter_requests(io.BytesIO(b'{{"prompt": "q"}}\\n' * {2 * INSERT_BATCH + 5}), "f")
    print("stored", flush=True)
    time.sleep(600)

Store().create_job(model="m", defaults={{}}, source="f", specs=specs())
"""


def stuck_submit(store: Store) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), **{settings.DATABASE_URL_ENV: store.url})
    proc = subprocess.Popen([sys.executable, "-c", _STUCK_SUBMIT], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "stored\n"
    return proc


def test_a_killed_submit_leaves_a_hidden_job_that_the_next_submit_removes(store):
    proc = stuck_submit(store)
    try:
        [job_id] = partial_jobs(store)
        assert rows(store) == (1, 2 * INSERT_BATCH)
        # A live submitter's job is left alone, and shown or run by nothing.
        assert store.remove_abandoned_jobs() == []
        assert store.list_jobs() == [] and not store.has_runnable()
        assert store.runnable_chunks() == [] and store.models_waiting() == {}
        for read in (store.job, store.chunks, store.cancel, store.retry):
            with pytest.raises(NotFound):
                read(job_id)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    new_id, _ = submit_bytes(store, prompts(3))  # removes what the killed one left
    assert partial_jobs(store) == []
    assert rows(store) == (1, 3) and [j.id for j in store.list_jobs()] == [new_id]


def test_a_partial_job_untouched_for_long_is_removed_even_if_its_process_lives(store):
    proc = stuck_submit(store)
    try:
        [job_id] = partial_jobs(store)
        later = time.time() + settings.SUBMIT_STALE_SECONDS + 1
        assert store.remove_abandoned_jobs(now=later) == [job_id]
        assert rows(store) == (0, 0)
    finally:
        proc.kill()
        proc.wait()


def test_a_submit_whose_job_was_removed_meanwhile_says_so(store, monkeypatch):
    """A submit paused past SUBMIT_STALE_SECONDS finds its job removed: an error, and
    nothing left behind."""
    def stale_then_more():
        yield from prompts(INSERT_BATCH + 1).splitlines(keepends=True)
        assert store.remove_abandoned_jobs(now=time.time() + 2 * settings.SUBMIT_STALE_SECONDS)
        yield from prompts(INSERT_BATCH, INSERT_BATCH + 1).splitlines(keepends=True)

    class Lines:
        def __init__(self):
            self.lines = stale_then_more()

        def readline(self, *args):
            return next(self.lines, b"")

    with pytest.raises(Exception, match="removed while it was being stored"):
        submit_bytes(store, Lines())
    assert rows(store) == (0, 0)


def test_m004_adds_the_submit_columns_to_an_older_database(home):
    store = Store()
    job_id, _ = submit_bytes(store, prompts(3))
    store.close()
    db = settings.home() / "nightshift.db"
    conn = sqlite3.connect(db)
    for column in ("submitter", "submit_touched_at"):
        conn.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
    conn.execute("DELETE FROM nightshift_migrations WHERE name = 'm004_submitting'")
    conn.commit()
    conn.close()
    assert not SqliteReads(db).migrated()
    upgraded = Store()
    assert upgraded.job(job_id).counts == {"queued": 3}
    assert SqliteReads(db).migrated() and "m004_submitting" in migrations.names()
