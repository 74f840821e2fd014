"""Dispatch: the one door between the database and the queue.

The database decides: a request runs when a worker claims it there (``Store.claim``),
and only then. The queue wakes: each task names a range of one job's requests (a
``Chunk``), and the worker that takes it claims whatever in that range is still
queued. So a task delivered twice runs nothing twice; a task lost costs only latency,
since every idle worker sweeps the database (``runnable``); and a queue that fails
never loses a job, nor makes a user submit it twice.

Every path from database state to queue tasks goes through here: a submit
(``submit``) and a retry (``queue_job``), a worker starting or putting work back
(``queue_runnable``, ``queue_jobs``), and an idle worker's sweep (``runnable``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from nightshift.jobs.vocabulary import Chunk
from nightshift.worker.queue import Queue

if TYPE_CHECKING:
    from nightshift.jobs.store import Store
    from nightshift.jobs.submit import JobOptions

log = logging.getLogger("nightshift.dispatch")


@dataclass(frozen=True)
class Submitted:
    """A stored job and what queueing it did."""

    job_id: str
    requests: int
    queue_tasks: int
    warning: str | None  # the queue failed: the job is stored and runs all the same


def submit(store: Store, stream: BinaryIO, source: str, options: JobOptions,
           model_reference: Callable[[str], str | None],
           queue_url: str | None = None) -> Submitted:
    """Check and store a whole file as one job (``nightshift.jobs.submit.submit``), then queue it.

    Raises:
        InputError: bad lines, an empty file or an unknown model; nothing is stored.
    """
    from nightshift.jobs.submit import submit as store_job

    job_id, count = store_job(store, stream, source, options, model_reference)
    tasks, warning = queue_job(store, job_id, queue_url)
    return Submitted(job_id, count, tasks, warning)


def queue_job(store: Store, job_id: str, queue_url: str | None = None) -> tuple[int, str | None]:
    """Queue the queued requests of a stored job; returns (tasks, None), or (0, warning)
    when the queue could not take them.

    Never raises: the job is committed in the database, the truth, and a worker's sweep
    finds it whatever happens here. An error would make the user submit again, and
    every prompt would run twice.
    """
    try:
        return Queue(queue_url).enqueue(store.chunks(job_id)), None
    except Exception as exc:  # any queue failure: the job runs anyway (see above)
        problem = f"{type(exc).__name__}: {exc}"
    except KeyboardInterrupt:  # must not read as "not submitted": the job is stored
        problem = "interrupted"
    return 0, (f"job {job_id} is stored but could not be queued ({problem}); workers find "
               "it in the database (a running one within seconds, any other when it "
               "starts): do not submit it again")


def runnable(store: Store, model: str | None = None,
             skip_models: Collection[str] = ()) -> list[Chunk]:
    """The chunks of queued requests that may start now, highest priority first (of
    ``model``'s jobs, and not of ``skip_models``): what an idle worker's sweep takes.
    The store reads only jobs whose start time has come."""
    return [c for c in store.runnable_chunks(model) if c.model not in skip_models]


def queue_runnable(store: Store, queue: Queue, model: str | None = None,
                   skip_models: Collection[str] = ()) -> int:
    """Queue tasks for every chunk that may start now (a worker starting: tasks lost
    with a queue or a crash are made again); returns how many."""
    return _queue_chunks(queue, runnable(store, model, skip_models))


def queue_jobs(store: Store, queue: Queue, job_ids: Iterable[str]) -> int:
    """Queue tasks for the queued requests of these jobs (a worker putting its
    in-flight requests back, for the next worker); returns how many."""
    return _queue_chunks(queue, [c for job in job_ids for c in store.chunks(job)])


def _queue_chunks(queue: Queue, chunks: list[Chunk]) -> int:
    """A queue that fails (Redis down, say) is logged, not fatal: the database holds the
    work and every worker sweeps it."""
    try:
        return queue.enqueue(chunks)
    except Exception:
        log.exception("could not queue %d tasks; workers find the work in the database",
                      len(chunks))
        return 0
