"""What `status` reads: jobs, per-request timing figures, workers and model switches.

Written once, in plain SQL that SQLite and PostgreSQL both run, over two drivers: the
Store's SQLAlchemy engine, and sqlite3 itself for a SQLite file (``open_reads``).
Importing SQLAlchemy alone takes longer than the 0.3 s `nightshift status` may take
on a 2-core machine, so a status read never imports it when it need not.

Every figure is kept up to date by the writes (per-status counts and running totals
in ``jobs``, a partial index over done requests' time to first token), so reading a
million-request job costs a few index steps, not a scan.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from nightshift.jobs import migrations, settings
from nightshift.jobs.errors import NightshiftError, job_not_found
from nightshift.jobs.hosts import host_id, pid_alive
from nightshift.jobs.vocabulary import (
    DONE,
    DONE_TTFT_WHERE,
    EXPIRED,
    FAILED,
    QUEUED,
    RUNNING,
    STATUSES,
    TTFT,
    count_column,
)

# A job still being stored names its submitter (jobs/store.py ``create_job``); until
# the transaction that makes it whole, status does not show it.
WHOLE = "submitter IS NULL"


def duration(seconds: float | None) -> str:
    """Seconds for people: "45s", "3m07s", "2h05m"; "-" for None."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass
class JobSummary:
    """A job and its progress, as `status` shows it."""

    id: str
    name: str | None
    model: str
    priority: int
    total: int
    created_at: float
    not_before: float | None
    cancelled_at: float | None
    started_at: float | None
    finished_at: float | None
    prompt_tokens: int
    completion_tokens: int
    peak_memory: int | None
    counts: dict[str, int] = field(default_factory=dict)  # statuses with requests only
    deadline: float | None = None  # submit --deadline
    expired_at: float | None = None

    @classmethod
    def from_row(cls, row) -> JobSummary:
        """From a ``jobs`` row (a mapping)."""
        return cls(
            id=row["id"], name=row["name"], model=row["model"], priority=row["priority"],
            total=row["total"], created_at=row["created_at"], not_before=row["not_before"],
            cancelled_at=row["cancelled_at"], started_at=row["started_at"],
            finished_at=row["finished_at"], prompt_tokens=row["prompt_tokens"] or 0,
            completion_tokens=row["completion_tokens"] or 0, peak_memory=row["peak_memory"],
            counts={s: int(row[count_column(s)]) for s in STATUSES if row[count_column(s)]},
            deadline=row["deadline"], expired_at=row["expired_at"],
        )

    @property
    def remaining(self) -> int:
        return self.counts.get(QUEUED, 0) + self.counts.get(RUNNING, 0)

    @property
    def state(self) -> str:
        if self.counts.get(RUNNING):
            return "running"
        if self.remaining == 0:
            if self.cancelled_at:
                return "cancelled"
            if self.counts.get(EXPIRED):
                return "expired"
            return "failed" if self.counts.get(FAILED) == self.total else "done"
        if self.not_before and self.not_before > time.time():
            return "scheduled"
        return "queued"

    @property
    def wall_seconds(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at if self.remaining == 0 and self.finished_at else time.time()
        return max(end - self.started_at, 0.0)

    @property
    def tokens_per_second(self) -> float | None:
        wall = self.wall_seconds
        return self.completion_tokens / wall if wall else None

    @property
    def eta_seconds(self) -> float | None:
        finished = self.counts.get(DONE, 0) + self.counts.get(FAILED, 0)
        wall = self.wall_seconds
        if not self.remaining or not finished or not wall:
            return None
        return self.remaining * wall / finished

    def progress_line(self) -> str:
        """One line: ``job 1a2b (nightly): running, 4,500/10,000 done, 3 failed, 45.2 tok/s,
        ETA 1h02m`` (the worker's log and ``status --watch`` off a terminal)."""
        finished = self.counts.get(DONE, 0)
        failed, expired = self.counts.get(FAILED, 0), self.counts.get(EXPIRED, 0)
        rate = self.tokens_per_second
        return (f"job {self.id}{f' ({self.name})' if self.name else ''}: {self.state}, "
                f"{finished:,}/{self.total:,} done" + (f", {failed:,} failed" if failed else "")
                + (f", {expired:,} expired" if expired else "")
                + (f", {rate:.1f} tok/s" if rate else "")
                + (f", ETA {duration(self.eta_seconds)}" if self.eta_seconds else ""))

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "model": self.model,
            "state": self.state,
            "priority": self.priority,
            "total": self.total,
            "counts": {s: self.counts.get(s, 0) for s in STATUSES},
            "created_at": self.created_at,
            "not_before": self.not_before,
            "deadline": self.deadline,
            "expired_at": self.expired_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "wall_seconds": self.wall_seconds,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens_per_second": self.tokens_per_second,
            "eta_seconds": self.eta_seconds,
            "peak_memory_bytes": self.peak_memory,
        }


# The database's clock, in Unix seconds. Heartbeats are written and judged on it, so
# a host whose clock is off cannot make a live worker look dead to the others.
_DB_NOW = {
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
    "postgresql": "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)",
}


def db_now_sql(dialect: str) -> str:
    """An SQL expression for the database's current time, in Unix seconds."""
    return _DB_NOW[dialect]


class Reads:
    """The read queries; a subclass says how to run one statement (``_rows``).

    Each statement reads the latest committed state; none needs another's snapshot (a
    done count only grows, so a rank read after it always exists).
    """

    dialect = "sqlite"

    def _rows(self, sql: str, params: dict | None = None) -> list[dict]:
        raise NotImplementedError

    def job(self, job_id: str) -> JobSummary:
        rows = self._rows(f"SELECT * FROM jobs WHERE id = :id AND {WHOLE}", {"id": job_id})
        if not rows:
            raise job_not_found(job_id)
        return JobSummary.from_row(rows[0])

    def input_columns(self, job_id: str) -> str | None:
        """A table job's columns with their types (``jobs.input_columns``, JSON: see
        jobs/tables.py); None for a job of request lines."""
        rows = self._rows(f"SELECT input_columns FROM jobs WHERE id = :id AND {WHOLE}",
                          {"id": job_id})
        if not rows:
            raise job_not_found(job_id)
        return rows[0]["input_columns"]

    def list_jobs(self, limit: int | None = None) -> list[JobSummary]:
        """Jobs, newest first."""
        sql = f"SELECT * FROM jobs WHERE {WHOLE} ORDER BY created_at DESC"
        rows = self._rows(sql + " LIMIT :limit", {"limit": limit}) if limit else self._rows(sql)
        return [JobSummary.from_row(r) for r in rows]

    def request_stats(self, job_id: str) -> dict:
        """Per-request figures over a job's done requests: time to first token p50/p95
        (seconds) and mean prompt processing rate (tokens/s)."""
        [job] = self._rows("SELECT n_done, prompt_tps_sum, prompt_tps_n FROM jobs "
                           f"WHERE id = :id AND {WHOLE}", {"id": job_id}) or [None]
        if job is None:
            raise job_not_found(job_id)
        n = int(job["n_done"])
        return {"ttft_p50": self._ttft_rank(job_id, n, 0.5),
                "ttft_p95": self._ttft_rank(job_id, n, 0.95),
                "prompt_tps_mean": job["prompt_tps_sum"] / job["prompt_tps_n"]
                if job["prompt_tps_n"] else None}

    def _ttft_rank(self, job_id: str, done: int, q: float) -> float | None:
        """The ``q`` quantile (nearest rank) of the job's done requests' time to first
        token, read off the index from whichever end is nearer."""
        if not done:
            return None
        k = min(done - 1, max(0, round(q * (done - 1))))
        order, offset = ("ASC", k) if k <= done // 2 else ("DESC", done - 1 - k)
        rows = self._rows(f"SELECT {TTFT} AS t FROM requests WHERE job_id = :job AND "
                          f"{DONE_TTFT_WHERE} ORDER BY {TTFT} {order} LIMIT 1 OFFSET :k",
                          {"job": job_id, "k": offset})
        return rows[0]["t"] if rows else None

    def iter_requests(self, job_id: str, page: int = 1000,
                      columns: tuple[str, ...] | None = None) -> Iterator[SimpleNamespace]:
        """Every request row of a job in input order (its columns as attributes, or only
        ``columns`` and ``seq``), read in pages: constant memory for any size of job.

        Raises:
            NotFound: no such job.
        """
        self.job(job_id)
        what = "*" if columns is None else ", ".join(dict.fromkeys(("seq", *columns)))
        last = -1
        while True:
            rows = self._rows(f"SELECT {what} FROM requests WHERE job_id = :job AND "
                              "seq > :last ORDER BY seq LIMIT :page",
                              {"job": job_id, "last": last, "page": page})
            if not rows:
                return
            for row in rows:
                yield SimpleNamespace(**row)
            last = rows[-1]["seq"]

    def models_waiting(self) -> dict[str, int]:
        """Queued request counts by model, over jobs that are not cancelled."""
        rows = self._rows("SELECT model, SUM(n_queued) AS n FROM jobs WHERE n_queued > 0 "
                          "AND cancelled_at IS NULL GROUP BY model")
        return {r["model"]: int(r["n"]) for r in rows}

    def live_workers(self) -> list:
        """Workers whose heartbeat is fresh and that have not stopped (and, on this host,
        whose process exists)."""
        now = db_now_sql(self.dialect)
        rows = self._rows(f"SELECT *, {now} - heartbeat_at AS heartbeat_age FROM workers "
                          f"WHERE stopped_at IS NULL AND heartbeat_at >= {now} - :stale "
                          "ORDER BY started_at", {"stale": settings.HEARTBEAT_STALE_SECONDS})
        here = host_id()
        return [SimpleNamespace(**r) for r in rows
                if r["host"] != here or pid_alive(r["pid"])]

    def switches(self, limit: int = 20) -> list:
        """The latest model switches, newest first."""
        rows = self._rows("SELECT * FROM model_switches ORDER BY at DESC LIMIT :limit",
                          {"limit": limit})
        return [SimpleNamespace(**r) for r in rows]


class SqliteReads(Reads):
    """The reads straight on a SQLite file, through the standard library's driver.

    Raises:
        NightshiftError: the file cannot be read (see ``_connect``).
    """

    def __init__(self, path: Path):
        self.conn = _connect(path)
        self.conn.row_factory = sqlite3.Row

    def close(self) -> None:
        self.conn.close()

    def migrated(self) -> bool:
        try:
            done = {r["name"] for r in self._rows("SELECT name FROM nightshift_migrations")}
        except sqlite3.OperationalError:  # no such table: a new or foreign file
            return False
        return set(migrations.names()) <= done

    def _rows(self, sql: str, params: dict | None = None) -> list[dict]:
        return [dict(r) for r in self.conn.execute(sql, params or {})]


def _connect(path: Path) -> sqlite3.Connection:
    """A connection that reads ``path``, also where nothing may be written (a read-only
    home, folder or file system).

    Reading a WAL database needs its ``-shm`` index beside it, which SQLite cannot create
    in a read-only folder. Without a ``-wal`` file no connection has the database open
    (the last one to close removes it), so the file alone holds every commit, and it is
    opened as immutable: read without the index or locks. A writer that starts during the
    read is not seen: a status or export of that moment.
    """
    # No BEGIN IMMEDIATE, no write: in WAL mode this never waits for a writer.
    conn = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1")
        return conn
    except sqlite3.OperationalError as e:
        conn.close()
        error = e
    if not path.with_name(path.name + "-wal").exists():
        uri = path.absolute().as_uri() + "?mode=ro&immutable=1"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        try:
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1")
            return conn
        except sqlite3.OperationalError:
            conn.close()
    raise NightshiftError(f"cannot read the database {path}: {error} (reading it needs its "
                          "folder writable while a nightshift process has it open)") from error


__all__ = ["Reads", "SqliteReads", "JobSummary", "db_now_sql"]
