"""Ordered schema migrations, recorded in a table and applied when a store opens.

Add a function ``mNNN_what(conn)`` at the end of MIGRATIONS; never edit one that has
shipped. Each runs in the same transaction as its record, so a crash applies it
whole or not at all (on SQLite and PostgreSQL DDL is transactional).

A migration is frozen as written: it spells out what it creates, never through
jobs/schema.py, which declares today's schema (for the queries) and changes with it.
Before m003, m001 ran ``create_all`` on jobs/schema.py, so a database got the tables of
the release that created it and nothing added later without a migration: m003 adds
that, checking first, as a database created since has it already.
tests/test_migrations.py opens a database of each earlier release and checks that it
reaches jobs/schema.py with its rows.

SQLAlchemy is imported inside the functions: `status` asks which migrations exist
(``names``) without paying for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy import Connection

# The PostgreSQL advisory lock that migrating transactions take: processes opening a
# new database at once would otherwise all create the tables, and all but one fail.
MIGRATION_LOCK = int.from_bytes(b"nightsft", "big")


def m001_initial(conn: Connection) -> None:
    """The tables of the first release, as commit 6426b12's jobs/schema.py declared them
    (less the Python-side defaults and comments, which make no DDL)."""
    from sqlalchemy import (
        BigInteger,
        Column,
        Float,
        ForeignKey,
        Index,
        Integer,
        MetaData,
        String,
        Table,
        Text,
    )

    metadata = MetaData()
    Table(
        "jobs",
        metadata,
        Column("id", String(32), primary_key=True),
        Column("name", Text),
        Column("model", Text, nullable=False),
        Column("source", Text),
        Column("priority", Integer, nullable=False),
        Column("not_before", Float),
        Column("defaults", Text, nullable=False),
        Column("total", Integer, nullable=False),
        Column("created_at", Float, nullable=False),
        Column("cancelled_at", Float),
        Column("peak_memory", BigInteger),
        Column("started_at", Float),
        Column("finished_at", Float),
        Column("prompt_tokens", BigInteger, nullable=False),
        Column("completion_tokens", BigInteger, nullable=False),
    )
    requests = Table(
        "requests",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("job_id", String(32), ForeignKey("jobs.id"), nullable=False),
        Column("seq", Integer, nullable=False),
        Column("line_no", Integer, nullable=False),
        Column("custom_id", Text),
        Column("kind", String(16), nullable=False),
        Column("body", Text, nullable=False),
        Column("params", Text),
        Column("metadata", Text),
        Column("status", String(16), nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("worker_id", String(128)),
        Column("started_at", Float),
        Column("first_token_at", Float),
        Column("finished_at", Float),
        Column("response", Text),
        Column("finish_reason", String(16)),
        Column("prompt_tokens", Integer),
        Column("cached_tokens", Integer),
        Column("completion_tokens", Integer),
        Column("prompt_tps", Float),
        Column("generation_tps", Float),
        Column("error", Text),
    )
    Index("requests_job_seq", requests.c.job_id, requests.c.seq, unique=True)
    Index("requests_job_status", requests.c.job_id, requests.c.status)
    Index("requests_status", requests.c.status)
    Table(
        "workers",
        metadata,
        Column("id", String(128), primary_key=True),
        Column("host", Text, nullable=False),
        Column("pid", Integer, nullable=False),
        Column("serves", Text),
        Column("model", Text),
        Column("state", String(16), nullable=False),
        Column("compute", Text),
        Column("memory", Text),
        Column("batch_size", Integer),
        Column("load_seconds", Float),
        Column("warmup_seconds", Float),
        Column("peak_memory", BigInteger),
        Column("started_at", Float, nullable=False),
        Column("heartbeat_at", Float, nullable=False),
        Column("stopped_at", Float),
    )
    Table(
        "model_switches",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("worker_id", String(128), nullable=False),
        Column("from_model", Text),
        Column("to_model", Text, nullable=False),
        Column("unload_seconds", Float),
        Column("load_seconds", Float),
        Column("warmup_seconds", Float),
        Column("at", Float, nullable=False),
    )
    metadata.create_all(conn)


def m002_job_counts(conn: Connection) -> None:
    """Per-status request counts and the prompt-rate sum in ``jobs``, and the index of
    done requests' time to first token: `status` of a million-request job without a
    scan."""
    from sqlalchemy import BigInteger, Float

    statuses = ("queued", "running", "done", "failed", "cancelled")
    counters = [(f"n_{s}", BigInteger()) for s in statuses] + [
        ("prompt_tps_sum", Float()), ("prompt_tps_n", BigInteger())]
    # Databases made while m001 created today's tables have these already.
    _add_columns(conn, "jobs", [(name, f"{kind.compile(dialect=conn.dialect)} NOT NULL "
                                 "DEFAULT 0") for name, kind in counters])
    counts = ", ".join(
        f"n_{s} = (SELECT COUNT(*) FROM requests r "
        f"WHERE r.job_id = jobs.id AND r.status = '{s}')" for s in statuses)
    done = "FROM requests r WHERE r.job_id = jobs.id AND r.status = 'done'"
    conn.exec_driver_sql(f"UPDATE jobs SET {counts}, "
                         f"prompt_tps_sum = COALESCE((SELECT SUM(r.prompt_tps) {done}), 0), "
                         f"prompt_tps_n = (SELECT COUNT(r.prompt_tps) {done})")
    # Reflection cannot see an expression index, so IF NOT EXISTS. The condition is
    # jobs/reads.py's DONE_TTFT_WHERE, word for word, as SQLite needs to use it.
    conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS requests_done_ttft ON requests "
        "(job_id, (first_token_at - started_at)) "
        "WHERE status = 'done' AND first_token_at IS NOT NULL")


def m003_worker_engine_counters(conn: Connection) -> None:
    """The engine counters in the heartbeat (added to jobs/schema.py by commit 57b23b3
    without a migration): databases created before it lack them, and every heartbeat
    of theirs failed."""
    from sqlalchemy import BigInteger

    kind = BigInteger().compile(dialect=conn.dialect)
    _add_columns(conn, "workers", [(name, kind) for name in
                                   ("decode_steps", "sequences_decoded",
                                    "prompt_tokens_computed")])


def m004_submitting(conn: Connection) -> None:
    """Who is storing a job and when it last stored a batch (``jobs.submitter``,
    ``jobs.submit_touched_at``): a job is stored in short transactions, hidden until
    whole, and one left half-stored by a killed submit is found and removed."""
    _add_columns(conn, "jobs", [("submitter", "TEXT"),
                                ("submit_touched_at", "FLOAT")])


def m005_request_losses(conn: Connection) -> None:
    """``requests.lost``: how many times a worker died while running a request, so
    the one that kills the worker is run apart and failed after a few deaths."""
    _add_columns(conn, "requests", [("lost", "INTEGER NOT NULL DEFAULT 0")])


def m006_request_answer_parts(conn: Connection) -> None:
    """``requests.logprobs``: the answer's tokens with their log-probabilities (JSON),
    for the requests that ask; ``requests.reasoning``: a reasoning model's thinking;
    ``requests.choices``: every sample of a request with ``n`` > 1 (JSON)."""
    _add_columns(conn, "requests", [("logprobs", "TEXT"), ("reasoning", "TEXT"),
                                    ("choices", "TEXT")])


def m007_job_notify(conn: Connection) -> None:
    """``jobs.notify``, ``jobs.notified_at``: ``submit --notify``'s command, run once the
    job has ended."""
    _add_columns(conn, "jobs", [("notify", "TEXT"), ("notified_at", "FLOAT")])


def m008_files_and_batches(conn: Connection) -> None:
    """``files`` and ``batches``: what `nightshift serve` keeps of uploaded files and of
    the batches created over HTTP (their jobs are ordinary jobs)."""
    from sqlalchemy import BigInteger, Column, Float, Index, MetaData, String, Table, Text

    metadata = MetaData()
    files = Table(
        "files",
        metadata,
        Column("id", String(64), primary_key=True),
        Column("purpose", String(32), nullable=False),
        Column("filename", Text, nullable=False),
        Column("bytes", BigInteger, nullable=False),
        Column("created_at", Float, nullable=False),
        Column("status", String(16), nullable=False),
        Column("status_details", Text),
        Column("checked", Text),
    )
    Index("files_created", files.c.created_at, files.c.id)
    batches = Table(
        "batches",
        metadata,
        Column("id", String(64), primary_key=True),
        Column("job_id", String(32)),
        Column("input_file_id", String(64), nullable=False),
        Column("endpoint", String(64), nullable=False),
        Column("completion_window", String(16), nullable=False),
        Column("metadata", Text),
        Column("created_at", Float, nullable=False),
        Column("in_progress_at", Float),
        Column("failed_at", Float),
        Column("errors", Text),
    )
    Index("batches_job", batches.c.job_id, unique=True)
    Index("batches_created", batches.c.created_at, batches.c.id)
    metadata.create_all(conn)


def m009_table_input(conn: Connection) -> None:
    """``jobs.input_columns``, ``requests.input_row``: a table's columns with their types,
    and each row's values (``submit --template``), given back by the export."""
    _add_columns(conn, "jobs", [("input_columns", "TEXT")])
    _add_columns(conn, "requests", [("input_row", "TEXT")])


def m010_deadlines(conn: Connection) -> None:
    """``jobs.deadline``, ``jobs.expired_at`` and the count of expired requests
    (``jobs.n_expired``): `submit --deadline` and a batch's ``completion_window``."""
    from sqlalchemy import BigInteger

    counter = f"{BigInteger().compile(dialect=conn.dialect)} NOT NULL DEFAULT 0"
    _add_columns(conn, "jobs", [("deadline", "FLOAT"), ("expired_at", "FLOAT"),
                                ("n_expired", counter)])


MIGRATIONS: list[Callable[[Connection], None]] = [
    m001_initial,
    m002_job_counts,
    m003_worker_engine_counters,
    m004_submitting,
    m005_request_losses,
    m006_request_answer_parts,
    m007_job_notify,
    m008_files_and_batches,
    m009_table_input,
    m010_deadlines,
]


def names() -> list[str]:
    return [m.__name__ for m in MIGRATIONS]


def apply(conn: Connection) -> list[str]:
    """Apply the migrations this database has not seen, in the caller's transaction;
    returns their names.

    On PostgreSQL the transaction takes MIGRATION_LOCK first, so concurrent opens take
    turns and each sees, after the lock, what those before it committed (READ
    COMMITTED: a statement sees what committed before it began). On SQLite the write
    transaction (BEGIN IMMEDIATE, jobs/store.py) serialises them already.
    """
    from nightshift.jobs import schema
    from sqlalchemy import select

    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
    schema.migrations.create(conn, checkfirst=True)
    done = set(conn.execute(select(schema.migrations.c.name)).scalars())
    applied = []
    for migration in MIGRATIONS:
        if migration.__name__ in done:
            continue
        migration(conn)
        conn.execute(
            schema.migrations.insert().values(name=migration.__name__, applied_at=time.time())
        )
        applied.append(migration.__name__)
    return applied


def _add_columns(conn: Connection, table: str, columns: list[tuple[str, str]]) -> None:
    """``ALTER TABLE table ADD COLUMN name ddl`` for each (name, ddl) the table lacks.
    Shipped migrations call it: keep what it does."""
    from sqlalchemy import inspect

    have = {c["name"] for c in inspect(conn).get_columns(table)}
    for name, ddl in columns:
        if name not in have:
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}")
