"""Ordered schema migrations, recorded in a table and applied when a store opens.

Add a function ``mNNN_what(conn)`` at the end of MIGRATIONS; never edit one that has
shipped. Each runs in the same transaction as its record, so a crash applies it
whole or not at all (on SQLite and PostgreSQL DDL is transactional). m001 creates
the tables as jobs/schema.py declares them now, so a later migration finds on a new
database what it adds already there, and must check.

SQLAlchemy is imported inside the functions: `status` asks which migrations exist
(``names``) without paying for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy import Connection


def m001_initial(conn: Connection) -> None:
    from jobs import schema

    tables = [schema.jobs, schema.requests, schema.workers, schema.model_switches]
    schema.metadata.create_all(conn, tables=tables)


def m002_job_counts(conn: Connection) -> None:
    """Per-status request counts and the prompt-rate sum in ``jobs``, and the index of
    done requests' time to first token: `status` of a million-request job without a
    scan."""
    from sqlalchemy import inspect, text
    from sqlalchemy.schema import CreateIndex

    from jobs import schema
    from jobs.reads import STATUSES, count_column

    have = {c["name"] for c in inspect(conn).get_columns("jobs")}
    for column in schema.JOB_COUNTERS:
        if column.name not in have:
            kind = column.type.compile(dialect=conn.dialect)
            conn.execute(text(f"ALTER TABLE jobs ADD COLUMN {column.name} {kind} "
                              "NOT NULL DEFAULT 0"))
    counts = ", ".join(
        f"{count_column(s)} = (SELECT COUNT(*) FROM requests r "
        f"WHERE r.job_id = jobs.id AND r.status = '{s}')" for s in STATUSES)
    done = "FROM requests r WHERE r.job_id = jobs.id AND r.status = 'done'"
    conn.execute(text(f"UPDATE jobs SET {counts}, "
                      f"prompt_tps_sum = COALESCE((SELECT SUM(r.prompt_tps) {done}), 0), "
                      f"prompt_tps_n = (SELECT COUNT(r.prompt_tps) {done})"))
    # Reflection cannot see an expression index, so not `checkfirst`.
    conn.execute(CreateIndex(schema.done_ttft_index, if_not_exists=True))


def m004_submitting(conn: Connection) -> None:
    """Who is storing a job and when it last stored a batch (``jobs.submitter``,
    ``jobs.submit_touched_at``): a job is stored in short transactions, hidden until
    whole, and one left half-stored by a killed submit is found and removed."""
    from sqlalchemy import inspect, text

    from jobs import schema

    have = {c["name"] for c in inspect(conn).get_columns("jobs")}
    for column in schema.SUBMIT_COLUMNS:
        if column.name not in have:
            kind = column.type.compile(dialect=conn.dialect)
            conn.execute(text(f"ALTER TABLE jobs ADD COLUMN {column.name} {kind}"))


MIGRATIONS: list[Callable[[Connection], None]] = [m001_initial, m002_job_counts,
                                                  m004_submitting]


def names() -> list[str]:
    return [m.__name__ for m in MIGRATIONS]


def apply(conn: Connection) -> list[str]:
    """Apply the migrations this database has not seen; returns their names."""
    from sqlalchemy import select

    from jobs import schema

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
