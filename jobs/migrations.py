"""Ordered schema migrations, recorded in a table and applied when a store opens.

Add a function ``mNNN_what(conn)`` at the end of MIGRATIONS; never edit one that has
shipped. Each runs in the same transaction as its record, so a crash applies it
whole or not at all (on SQLite and PostgreSQL DDL is transactional).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Connection, select

from jobs import schema


def m001_initial(conn: Connection) -> None:
    tables = [schema.jobs, schema.requests, schema.workers, schema.model_switches]
    schema.metadata.create_all(conn, tables=tables)


MIGRATIONS: list[Callable[[Connection], None]] = [m001_initial]


def apply(conn: Connection) -> list[str]:
    """Apply the migrations this database has not seen; returns their names."""
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
