"""Where jobs, requests, results and worker heartbeats are kept: the source of truth.

The queue only carries ids. Every state change of a request happens here, in one
transaction, guarded by the state it is expected to be in, so a request can be
claimed by one worker only and its result is stored exactly once.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import orjson
from sqlalchemy import (
    Connection,
    Engine,
    case,
    create_engine,
    event,
    func,
    inspect,
    or_,
    select,
    text,
)

from jobs import migrations, schema, settings
from jobs.errors import NightshiftError
from jobs.formats import Params, RequestSpec
from jobs.reads import (
    CANCELLED,
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    TERMINAL,
    JobSummary,
    Reads,
    count_column,
    job_not_found,
    pid_alive,
)
from jobs.schema import jobs, model_switches, requests, workers

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


@dataclass(frozen=True)
class Chunk:
    """A range of a job's requests, as the queue carries it."""

    job_id: str
    lo: int
    hi: int  # inclusive
    priority: int = 0
    not_before: float | None = None
    model: str = ""

    def to_args(self) -> list:
        return [self.job_id, self.lo, self.hi]


@dataclass
class Claimed:
    """A request taken by a worker, with what it needs to run it."""

    id: int
    job_id: str
    seq: int
    kind: str
    body: object  # messages list or prompt string
    params: dict  # job defaults merged with the line's overrides
    system: str | None


@dataclass
class Result:
    """The outcome of one request, as the worker reports it."""

    id: int
    job_id: str
    started_at: float
    finished_at: float
    first_token_at: float | None = None
    response: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None

    @property
    def status(self) -> str:
        return FAILED if self.error is not None else DONE

    @property
    def prompt_tps(self) -> float | None:
        """Prompt tokens computed here (not taken from a shared prefix) per second of
        prefill, from admission to the first token."""
        prefill_time = (self.first_token_at - self.started_at) if self.first_token_at else None
        computed = (self.prompt_tokens or 0) - (self.cached_tokens or 0)
        return computed / prefill_time if prefill_time else None


def new_job_id() -> str:
    return secrets.token_hex(4)


def worker_identity() -> tuple[str, str, int]:
    host, pid = socket.gethostname(), os.getpid()
    return f"{host}:{pid}:{time.time():.0f}", host, pid


class Store(Reads):
    """The results database. Open one per process; it is safe to share between threads.

    The reads `status` shows (``job``, ``list_jobs``, ``request_stats``, ...) are
    jobs/reads.py's, run here through SQLAlchemy.
    """

    def __init__(self, url: str | None = None):
        self.url = url or settings.database_url()
        self.engine = _make_engine(self.url)
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
        it). Rows left by a killed process are removed by ``remove_abandoned_jobs``.

        Raises:
            NightshiftError: the partial job was taken as abandoned and removed meanwhile.
        """
        job = {"id": new_job_id(), "name": name, "model": "", "source": source,
               "priority": priority, "not_before": not_before,
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
            first, begun = not begun, True
            with self._storing(job, first) as conn:
                if batch:
                    _request_inserter(conn)(batch)
                # Whole: from this commit on it is listed, counted, swept and claimed.
                conn.execute(
                    jobs.update().where(jobs.c.id == job["id"])
                    .values(total=count, model=model, submitter=None, submit_touched_at=None,
                            **{count_column(QUEUED): count})
                )
        except BaseException:
            if begun:
                self._remove_partial(job["id"], job["submitter"])
            raise
        return job["id"], count

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

    def runnable_chunks(self, model: str | None = None) -> list[Chunk]:
        """Every queued request's range (of ``model``'s jobs), highest priority first."""
        query = select(jobs).where(jobs.c.cancelled_at.is_(None), _queued_count() > 0)
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

    def claim(self, chunk: Chunk, worker_id: str, limit: int) -> list[Claimed]:
        """Take up to ``limit`` queued requests of a chunk for this worker, in input order."""
        with self.write() as conn:
            job = conn.execute(select(jobs).where(jobs.c.id == chunk.job_id)).first()
            if job is None or job.cancelled_at is not None:
                return []
            rows = conn.execute(
                select(requests.c.id, requests.c.seq, requests.c.kind, requests.c.body,
                       requests.c.params)
                .where(
                    requests.c.job_id == chunk.job_id,
                    requests.c.seq.between(chunk.lo, chunk.hi),
                    requests.c.status == QUEUED,
                )
                .order_by(requests.c.seq)
                .limit(limit)
            ).all()
            if not rows:
                return []
            _move(conn, QUEUED, RUNNING, requests.c.id.in_([r.id for r in rows]),
                  worker_id=worker_id, attempts=requests.c.attempts + 1)
        defaults = json.loads(job.defaults)
        system = defaults.pop("system", None)
        defaults.pop("raw", None)
        out = []
        for r in rows:
            params = dict(defaults)
            if r.params:
                params.update(json.loads(r.params))
            body = orjson.loads(r.body)
            out.append(Claimed(r.id, chunk.job_id, r.seq, r.kind, body, params, system))
        return out

    def finish(self, results: list[Result], worker_id: str, peak_memory: int | None = None) -> int:
        """Store results of requests this worker holds, in one transaction.

        A result is stored only if the request is still running under this worker,
        so a request put back (or taken over after a crash) is never written twice.
        Returns how many were stored.
        """
        stored = 0
        with self.write() as conn:
            per_job: dict[str, list[Result]] = {}
            for r in results:
                gen_time = (r.finished_at - r.first_token_at) if r.first_token_at else None
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
                        prompt_tps=r.prompt_tps,
                        # The first token comes from prefill; the rest from decode.
                        generation_tps=((r.completion_tokens or 1) - 1) / gen_time
                        if gen_time else None,
                    )
                ).rowcount
                if done:
                    stored += 1
                    per_job.setdefault(r.job_id, []).append(r)
            for job_id, rs in per_job.items():
                _add_to_job_totals(conn, job_id, rs, peak_memory)
        return stored

    def release(self, ids: list[int], worker_id: str) -> int:
        """Put requests this worker holds back in the queue state; returns how many."""
        if not ids:
            return 0
        with self.write() as conn:
            return _move(conn, RUNNING, QUEUED, requests.c.id.in_(ids),
                         requests.c.worker_id == worker_id, worker_id=None)

    def recover(self, worker_id: str) -> int:
        """Put back requests left running by workers that are gone; returns how many.

        A worker is gone when it said it stopped, its heartbeat is stale, or it ran
        on this host and its process no longer exists, or is this very process (a
        worker restarted with the same pid, as a container's first process is).
        """
        now = time.time()
        host, pid = socket.gethostname(), os.getpid()
        with self.write() as conn:
            holders = conn.execute(
                select(requests.c.worker_id).where(requests.c.status == RUNNING).distinct()
            ).scalars().all()
            gone = []
            for holder in holders:
                if holder == worker_id:
                    continue
                w = conn.execute(select(workers).where(workers.c.id == holder)).first()
                if (
                    w is None
                    or w.stopped_at is not None
                    or now - w.heartbeat_at > settings.HEARTBEAT_STALE_SECONDS
                    or (w.host == host and (w.pid == pid or not pid_alive(w.pid)))
                ):
                    gone.append(holder)
            if not gone:
                return 0
            return _move(conn, RUNNING, QUEUED, requests.c.worker_id.in_(gone), worker_id=None)

    def cancelled_among(self, job_ids: Iterable[str]) -> set[str]:
        """Which of these jobs were cancelled."""
        ids = list(job_ids)
        if not ids:
            return set()
        with self.read() as conn:
            return set(
                conn.execute(
                    select(jobs.c.id).where(jobs.c.id.in_(ids), jobs.c.cancelled_at.is_not(None))
                ).scalars()
            )

    def mark_cancelled(self, ids: list[int], worker_id: str) -> int:
        """Mark requests this worker dropped because their job was cancelled."""
        if not ids:
            return 0
        with self.write() as conn:
            return _move(conn, RUNNING, CANCELLED, requests.c.id.in_(ids),
                         requests.c.worker_id == worker_id, finished_at=time.time())

    def fail_model(self, model: str, error: str) -> int:
        """Fail every queued request of a model's jobs (the model cannot be loaded)."""
        now = time.time()
        with self.write() as conn:
            return _move(conn, QUEUED, FAILED,
                         requests.c.job_id.in_(select(jobs.c.id).where(jobs.c.model == model)),
                         error=error, started_at=now, finished_at=now)

    # -- user commands ----------------------------------------------------------

    def cancel(self, job_id: str) -> int:
        """Stop a job's unstarted requests from running; returns how many were cancelled."""
        with self.write() as conn:
            _job_row(conn, job_id)
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.cancelled_at.is_(None))
                .values(cancelled_at=time.time())
            )
            return _move(conn, QUEUED, CANCELLED, requests.c.job_id == job_id)

    def retry(self, job_id: str) -> int:
        """Queue a job's failed requests again; returns how many."""
        with self.write() as conn:
            _job_row(conn, job_id)
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(cancelled_at=None))
            return _move(conn, FAILED, QUEUED, requests.c.job_id == job_id,
                         error=None, worker_id=None, response=None, finish_reason=None,
                         started_at=None, first_token_at=None, finished_at=None)

    # -- reading -----------------------------------------------------------------

    def job_defaults(self, job_id: str) -> dict:
        with self.read() as conn:
            return json.loads(_job_row(conn, job_id).defaults)

    def iter_requests(self, job_id: str, page: int = 1000) -> Iterator:
        """Every request row of a job in input order, read in pages (constant memory)."""
        with self.read() as conn:
            _job_row(conn, job_id)
        last = -1
        while True:
            with self.read() as conn:
                rows = conn.execute(
                    select(requests)
                    .where(requests.c.job_id == job_id, requests.c.seq > last)
                    .order_by(requests.c.seq)
                    .limit(page)
                ).all()
            if not rows:
                return
            yield from rows
            last = rows[-1].seq

    def has_runnable(self, model: str | None = None, now: float | None = None) -> bool:
        """Whether any queued request could start now (of ``model``'s jobs)."""
        now = now or time.time()
        query = select(jobs.c.id).where(
            _queued_count() > 0,
            jobs.c.cancelled_at.is_(None),
            or_(jobs.c.not_before.is_(None), jobs.c.not_before <= now),
        ).limit(1)
        if model is not None:
            query = query.where(jobs.c.model == model)
        with self.read() as conn:
            return conn.execute(query).first() is not None

    # -- workers -----------------------------------------------------------------

    def register_worker(self, worker_id: str, host: str, pid: int, serves: str | None) -> None:
        now = time.time()
        with self.write() as conn:
            conn.execute(
                workers.insert().values(
                    id=worker_id, host=host, pid=pid, serves=serves, state="loading",
                    started_at=now, heartbeat_at=now,
                )
            )

    def update_worker(self, worker_id: str, **values) -> None:
        """Record a worker's heartbeat and whatever else it reports."""
        values.setdefault("heartbeat_at", time.time())
        with self.write() as conn:
            conn.execute(workers.update().where(workers.c.id == worker_id).values(**values))

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
        engine = create_engine(url, pool_pre_ping=True)
        return engine
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Let SQLAlchemy's "begin" event, not pysqlite, decide how transactions start.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        for pragma in SQLITE_PRAGMAS:
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql(conn.get_execution_options().get("nightshift_begin", "BEGIN"))

    return engine


_REQUEST_COLUMNS = ("job_id", "seq", "line_no", "custom_id", "kind", "body", "params",
                    "metadata", "status", "attempts")
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
        QUEUED, 0,
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
    """Who is storing a job, as ``jobs.submitter`` records it: host and pid. Read back
    only by ``submitter_gone``; change the two together (a machine or boot id for the
    host, as ``worker_identity`` may take)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def submitter_gone(identity: str) -> bool:
    """Whether the process named by a ``submitter_identity`` has ended: it ran on this
    host and its pid is gone. Never this process (another thread may be submitting); a
    pid reused since, or another host, looks alive: SUBMIT_STALE_SECONDS covers those."""
    host, _, pid = identity.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    return not pid_alive(int(pid))


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


def _move(conn: Connection, frm: str, to: str, *where, **values) -> int:
    """Move the requests in status ``frm`` that match ``where`` to status ``to`` (setting
    ``values``), and their jobs' per-status counts with them, in the caller's
    transaction. Returns how many moved.

    RETURNING names exactly the rows this statement changed, so the counts stay right
    whatever another transaction did in between (PostgreSQL's READ COMMITTED included).
    """
    moved = conn.execute(
        requests.update().where(requests.c.status == frm, *where)
        .values(status=to, **values).returning(requests.c.job_id)
    ).scalars().all()
    for job_id, n in Counter(moved).items():
        conn.execute(jobs.update().where(jobs.c.id == job_id)
                     .values(**_counts_moved({frm: -n, to: n})))
    return len(moved)


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


__all__ = [
    "Store", "Chunk", "Claimed", "Result", "JobSummary", "worker_identity",
    "QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED", "TERMINAL",
]
