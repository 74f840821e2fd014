"""Where jobs, requests, results and worker heartbeats are kept: the source of truth.

The queue only carries ids. Every state change of a request happens here, in one
transaction, guarded by the state it is expected to be in, so a request can be
claimed by one worker only and its result is stored exactly once.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import orjson
from nightshift.jobs import hosts, migrations, schema, settings
from nightshift.jobs.errors import ConfigError, NightshiftError, job_not_found
from nightshift.jobs.formats import Params, RequestSpec
from nightshift.jobs.reads import JobSummary, Reads, db_now_sql
from nightshift.jobs.schema import jobs, model_switches, requests, workers
from nightshift.jobs.vocabulary import (
    CANCELLED,
    DONE,
    EXPIRED,
    FAILED,
    QUEUED,
    RUNNING,
    Chunk,
    Claimed,
    Recovered,
    Result,
    WorkerState,
    count_column,
)
from sqlalchemy import (
    Connection,
    Engine,
    and_,
    case,
    create_engine,
    event,
    func,
    inspect,
    literal_column,
    or_,
    select,
    text,
)
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

# SQLite settings, chosen on purpose (see README "Guarantees"):
# - WAL: readers (status, export) never block the worker's writes, nor it theirs.
# - synchronous=FULL: a commit is on disk before it returns, so a result reported
#   done survives a power cut (NORMAL may lose the last commits in WAL mode).
# - busy_timeout: concurrent writers wait their turn instead of failing with
#   "database is locked"; writes take the lock up front (BEGIN IMMEDIATE), because
#   a deferred transaction that upgrades to a write is not retried by SQLite.
SQLITE_PRAGMAS = ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=60000", "foreign_keys=ON")
# Request rows per write transaction of a submit: a few tens of milliseconds of
# holding the write lock, and commits rare enough to keep ingest fast.
INSERT_BATCH = 4000
# A transient database error (a deadlock, a serialization failure, "database is
# locked", a dropped connection) is retried with backoff for this long before it is
# reported: a worker must not end its night over one.
RETRY_SECONDS = 120.0
# PostgreSQL error classes that a retry of the whole transaction can cure: deadlock,
# serialization failure, lock not available; class 08 is a lost connection.
_TRANSIENT_SQLSTATES = {"40P01", "40001", "55P03"}
log = logging.getLogger("nightshift.store")
# Why a request is expired, in its error (the export's and the error file's message).
EXPIRED_ERROR = "not finished by the job's deadline (submit --deadline, completion_window)"


def new_job_id() -> str:
    """A random job id: 48 bits, so a collision is unlikely before millions of jobs
    (32 bits met one every few tens of thousands); ``Store._unused_job_id`` checks."""
    return secrets.token_hex(6)


def worker_identity() -> tuple[str, str, int]:
    """(worker id, host id, pid) for a worker starting in this process."""
    host, pid = hosts.host_id(), os.getpid()
    return f"{host}:{pid}:{time.time():.0f}", host, pid


def _transient(exc: DBAPIError) -> bool:
    """Whether retrying the whole transaction can cure ``exc``."""
    if exc.connection_invalidated:
        return True
    code = getattr(exc.orig, "sqlstate", None)
    if code:
        return code in _TRANSIENT_SQLSTATES or code.startswith("08")
    text_ = str(exc.orig).lower()
    return isinstance(exc, OperationalError) and ("locked" in text_ or "busy" in text_)


def _retrying(method):
    """Rerun a Store method whose transaction failed for a transient reason, with
    backoff, for up to RETRY_SECONDS; each retry is logged. The method must be one
    transaction (or several that may each run again)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        deadline = time.monotonic() + RETRY_SECONDS
        delay = 0.05
        while True:
            try:
                return method(self, *args, **kwargs)
            except DBAPIError as exc:
                if not _transient(exc) or time.monotonic() > deadline:
                    raise
                reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
                log.warning("%s: %s; retrying in %.2f s", method.__name__, reason, delay)
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)

    return wrapper


class Store(Reads):
    """The results database. Open one per process; it is safe to share between threads.

    The reads `status` shows (``job``, ``list_jobs``, ``request_stats``, ...) are
    jobs/reads.py's, run here through SQLAlchemy.
    """

    def __init__(self, url: str | None = None):
        self.url = url or settings.database_url()
        self.engine = _make_engine(self.url)
        self.dialect = self.engine.dialect.name
        # Checked first in a read: a read command (status, export) then never waits
        # for the write lock, which a worker or a big submit may hold.
        with self.read() as conn:
            current = _migrated(conn)
        if not current:
            with self.write() as conn:
                migrations.apply(conn)

    def close(self) -> None:
        self.engine.dispose()

    # -- transactions ---------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction, holding the write lock from its first statement."""
        with self.engine.connect() as conn:
            conn.execution_options(nightshift_begin="BEGIN IMMEDIATE")
            with conn.begin():
                yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction: one consistent snapshot, never a half-written job."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def _rows(self, sql: str, params: dict | None = None) -> list[dict]:
        with self.read() as conn:
            return [dict(r) for r in conn.execute(text(sql), params or {}).mappings()]

    # -- submission -----------------------------------------------------------

    def create_job(
        self,
        *,
        model: str | Callable[[], str],
        defaults: dict,
        specs: Iterable[RequestSpec],
        name: str | None = None,
        source: str | None = None,
        priority: int = 0,
        not_before: float | None = None,
        deadline: float | None = None,
        notify: str | None = None,
        input_columns: str | Callable[[], str | None] | None = None,
    ) -> tuple[str, int]:
        """Store a job and all its requests, whole or not at all; returns (id, count).

        The rows go in INSERT_BATCH at a time, one short transaction each, so a file of
        any size holds the write lock for moments only: workers' heartbeats and results
        get in between. Until the last transaction the job is partial: it names its
        submitter and its counts are 0, so no listing, count, sweep or claim sees it. A
        file of one batch is one transaction.

        If iterating ``specs`` raises (jobs/submit.py raises InputError there after the
        last line when some were bad; or an interrupt), or ``model`` does, the rows
        stored are removed, in short transactions too, and the exception goes on.
        ``model`` may be a callable, asked once every line was read (the lines may name
        it); so may ``input_columns`` (a table's columns, ``jobs.input_columns``: a JSONL
        table's types are known once every row was read). Rows left by a killed process
        are removed by ``remove_abandoned_jobs``.

        Raises:
            NightshiftError: the partial job was taken as abandoned and removed meanwhile.
        """
        job = {"id": self._unused_job_id(), "name": name, "model": "", "source": source,
               "priority": priority, "not_before": not_before, "deadline": deadline,
               "notify": notify,
               "defaults": json.dumps(defaults), "total": 0, "created_at": time.time(),
               "prompt_tokens": 0, "completion_tokens": 0, "submitter": submitter_identity()}
        count = 0
        begun = False  # a transaction may have stored the job row
        try:
            batch: list[tuple] = []
            for spec in specs:
                batch.append(_request_row(job["id"], count, spec))
                count += 1
                if len(batch) >= INSERT_BATCH:
                    first, begun = not begun, True
                    with self._storing(job, first) as conn:
                        _request_inserter(conn)(batch)
                    batch = []
            if callable(model):
                model = model()
            if callable(input_columns):
                input_columns = input_columns()
            first, begun = not begun, True
            with self._storing(job, first) as conn:
                if batch:
                    _request_inserter(conn)(batch)
                # Whole: from this commit on it is listed, counted, swept and claimed.
                conn.execute(
                    jobs.update().where(jobs.c.id == job["id"])
                    .values(total=count, model=model, submitter=None, submit_touched_at=None,
                            input_columns=input_columns, **{count_column(QUEUED): count})
                )
        except BaseException:
            if begun:
                self._remove_partial(job["id"], job["submitter"])
            raise
        return job["id"], count

    def _unused_job_id(self) -> str:
        with self.read() as conn:
            while True:
                job_id = new_job_id()
                if conn.execute(select(jobs.c.id).where(jobs.c.id == job_id)).first() is None:
                    return job_id

    @contextmanager
    def _storing(self, job: dict, first: bool) -> Iterator[Connection]:
        """A write transaction adding to a partial job: the first stores the job row;
        each later one checks the job is still this submitter's, and marks it touched."""
        now = time.time()
        with self.write() as conn:
            if first:
                conn.execute(jobs.insert().values(**job, submit_touched_at=now))
            elif not _touch(conn, job["id"], job["submitter"], now):
                raise NightshiftError(
                    f"job {job['id']} was removed while it was being stored: it was taken as "
                    f"abandoned (nothing stored for {settings.SUBMIT_STALE_SECONDS:.0f} s); "
                    "submit the file again"
                )
            yield conn

    def remove_abandoned_jobs(self, now: float | None = None) -> list[str]:
        """Remove the partial jobs whose submitter is gone: its process ended
        (``submitter_gone``) or it stored nothing for SUBMIT_STALE_SECONDS. That is what a
        killed submit leaves. Returns their ids."""
        now = now or time.time()
        with self.read() as conn:
            partial = conn.execute(
                select(jobs.c.id, jobs.c.submitter, jobs.c.submit_touched_at)
                .where(jobs.c.submitter.is_not(None))
            ).all()
        return [
            job_id for job_id, owner, touched in partial
            if (now - (touched or 0) > settings.SUBMIT_STALE_SECONDS or submitter_gone(owner))
            and self._remove_partial(job_id, owner)
        ]

    def _remove_partial(self, job_id: str, owner: str) -> bool:
        """Remove a partial job that ``owner`` holds, INSERT_BATCH rows per transaction;
        returns whether this call removed it.

        The remover takes the job over first (it becomes its submitter), so two never
        remove one job at once, and a removal cut short is finished by a later one.
        """
        me = submitter_identity()
        while True:
            with self.write() as conn:
                if not _touch(conn, job_id, owner, time.time(), new_owner=me):
                    return False  # made whole, removed, or taken over by another
                owner = me
                top = conn.execute(
                    select(func.max(requests.c.seq)).where(requests.c.job_id == job_id)
                ).scalar()
                if top is None:
                    conn.execute(jobs.delete().where(jobs.c.id == job_id))
                    return True
                # Sequence numbers run 0..n-1 without gaps: the last INSERT_BATCH of them.
                conn.execute(requests.delete().where(requests.c.job_id == job_id,
                                                     requests.c.seq > top - INSERT_BATCH))

    # -- what the queue carries ------------------------------------------------

    def chunks(self, job_id: str, statuses: tuple[str, ...] = (QUEUED,)) -> list[Chunk]:
        """The ranges covering a job's requests in ``statuses``, for enqueueing."""
        with self.read() as conn:
            job = _job_row(conn, job_id)
            seqs = conn.execute(
                select(requests.c.seq)
                .where(requests.c.job_id == job_id, requests.c.status.in_(statuses))
                .order_by(requests.c.seq)
            ).scalars()
            return list(_ranges(job, seqs))

    @_retrying
    def runnable_chunks(self, model: str | None = None, now: float | None = None) -> list[Chunk]:
        """The ranges of the queued requests that may start now (of ``model``'s jobs),
        highest priority first. Jobs held for later cost nothing here: a worker sweeps
        this every second while idle, and a million-line job for tomorrow night must
        not be read each time."""
        query = select(jobs).where(*_runnable_where(now or time.time()))
        if model is not None:
            query = query.where(jobs.c.model == model)
        with self.read() as conn:
            found = []
            for job in conn.execute(query.order_by(jobs.c.priority.desc(), jobs.c.created_at)):
                seqs = conn.execute(
                    select(requests.c.seq)
                    .where(requests.c.job_id == job.id, requests.c.status == QUEUED)
                    .order_by(requests.c.seq)
                ).scalars()
                found.extend(_ranges(job, seqs))
            return found

    # -- the worker's side -----------------------------------------------------

    @_retrying
    def claim(self, chunk: Chunk, worker_id: str, limit: int, *,
              spread: bool = False) -> list[Claimed]:
        """Take up to ``limit`` queued requests of a chunk for this worker, in input order;
        with ``spread``, a share of every size instead (``spread_by_size``): a worker
        taking its fair share of a job that others share too.

        Hands out exactly the rows this transaction moved to running, so two workers
        never get the same request. Requests lost with a dead worker are left to
        ``claim_lost``, which runs them apart from healthy work.
        """
        with self.write() as conn:
            [job] = _lock_jobs(conn, [chunk.job_id]) or [None]
            if (job is None or job.cancelled_at is not None or job.submitter is not None
                    or _past(job.deadline)):
                return []
            queued = (
                requests.c.job_id == chunk.job_id,
                requests.c.seq.between(chunk.lo, chunk.hi),
                requests.c.status == QUEUED,
                requests.c.lost == 0,
            )
            if spread:
                sizes = conn.execute(select(requests.c.id, func.length(requests.c.body))
                                     .where(*queued).order_by(requests.c.seq)).all()
                pick = spread_by_size(sizes, limit)
            else:
                pick = select(requests.c.id).where(*queued).order_by(requests.c.seq).limit(limit)
            rows = _move(conn, QUEUED, RUNNING, requests.c.id.in_(pick), jobs_locked=True,
                         returning=_CLAIM_COLUMNS, worker_id=worker_id,
                         attempts=requests.c.attempts + 1)
        return _claimed(rows, {job.id: job})

    @_retrying
    def claim_lost(self, worker_id: str, model: str, group: int) -> list[Claimed]:
        """Take requests whose worker died while running them, to run apart from others.

        The most-lost come first: lost twice or more, one alone; lost once, up to
        ``group`` together, all lost the same number of times. So the request that
        kills the process is found in a few deaths, without healthy work dying with it.
        """
        now = time.time()
        with self.write() as conn:
            runnable = _runnable_jobs(now).where(jobs.c.model == model)
            top = conn.execute(
                select(requests.c.lost)
                .where(requests.c.status == QUEUED, requests.c.lost > 0,
                       requests.c.job_id.in_(runnable))
                .order_by(requests.c.lost.desc()).limit(1)
            ).scalar()
            if top is None:
                return []
            pick = (
                select(requests.c.id)
                .join(jobs, jobs.c.id == requests.c.job_id)
                .where(requests.c.status == QUEUED, requests.c.lost == top,
                       requests.c.job_id.in_(runnable))
                .order_by(jobs.c.priority.desc(), jobs.c.created_at, requests.c.seq)
                .limit(1 if top >= 2 else group)
            )
            ids = list(conn.execute(pick).scalars())
            rows = _move(conn, QUEUED, RUNNING, requests.c.id.in_(ids),
                         returning=_CLAIM_COLUMNS, worker_id=worker_id,
                         attempts=requests.c.attempts + 1)
            held = {j.id: j for j in conn.execute(
                select(jobs).where(jobs.c.id.in_({r.job_id for r in rows})))}
        return _claimed(rows, held)

    @_retrying
    def has_lost(self, model: str) -> bool:
        """Whether requests of ``model`` lost with a dead worker wait to run now."""
        with self.read() as conn:
            return conn.execute(
                select(requests.c.id).where(
                    requests.c.status == QUEUED, requests.c.lost > 0,
                    requests.c.job_id.in_(_runnable_jobs(time.time())
                                          .where(jobs.c.model == model)),
                ).limit(1)
            ).first() is not None

    @_retrying
    def finish(self, results: list[Result], worker_id: str, peak_memory: int | None = None) -> int:
        """Store results of requests this worker holds, in one transaction.

        A result is stored only if the request is still running under this worker,
        so a request put back (or taken over after a crash) is never written twice.
        Returns how many were stored.
        """
        stored = 0
        with self.write() as conn:
            _lock_jobs(conn, {r.job_id for r in results})
            per_job: dict[str, list[Result]] = {}
            for r in results:
                done = conn.execute(
                    requests.update()
                    .where(
                        requests.c.id == r.id,
                        requests.c.status == RUNNING,
                        requests.c.worker_id == worker_id,
                    )
                    .values(
                        status=r.status, started_at=r.started_at,
                        first_token_at=r.first_token_at, finished_at=r.finished_at,
                        response=r.response, finish_reason=r.finish_reason,
                        prompt_tokens=r.prompt_tokens, cached_tokens=r.cached_tokens,
                        completion_tokens=r.completion_tokens, error=r.error,
                        prompt_tps=r.prompt_tps, generation_tps=r.generation_tps,
                        logprobs=_json_or_none(r.logprobs), choices=_json_or_none(r.choices),
                        reasoning=r.reasoning,
                    )
                ).rowcount
                if done:
                    stored += 1
                    per_job.setdefault(r.job_id, []).append(r)
            for job_id, rs in sorted(per_job.items()):
                _add_to_job_totals(conn, job_id, rs, peak_memory)
        return stored

    @_retrying
    def release(self, ids: list[int], worker_id: str) -> int:
        """Put requests this worker holds back in the queue state; returns how many."""
        if not ids:
            return 0
        with self.write() as conn:
            return len(_move(conn, RUNNING, QUEUED, requests.c.id.in_(ids),
                             requests.c.worker_id == worker_id, worker_id=None))

    @_retrying
    def held_by(self, worker_id: str) -> set[int]:
        """The ids of the requests running under this worker, as the database has them."""
        with self.read() as conn:
            return set(conn.execute(select(requests.c.id).where(
                requests.c.status == RUNNING, requests.c.worker_id == worker_id)).scalars())

    @_retrying
    def recover(self, worker_id: str,
                max_attempts: int = settings.DEFAULT_MAX_ATTEMPTS) -> Recovered:
        """Take back requests left running by workers that are gone.

        A worker is gone when it said it stopped, its heartbeat is stale on the
        database's clock, or it ran on this host (same host id: machine, boot and pid
        namespace) and its process no longer exists, or is this very process. Each
        request taken back counts one more loss; one lost ``max_attempts`` times is
        failed with the reason, the others are queued again.
        """
        now = time.time()
        with self.write() as conn:
            holders = conn.execute(
                select(requests.c.worker_id).where(requests.c.status == RUNNING).distinct()
            ).scalars().all()
            age = (literal_column(db_now_sql(conn.dialect.name)) - workers.c.heartbeat_at)
            gone = []
            for holder in holders:
                if holder == worker_id:
                    continue
                w = conn.execute(select(workers, age.label("age"))
                                 .where(workers.c.id == holder)).first()
                if (
                    w is None
                    or w.stopped_at is not None
                    or w.age > settings.HEARTBEAT_STALE_SECONDS
                    or hosts.on_this_host_and_gone(w.host, w.pid)
                ):
                    gone.append(holder)
            if not gone:
                return Recovered(0, 0)
            theirs = requests.c.worker_id.in_(gone)
            failed = _move(
                conn, RUNNING, FAILED, theirs, requests.c.lost + 1 >= max_attempts,
                lost=requests.c.lost + 1, started_at=now, finished_at=now,
                error=f"the worker died {max_attempts} times while running it "
                      "(worker --max-attempts): it may crash the model; check it, then "
                      "nightshift retry the job")
            requeued = _move(conn, RUNNING, QUEUED, theirs, lost=requests.c.lost + 1,
                             worker_id=None)
            return Recovered(len(requeued), len(failed))

    @_retrying
    def ended_among(self, job_ids: Iterable[str]) -> dict[str, str]:
        """Which of these jobs were cancelled, or are past their deadline: each with the
        status its running requests end in (cancelled, expired)."""
        ids = list(job_ids)
        if not ids:
            return {}
        now = time.time()
        with self.read() as conn:
            rows = conn.execute(select(jobs.c.id, jobs.c.cancelled_at).where(
                jobs.c.id.in_(ids),
                or_(jobs.c.cancelled_at.is_not(None), jobs.c.deadline <= now))).all()
        return {r.id: CANCELLED if r.cancelled_at is not None else EXPIRED for r in rows}

    @_retrying
    def mark_dropped(self, ids: list[int], worker_id: str, status: str = CANCELLED) -> int:
        """Mark requests this worker dropped because their job was cancelled, or passed
        its deadline (``status`` expired)."""
        if not ids:
            return 0
        now = time.time()
        with self.write() as conn:
            return len(_move(conn, RUNNING, status, requests.c.id.in_(ids),
                             requests.c.worker_id == worker_id, finished_at=now,
                             error=EXPIRED_ERROR if status == EXPIRED else None))

    @_retrying
    def expire(self, now: float | None = None) -> dict[str, int]:
        """Expire the queued requests of jobs past their deadline (running ones are
        dropped by the workers that hold them: ``ended_among``); returns how many of
        each job. A read when there are none: every worker asks at each heartbeat."""
        now = now or time.time()
        due = (jobs.c.deadline <= now, _queued_count() > 0, jobs.c.submitter.is_(None))
        with self.read() as conn:
            if conn.execute(select(jobs.c.id).where(*due).limit(1)).first() is None:
                return {}
        with self.write() as conn:
            ids = conn.execute(select(jobs.c.id).where(*due)).scalars().all()
            _lock_jobs(conn, ids)
            moved = Counter(r.job_id for r in _move(
                conn, QUEUED, EXPIRED, requests.c.job_id.in_(ids), jobs_locked=True,
                finished_at=now, error=EXPIRED_ERROR))
            conn.execute(jobs.update().where(jobs.c.id.in_(ids), jobs.c.expired_at.is_(None))
                         .values(expired_at=now))
        return dict(moved)

    @_retrying
    def fail_model(self, model: str, error: str) -> int:
        """Fail the requests of a model's jobs that could run now (the model cannot be
        loaded); jobs held for later (``--at``) and cancelled ones are untouched."""
        now = time.time()
        with self.write() as conn:
            return len(_move(conn, QUEUED, FAILED,
                             requests.c.job_id.in_(_runnable_jobs(now)
                                                   .where(jobs.c.model == model)),
                             error=error, started_at=now, finished_at=now))

    @_retrying
    def claim_notifications(self) -> list[tuple[JobSummary, str]]:
        """Ended jobs whose ``--notify`` command has not run, each with its command,
        marked as handed out: one caller gets each, whatever else is looking."""
        ended = (jobs.c.notify.is_not(None), jobs.c.notified_at.is_(None),
                 jobs.c.submitter.is_(None), jobs.c.total > 0,
                 jobs.c[count_column(QUEUED)] == 0, jobs.c[count_column(RUNNING)] == 0)
        # Every worker asks at each heartbeat: a read, and the write lock only for an end.
        with self.read() as conn:
            if conn.execute(select(jobs.c.id).where(*ended).limit(1)).first() is None:
                return []
        claimed = []
        with self.write() as conn:
            for row in conn.execute(select(jobs).where(*ended)).all():
                if conn.execute(jobs.update().where(jobs.c.id == row.id, *ended)
                                .values(notified_at=time.time())).rowcount:
                    claimed.append((JobSummary.from_row(row._mapping), row.notify))
        return claimed

    # -- user commands ----------------------------------------------------------

    @_retrying
    def cancel(self, job_id: str) -> int:
        """Stop a job's unstarted requests from running; returns how many were cancelled."""
        with self.write() as conn:
            _lock_whole_job(conn, job_id)
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.cancelled_at.is_(None))
                .values(cancelled_at=time.time())
            )
            return len(_move(conn, QUEUED, CANCELLED, requests.c.job_id == job_id,
                             jobs_locked=True))

    @_retrying
    def retry(self, job_id: str) -> int:
        """Queue a job's failed and expired requests again, with their losses forgiven;
        returns how many. A deadline that has passed is lifted: asking again is asking
        for the answers."""
        with self.write() as conn:
            job = _lock_whole_job(conn, job_id)
            # Ended again later: --notify runs again then.
            lifted = {"deadline": None, "expired_at": None} if _past(job.deadline) else {}
            conn.execute(jobs.update().where(jobs.c.id == job_id)
                         .values(cancelled_at=None, notified_at=None, **lifted))
            again = dict(jobs_locked=True, error=None, worker_id=None, response=None,
                         finish_reason=None, started_at=None, first_token_at=None,
                         finished_at=None, lost=0)
            return sum(len(_move(conn, status, QUEUED, requests.c.job_id == job_id, **again))
                       for status in (FAILED, EXPIRED))

    # -- reading -----------------------------------------------------------------

    @_retrying
    def has_runnable(self, model: str | None = None, now: float | None = None) -> bool:
        """Whether any queued request could start now (of ``model``'s jobs)."""
        query = _runnable_jobs(now or time.time()).limit(1)
        if model is not None:
            query = query.where(jobs.c.model == model)
        with self.read() as conn:
            return conn.execute(query).first() is not None

    @_retrying
    def fair_share(self, model: str) -> int:
        """How many requests of ``model`` one worker serving it should hold at most now:
        the model's outstanding work (queued and may start now, or running) over the
        live workers that have it loaded, rounded up (at least 1).

        A worker that fills its whole batch from a small job leaves the others idle;
        holding no more than a fair share spreads a job over every worker (the
        processes of ``worker --processes``, say), and a large job still fills each
        worker's batch.
        """
        runnable = and_(*_runnable_where(time.time()), jobs.c.model == model)
        running = jobs.c[count_column(RUNNING)]
        with self.read() as conn:
            outstanding = conn.execute(select(func.coalesce(func.sum(
                case((runnable, _queued_count()), else_=0) + running), 0))
                .where(jobs.c.model == model)).scalar()
            now = literal_column(db_now_sql(conn.dialect.name))
            serving = conn.execute(select(func.count()).select_from(workers).where(
                workers.c.model == model, workers.c.stopped_at.is_(None),
                workers.c.state.in_([WorkerState.IDLE, WorkerState.RUNNING]),
                workers.c.heartbeat_at >= now - settings.HEARTBEAT_STALE_SECONDS)).scalar()
        return max(1, -(-int(outstanding) // max(1, serving)))

    # -- workers -----------------------------------------------------------------

    @_retrying
    def register_worker(self, worker_id: str, host: str, pid: int, serves: str | None) -> None:
        with self.write() as conn:
            now = literal_column(db_now_sql(conn.dialect.name))
            conn.execute(
                workers.insert().values(
                    id=worker_id, host=host, pid=pid, serves=serves, state=WorkerState.LOADING,
                    started_at=now, heartbeat_at=now,
                )
            )

    @_retrying
    def update_worker(self, worker_id: str, **values) -> None:
        """Record a worker's heartbeat (on the database's clock, which every host
        shares) and whatever else it reports."""
        with self.write() as conn:
            values.setdefault("heartbeat_at", literal_column(db_now_sql(conn.dialect.name)))
            conn.execute(workers.update().where(workers.c.id == worker_id).values(**values))

    @_retrying
    def record_switch(self, worker_id: str, from_model: str | None, to_model: str,
                      unload_seconds: float, load_seconds: float, warmup_seconds: float) -> None:
        with self.write() as conn:
            conn.execute(
                model_switches.insert().values(
                    worker_id=worker_id, from_model=from_model, to_model=to_model,
                    unload_seconds=unload_seconds, load_seconds=load_seconds,
                    warmup_seconds=warmup_seconds, at=time.time(),
                )
            )


# -- helpers ----------------------------------------------------------------------


def _make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        # The driver is imported here, not on connecting: name the extra that installs it.
        # The URL is not quoted: it may hold a password.
        where = f"--database-url / {settings.DATABASE_URL_ENV}"
        try:
            return create_engine(url, pool_pre_ping=True)
        except ImportError as e:
            if url.startswith("postgres"):
                # The extra installs psycopg (3), the driver SQLAlchemy 2.1 picks for
                # postgresql://; 2.0 and postgresql+psycopg2:// ask for psycopg2.
                fix = "pip install 'nightshift[postgres]'"
                if e.name == "psycopg2":
                    fix += " and write the URL as postgresql+psycopg://..."
                raise ConfigError(f"{where} is a PostgreSQL URL, but its driver "
                                  f"({e.name or e}) is not installed: {fix}") from e
            raise ConfigError(f"{where}: its database driver ({e.name or e}) is not "
                              "installed: pip install it") from e
        except ArgumentError as e:
            raise ConfigError(f"{where} is not a database URL SQLAlchemy can use: {e} "
                              "(e.g. postgresql://user@host/db)") from e
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Let SQLAlchemy's "begin" event, not pysqlite, decide how transactions start.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        for pragma in SQLITE_PRAGMAS:
            _sqlite_pragma(cur, pragma)
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql(conn.get_execution_options().get("nightshift_begin", "BEGIN"))

    return engine


def _sqlite_pragma(cur, pragma: str) -> None:
    """Run a PRAGMA; the switch to WAL of a new file can meet another process's first
    open and fail "database is locked" at once, without the busy timeout: retried."""
    import sqlite3

    deadline = time.monotonic() + 60
    while True:
        try:
            cur.execute(f"PRAGMA {pragma}")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


_REQUEST_COLUMNS = ("job_id", "seq", "line_no", "custom_id", "kind", "body", "params",
                    "metadata", "status", "attempts", "input_row")
_NO_PARAMS = Params()


def _request_inserter(conn: Connection) -> Callable[[list[tuple]], None]:
    """A function that inserts request rows (tuples in ``_REQUEST_COLUMNS`` order).

    SQLite gets them through the driver's own executemany: SQLAlchemy's per-row
    parameter processing was about a third of the time of a million-line submit.
    """
    if conn.dialect.name == "sqlite":
        sql = (f"INSERT INTO requests ({', '.join(_REQUEST_COLUMNS)}) "
               f"VALUES ({', '.join('?' * len(_REQUEST_COLUMNS))})")
        return lambda rows: conn.exec_driver_sql(sql, rows)
    return lambda rows: conn.execute(
        requests.insert(), [dict(zip(_REQUEST_COLUMNS, row)) for row in rows])


def _request_row(job_id: str, seq: int, spec) -> tuple:
    body = spec.messages if spec.kind == "chat" else spec.prompt
    params = None if spec.params == _NO_PARAMS else spec.params.to_json()
    return (
        job_id, seq, spec.line_no, spec.custom_id, spec.kind, orjson.dumps(body).decode(),
        orjson.dumps(params).decode() if params else None,
        orjson.dumps(spec.metadata).decode() if spec.metadata is not None else None,
        QUEUED, 0, spec.row,
    )


def _migrated(conn: Connection) -> bool:
    """Whether every migration is applied already."""
    if not inspect(conn).has_table(schema.migrations.name):
        return False
    done = set(conn.execute(select(schema.migrations.c.name)).scalars())
    return set(migrations.names()) <= done


def _job_row(conn: Connection, job_id: str):
    """A whole job's row; a job still being stored is not found."""
    row = conn.execute(
        select(jobs).where(jobs.c.id == job_id, jobs.c.submitter.is_(None))).first()
    if row is None:
        raise job_not_found(job_id)
    return row


def submitter_identity() -> str:
    """Who is storing a job, as ``jobs.submitter`` records it: host id and pid. Read
    back only by ``submitter_gone``."""
    return f"{hosts.host_id()}:{os.getpid()}"


def submitter_gone(identity: str) -> bool:
    """Whether the process named by a ``submitter_identity`` has ended: it ran on this
    host and its pid is gone. Never this process (another thread may be submitting); a
    submitter on another host looks alive: SUBMIT_STALE_SECONDS covers those."""
    host, _, pid = identity.rpartition(":")
    if host != hosts.host_id() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    return not hosts.pid_alive(int(pid))


def _touch(conn: Connection, job_id: str, owner: str, now: float,
           new_owner: str | None = None) -> bool:
    """Mark a partial job as still worked on by ``owner`` (handing it to ``new_owner``);
    False when ``owner`` no longer holds it (made whole, removed or taken over)."""
    values = {"submit_touched_at": now, **({"submitter": new_owner} if new_owner else {})}
    return conn.execute(
        jobs.update().where(jobs.c.id == job_id, jobs.c.submitter == owner).values(**values)
    ).rowcount == 1


def _ranges(job, seqs: Iterable[int]) -> Iterator[Chunk]:
    """Group sorted sequence numbers into chunks of at most CHUNK_SIZE requests."""
    lo = prev = None
    for seq in seqs:
        if lo is None:
            lo = prev = seq
        elif seq - lo >= settings.CHUNK_SIZE:
            yield Chunk(job.id, lo, prev, job.priority, job.not_before, job.model)
            lo = prev = seq
        else:
            prev = seq
    if lo is not None:
        yield Chunk(job.id, lo, prev, job.priority, job.not_before, job.model)


def _queued_count():
    return jobs.c[count_column(QUEUED)]


def _counts_moved(deltas: dict[str, int]) -> dict:
    """``jobs`` column updates that move ``deltas`` requests between statuses."""
    return {count_column(s): jobs.c[count_column(s)] + n for s, n in deltas.items() if n}


def _json_or_none(value) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _lock_jobs(conn: Connection, job_ids: Iterable[str]) -> list:
    """Lock these jobs' rows (PostgreSQL), in id order; returns the rows found.

    Every transaction that changes requests locks their jobs first, in one order, so
    two transactions never wait for each other's locks in a circle (a claim and a
    cancel did: request rows then job row, against job row then request rows). On
    SQLite the transaction holds the whole database already.
    """
    ids = sorted(set(job_ids))
    if not ids:
        return []
    query = select(jobs).where(jobs.c.id.in_(ids)).order_by(jobs.c.id)
    if conn.dialect.name != "sqlite":
        query = query.with_for_update()
    return conn.execute(query).all()


def _lock_whole_job(conn: Connection, job_id: str):
    """Lock a job's row (``_lock_jobs``); NotFound if there is none, or it is still
    being stored (a partial job is nobody's to change)."""
    [job] = _lock_jobs(conn, [job_id]) or [None]
    if job is None or job.submitter is not None:
        raise job_not_found(job_id)
    return job


def _runnable_where(now: float) -> tuple:
    """The conditions on a job whose queued requests may start at ``now``."""
    return (_queued_count() > 0, jobs.c.cancelled_at.is_(None),
            or_(jobs.c.not_before.is_(None), jobs.c.not_before <= now),
            or_(jobs.c.deadline.is_(None), jobs.c.deadline > now))


def _past(deadline: float | None) -> bool:
    return deadline is not None and deadline <= time.time()


def _runnable_jobs(now: float):
    """The ids of jobs whose queued requests may start at ``now``."""
    return select(jobs.c.id).where(*_runnable_where(now))


_CLAIM_COLUMNS = (requests.c.id, requests.c.seq, requests.c.kind, requests.c.body,
                  requests.c.params, requests.c.lost)


def spread_by_size(sizes: list[tuple[int, int]], limit: int) -> list[int]:
    """``limit`` of the ``(id, size)`` pairs' ids, a share of every size: ranked by size,
    one from each of ``limit`` equal windows, the first of one window and the last of
    the next (a snake draft), so the sizes left for the others add up alike.

    Workers that split a small job each take a fair share of its requests; taken in
    input order, the benchmark's 64 prompts gave two processes 4,003 and 3,400 prompt
    tokens, and one ended 1.1-1.8 s after the other. Spread, 3,713 and 3,690.
    """
    if limit >= len(sizes):
        return [i for i, _ in sizes]
    ranked = [i for i, _ in sorted(sizes, key=lambda pair: -pair[1])]  # stable: input order
    width = len(ranked) / limit
    return [ranked[int(w * width) if w % 2 == 0 else int((w + 1) * width) - 1]
            for w in range(limit)]


def _claimed(rows, job_rows: dict) -> list[Claimed]:
    """Claimed requests from moved rows (``_CLAIM_COLUMNS`` + job_id), in input order."""
    settings_of = {}
    for job_id, job in job_rows.items():
        defaults = json.loads(job.defaults)
        system = defaults.pop("system", None)
        defaults.pop("raw", None)
        settings_of[job_id] = (defaults, system)
    out = []
    for r in sorted(rows, key=lambda r: (r.job_id, r.seq)):
        defaults, system = settings_of[r.job_id]
        params = dict(defaults)
        if r.params:
            params.update(json.loads(r.params))
        out.append(Claimed(r.id, r.job_id, r.seq, r.kind, orjson.loads(r.body), params, system,
                           r.lost))
    return out


def _move(conn: Connection, frm: str, to: str, *where, jobs_locked: bool = False,
          returning=(), **values) -> list:
    """Move the requests in status ``frm`` that match ``where`` to status ``to`` (setting
    ``values``), and their jobs' per-status counts with them, in the caller's
    transaction. Returns the moved rows: their job_id and the ``returning`` columns.

    Their jobs are locked first (``_lock_jobs``) unless the caller did. RETURNING names
    exactly the rows this statement changed, so the counts stay right, and a claim
    hands out only what it took, whatever another transaction did in between
    (PostgreSQL's READ COMMITTED included).
    """
    match = (requests.c.status == frm, *where)
    if not jobs_locked and conn.dialect.name != "sqlite":
        _lock_jobs(conn, conn.execute(select(requests.c.job_id).where(*match).distinct())
                   .scalars())
    moved = conn.execute(
        requests.update().where(*match)
        .values(status=to, **values).returning(requests.c.job_id, *returning)
    ).all()
    for job_id, n in sorted(Counter(r.job_id for r in moved).items()):
        conn.execute(jobs.update().where(jobs.c.id == job_id)
                     .values(**_counts_moved({frm: -n, to: n})))
    return moved


def _add_to_job_totals(conn: Connection, job_id: str, results: list[Result], peak) -> None:
    """Move stored results' requests out of running in the job's counts, and add them to
    its running totals."""
    done = [r for r in results if r.error is None]
    prompt_rates = [r.prompt_tps for r in done if r.prompt_tps is not None]
    first = min(r.started_at for r in results)
    last = max(r.finished_at for r in results)
    values = {
        **_counts_moved({RUNNING: -len(results), DONE: len(done),
                         FAILED: len(results) - len(done)}),
        "prompt_tps_sum": jobs.c.prompt_tps_sum + sum(prompt_rates),
        "prompt_tps_n": jobs.c.prompt_tps_n + len(prompt_rates),
        "prompt_tokens": jobs.c.prompt_tokens + sum(r.prompt_tokens or 0 for r in done),
        "completion_tokens": jobs.c.completion_tokens
        + sum(r.completion_tokens or 0 for r in done),
        "started_at": case(
            (or_(jobs.c.started_at.is_(None), jobs.c.started_at > first), first),
            else_=jobs.c.started_at,
        ),
        "finished_at": case(
            (or_(jobs.c.finished_at.is_(None), jobs.c.finished_at < last), last),
            else_=jobs.c.finished_at,
        ),
    }
    if peak is not None:
        values["peak_memory"] = case(
            (or_(jobs.c.peak_memory.is_(None), jobs.c.peak_memory < peak), peak),
            else_=jobs.c.peak_memory,
        )
    conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))


__all__ = ["Store", "worker_identity", "new_job_id", "submitter_identity", "submitter_gone"]
