"""The work queue: Huey, carrying ids only, serialized as JSON.

Huey delivers at most once, so the queue is a dispatcher, not the truth: each task
names a range of one job's requests (job id, first and last position); the worker
claims whatever in that range is still queued in the database. A task delivered
twice therefore runs nothing twice, and work whose task was lost is found again in
the database when a worker starts or idles.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from huey import Huey, PriorityRedisHuey, SqliteHuey
from huey.registry import Message
from huey.serializer import Serializer
from nightshift.jobs import settings
from nightshift.jobs.errors import ConfigError
from nightshift.jobs.vocabulary import Chunk

TASK_NAME = "run_chunk"
TASK_ID = f"{__name__}.{TASK_NAME}"  # how Huey names it in each message
QUEUE_NAME = "nightshift"
log = logging.getLogger("nightshift.queue")


class JSONSerializer(Serializer):
    """Huey messages as JSON: reading the queue never runs code.

    Huey's default is pickle, which executes whatever the queue holds; once the
    queue is a shared Redis that is remote code execution. Only messages of the
    expected shape are accepted; anything else raises and Huey drops it.
    """

    def _serialize(self, data) -> bytes:
        if not isinstance(data, Message):
            raise TypeError(f"nightshift queues only task messages, not {type(data).__name__}")
        fields = data._asdict()
        for key in ("on_complete", "on_error", "chord_config"):
            if fields[key] is not None:
                raise TypeError(f"nightshift tasks do not use {key}")
        for key in ("eta", "expires_resolved"):
            if isinstance(fields[key], dt.datetime):
                fields[key] = {"datetime": fields[key].isoformat()}
        return json.dumps(fields).encode()

    def _deserialize(self, data: bytes) -> Message:
        fields = json.loads(data.decode("utf-8"))
        if not isinstance(fields, dict) or set(fields) != set(Message._fields):
            raise ValueError("refused a queue message that is not a nightshift task")
        if fields["name"] != TASK_ID:
            raise ValueError(f"refused a queue message for unknown task {fields['name']!r}")
        for key in ("eta", "expires_resolved"):
            if isinstance(fields[key], dict):
                fields[key] = dt.datetime.fromisoformat(fields[key]["datetime"])
        return Message(**fields)


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def check_url(url: str | None = None) -> str:
    """The queue URL (``url`` or the configured one), once it is known to be usable with
    what is installed; nothing is opened, so a submit can check it before storing.

    Raises:
        ConfigError: a Redis URL without the redis package installed.
    """
    url = url or settings.queue_url()
    if url.startswith(REDIS_SCHEMES):
        try:
            import redis  # noqa: F401  (an optional extra; Huey's own message names no fix)
        except ImportError as e:
            raise ConfigError(
                f"--queue-url / {settings.QUEUE_URL_ENV} is a Redis URL, but the redis "
                "package is not installed: pip install 'nightshift[redis]'") from e
    return url


def make_huey(url: str | None = None) -> Huey:
    """The Huey instance for a queue URL: a SQLite file (default) or ``redis://``.

    A damaged SQLite file is set aside (``queue.db.damaged-<time>``, logged) and an
    empty queue started in its place: the database holds every job, and workers find
    the work whose tasks were in it by sweeping the database.

    Raises:
        ConfigError: a Redis URL without the redis package installed.
    """
    url = check_url(url)
    common = {"results": False, "serializer": JSONSerializer(), "utc": True}
    if url.startswith(REDIS_SCHEMES):
        # Plain RedisHuey has no priorities; the priority variant does.
        return PriorityRedisHuey(QUEUE_NAME, url=url, **common)
    path = url.removeprefix("sqlite:///").removeprefix("sqlite://")

    def open_file() -> SqliteHuey:
        # No fsync per task: the database is the truth and a lost task is found again
        # there, so the queue need not pay a disk flush for each of thousands of chunks.
        return SqliteHuey(QUEUE_NAME, filename=path, timeout=60, **common)

    try:
        inode = os.stat(path).st_ino
    except OSError:
        return open_file()  # a new queue (or one SQLite will explain it cannot open)
    huey = None
    try:
        huey = open_file()  # reads the schema, creates what is missing
        # A few milliseconds for a queue of thousands of tasks.
        checked = [row[0] for row in huey.storage.sql("PRAGMA quick_check", results=True)]
    except sqlite3.DatabaseError as exc:
        if not _damage(exc):
            raise  # locked, unreadable: not ours to replace
        problem = str(exc)
    else:
        if checked == ["ok"]:
            return huey
        problem = "; ".join(checked[:3])
    finally:
        if huey is not None:
            huey.storage.close()  # reopened when used
    aside = _set_aside(Path(path), inode)
    if aside is not None:
        log.error("the queue %s is damaged (%s): moved it to %s and started an empty "
                  "one; no job is lost, workers find queued work in the database", path,
                  problem, aside)
    return open_file()


# SQLITE_CORRUPT and SQLITE_NOTADB: what a damaged file raises (busy, locked or
# unreadable files raise other codes).
_DAMAGE_CODES = {11, 26}


def _damage(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in _DAMAGE_CODES
    return any(s in str(exc) for s in ("malformed", "not a database"))


def _set_aside(path: Path, inode: int) -> Path | None:
    """Rename a damaged queue file (and its -wal, -shm) to ``NAME.damaged-<time>``;
    None when another process got there first (the file is no longer that inode)."""
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    try:
        if os.stat(path).st_ino != inode:
            return None
        os.rename(path, aside)
    except FileNotFoundError:
        return None
    # A write-ahead log left beside a new, empty file would be replayed into it.
    for suffix in ("-wal", "-shm", "-journal"):
        try:
            os.rename(f"{path}{suffix}", f"{aside}{suffix}")
        except FileNotFoundError:
            pass
    return aside


class Queue:
    """The nightshift queue: enqueue chunks from anywhere, run them in the worker."""

    def __init__(self, url: str | None = None, handler: Callable[[Chunk], None] | None = None):
        self.huey = make_huey(url)
        self._handler = handler

        # The chunk's priority travels as the message's own (Huey orders by it, and
        # `.s(priority=...)` takes that keyword for itself); the task reads it back.
        @self.huey.task(name=TASK_NAME, context=True)
        def run_chunk(job_id: str, lo: int, hi: int, model: str = "",
                      not_before: float | None = None, task=None, **_older):
            # _older: keywords of tasks queued by earlier releases ("order").
            if self._handler is None:
                raise RuntimeError("this queue has no worker attached")
            self._handler(Chunk(job_id, lo, hi, task.priority or 0, not_before, model))

        self._task = run_chunk

    def enqueue(self, chunks: Iterable[Chunk]) -> int:
        """Queue chunks, highest priority served first (worker/dispatch.py is the one
        caller). A chunk whose job has ``not_before`` in the future is scheduled for then
        (Huey keeps the schedule across restarts)."""
        count = 0
        now = dt.datetime.now(dt.timezone.utc).timestamp()
        for chunk in chunks:
            # Huey compares etas as naive UTC datetimes when utc=True; a datetime ends
            # with year 9999 (`submit --at` refuses later times; older jobs may have one).
            start = min(chunk.not_before or 0, settings.LATEST_START)
            eta = (dt.datetime.fromtimestamp(start, dt.timezone.utc).replace(tzinfo=None)
                   if start > now else None)
            kwargs = {"model": chunk.model, "not_before": chunk.not_before}
            args = (chunk.job_id, chunk.lo, chunk.hi)
            if eta is None:
                self.huey.enqueue(self._task.s(*args, priority=chunk.priority, **kwargs))
            else:
                self._task.schedule(args=args, kwargs=kwargs, eta=eta, priority=chunk.priority)
            count += 1
        return count

    def pending(self) -> int:
        """Tasks waiting in the queue now (not counting scheduled ones)."""
        return self.huey.pending_count()
