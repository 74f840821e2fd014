"""Which database, opened how: the one door to the results database for commands.

A read command gets sqlite3 straight on a migrated SQLite file (``jobs/reads.py``: no
SQLAlchemy to import, no write lock to wait for); anything else gets a Store, which
creates or migrates the database first.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from nightshift.jobs import settings
from nightshift.jobs.errors import NightshiftError
from nightshift.jobs.reads import Reads, SqliteReads

if TYPE_CHECKING:
    from nightshift.jobs.store import Store

def sqlite_file(url: str) -> Path | None:
    """The file of a plain ``sqlite:///PATH`` URL; None for anything else (another
    database, in-memory, URL options)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or "?" in url:
        return None
    path = url[len(prefix):]
    return Path(path) if path and path != ":memory:" else None


def open_reads(url: str | None = None) -> Reads | Store:
    """The reads for the results database: sqlite3 on an existing, fully migrated SQLite
    file (which need not be writable); otherwise a Store (which creates or migrates the
    database first).

    Raises:
        NightshiftError: the SQLite file cannot be read, or created or migrated.
    """
    url = url or settings.database_url()
    path = sqlite_file(url)
    if path is not None and path.is_file():
        reads = SqliteReads(path)
        if reads.migrated():
            return reads
        reads.close()
    from nightshift.jobs.store import Store
    from sqlalchemy.exc import OperationalError

    try:
        return Store(url)
    except OperationalError as e:
        if path is None:
            raise
        raise NightshiftError(
            f"cannot {'upgrade' if path.is_file() else 'create'} the database {path} "
            f"({e.orig}): run nightshift once where it can write there, or choose another "
            f"--home / {settings.HOME_ENV}") from e
