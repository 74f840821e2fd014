"""Where nightshift keeps its data, and every default in one place.

Nothing here is resolved at import time: each function reads the environment when
called, so tests (and flags) can redirect everything.
"""

from __future__ import annotations

import os
from pathlib import Path

from nightshift.jobs.errors import ConfigError

HOME_ENV = "NIGHTSHIFT_HOME"
DATABASE_URL_ENV = "NIGHTSHIFT_DATABASE_URL"
QUEUE_URL_ENV = "NIGHTSHIFT_QUEUE_URL"
MODEL_ENV = "NIGHTSHIFT_MODEL"
API_KEY_ENV = "NIGHTSHIFT_API_KEY"  # nightshift serve --api-key

DEFAULT_HOME = "./data"
DEFAULT_MODEL = "smollm2"
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.0
DEFAULT_TOP_P = 1.0
# Requests per queue task: large enough that a million-line file is a few thousand
# tasks, small enough that a higher-priority job gets in quickly and several
# workers can share one big job.
CHUNK_SIZE = 512
# Job priorities: what the jobs.priority column holds (INTEGER, 32 bits on PostgreSQL).
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1
# A worker whose heartbeat is older than this is taken as gone.
HEARTBEAT_SECONDS = 5.0
HEARTBEAT_STALE_SECONDS = 30.0
# A request whose worker died this many times while running it is failed (worker
# --max-attempts): it is likely what kills the worker.
DEFAULT_MAX_ATTEMPTS = 3
# A job still being stored whose submitter has stored no batch for this long is taken
# as abandoned and removed, even when its process cannot be checked (another host, or
# its pid reused). A live submit stores a batch every ~0.1 s; a pipe is read to its end
# before the first one.
SUBMIT_STALE_SECONDS = 3600.0
# The latest start time a job may have (`submit --at`): 9999-12-31T00:00 UTC. Python's
# datetime, which the queue schedules with, ends in year 9999; a day short of that, so
# no time zone's local time of it does.
LATEST_START = 253_402_214_400.0
# nightshift serve: loopback only unless given another --host (and then an API key).
SERVE_HOST = "127.0.0.1"
SERVE_PORT = 8000
# The largest upload it takes, in MB (10^6 bytes): OpenAI's limit for a batch's input file.
MAX_UPLOAD_MB = 200
# The shortest API key a server reachable from other machines accepts.
MIN_API_KEY_CHARS = 16


def home() -> Path:
    """The data directory (``NIGHTSHIFT_HOME``, default ``./data``), created on demand.

    Raises:
        ConfigError: it does not exist and cannot be created.
    """
    path = Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the data directory {path} ({e.strerror}): choose "
                          f"another with --home / {HOME_ENV}") from e
    return path


def database_url() -> str:
    """SQLAlchemy URL of the results database (``NIGHTSHIFT_DATABASE_URL``)."""
    return os.environ.get(DATABASE_URL_ENV) or f"sqlite:///{home() / 'nightshift.db'}"


def queue_url() -> str:
    """Where the queue lives (``NIGHTSHIFT_QUEUE_URL``): a SQLite path/URL or ``redis://``."""
    return os.environ.get(QUEUE_URL_ENV) or f"sqlite:///{home() / 'queue.db'}"


def models_dir() -> Path:
    """The local model registry: one folder per named model."""
    path = home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_model() -> str:
    """The model a job runs on when it names none (``NIGHTSHIFT_MODEL``)."""
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL
