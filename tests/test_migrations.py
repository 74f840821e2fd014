"""Upgrades keep data: a database made by any earlier release opens with today's schema,
its rows intact, on SQLite and PostgreSQL.

The old databases are built from the DDL those releases produced, captured here (SQLAlchemy's
CreateTable/CreateIndex of each commit's jobs/schema.py, and the ALTERs its migrations
ran), never from today's code, so that later edits to jobs/ cannot make them look newer.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from nightshift.jobs import migrations, schema
from nightshift.jobs.database import open_reads
from nightshift.jobs.store import Store

from tests.backends import postgres_database

# Migrations that have shipped, in order. Append new ones; never rename or reorder: the
# names are what a database records.
SHIPPED = ["m001_initial", "m002_job_counts", "m003_worker_engine_counters"]

# -- the DDL of earlier releases ------------------------------------------------------
# CreateTable's output for SQLite; PostgreSQL's differs only in the autoincrement ids,
# SERIAL for {serial}.

JOBS_6426B12 = """CREATE TABLE jobs (
    id VARCHAR(32) NOT NULL,
    name TEXT,
    model TEXT NOT NULL,
    source TEXT,
    priority INTEGER NOT NULL,
    not_before FLOAT,
    defaults TEXT NOT NULL,
    total INTEGER NOT NULL,
    created_at FLOAT NOT NULL,
    cancelled_at FLOAT,
    peak_memory BIGINT,
    started_at FLOAT,
    finished_at FLOAT,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    PRIMARY KEY (id)
)"""

# 8f33624 declared the job counters in the table, with the columns before them unchanged.
JOBS_8F33624 = JOBS_6426B12.replace("""    completion_tokens BIGINT NOT NULL,
""", """    completion_tokens BIGINT NOT NULL,
    n_queued BIGINT DEFAULT '0' NOT NULL,
    n_running BIGINT DEFAULT '0' NOT NULL,
    n_done BIGINT DEFAULT '0' NOT NULL,
    n_failed BIGINT DEFAULT '0' NOT NULL,
    n_cancelled BIGINT DEFAULT '0' NOT NULL,
    prompt_tps_sum FLOAT DEFAULT '0' NOT NULL,
    prompt_tps_n BIGINT DEFAULT '0' NOT NULL,
""")

REQUESTS = """CREATE TABLE requests (
    id {serial} NOT NULL,
    job_id VARCHAR(32) NOT NULL,
    seq INTEGER NOT NULL,
    line_no INTEGER NOT NULL,
    custom_id TEXT,
    kind VARCHAR(16) NOT NULL,
    body TEXT NOT NULL,
    params TEXT,
    metadata TEXT,
    status VARCHAR(16) NOT NULL,
    attempts INTEGER NOT NULL,
    worker_id VARCHAR(128),
    started_at FLOAT,
    first_token_at FLOAT,
    finished_at FLOAT,
    response TEXT,
    finish_reason VARCHAR(16),
    prompt_tokens INTEGER,
    cached_tokens INTEGER,
    completion_tokens INTEGER,
    prompt_tps FLOAT,
    generation_tps FLOAT,
    error TEXT,
    PRIMARY KEY (id),
    FOREIGN KEY(job_id) REFERENCES jobs (id)
)"""

REQUEST_INDEXES = [
    "CREATE UNIQUE INDEX requests_job_seq ON requests (job_id, seq)",
    "CREATE INDEX requests_job_status ON requests (job_id, status)",
    "CREATE INDEX requests_status ON requests (status)",
]

DONE_TTFT_INDEX = ("CREATE INDEX requests_done_ttft ON requests (job_id, (first_token_at - "
                   "started_at)) WHERE status = 'done' AND first_token_at IS NOT NULL")

WORKERS_6426B12 = """CREATE TABLE workers (
    id VARCHAR(128) NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    serves TEXT,
    model TEXT,
    state VARCHAR(16) NOT NULL,
    compute TEXT,
    memory TEXT,
    batch_size INTEGER,
    load_seconds FLOAT,
    warmup_seconds FLOAT,
    peak_memory BIGINT,
    started_at FLOAT NOT NULL,
    heartbeat_at FLOAT NOT NULL,
    stopped_at FLOAT,
    PRIMARY KEY (id)
)"""

# 57b23b3 added the engine counters to the table (without a migration).
WORKERS_57B23B3 = WORKERS_6426B12.replace("""    stopped_at FLOAT,
""", """    stopped_at FLOAT,
    decode_steps BIGINT,
    sequences_decoded BIGINT,
    prompt_tokens_computed BIGINT,
""")

MODEL_SWITCHES = """CREATE TABLE model_switches (
    id {serial} NOT NULL,
    worker_id VARCHAR(128) NOT NULL,
    from_model TEXT,
    to_model TEXT NOT NULL,
    unload_seconds FLOAT,
    load_seconds FLOAT,
    warmup_seconds FLOAT,
    at FLOAT NOT NULL,
    PRIMARY KEY (id)
)"""

MIGRATIONS_TABLE = """CREATE TABLE nightshift_migrations (
    name VARCHAR(128) NOT NULL,
    applied_at FLOAT NOT NULL,
    PRIMARY KEY (name)
)"""

# What 8f33624's m002 ran on a database made before it.
M002_AS_SHIPPED = [
    *[f"ALTER TABLE jobs ADD COLUMN n_{s} BIGINT NOT NULL DEFAULT 0"
      for s in ("queued", "running", "done", "failed", "cancelled")],
    "ALTER TABLE jobs ADD COLUMN prompt_tps_sum FLOAT NOT NULL DEFAULT 0",
    "ALTER TABLE jobs ADD COLUMN prompt_tps_n BIGINT NOT NULL DEFAULT 0",
    DONE_TTFT_INDEX.replace("CREATE INDEX", "CREATE INDEX IF NOT EXISTS"),
]

FIRST_RELEASE = [MIGRATIONS_TABLE, JOBS_6426B12, REQUESTS, *REQUEST_INDEXES, WORKERS_6426B12,
                 MODEL_SWITCHES]

# Each earlier database: its DDL, the migrations it records, and whether it has the job
# counters (m002) and the workers' engine counters (57b23b3).
VERSIONS = {
    # The first release, opened by nothing newer.
    "6426b12": (FIRST_RELEASE, ["m001_initial"], False, False),
    # The first release's database opened by 8f33624 or later: m002 ran, no engine counters.
    "6426b12+m002": (FIRST_RELEASE + M002_AS_SHIPPED, ["m001_initial", "m002_job_counts"],
                     True, False),
    # Created at 57b23b3: m001's create_all made that commit's tables.
    "57b23b3": ([MIGRATIONS_TABLE, JOBS_6426B12, REQUESTS, *REQUEST_INDEXES, WORKERS_57B23B3,
                 MODEL_SWITCHES], ["m001_initial"], False, True),
    # Created at 8f33624 or later (until m003): today's tables, m001 and m002 recorded.
    "8f33624": ([MIGRATIONS_TABLE, JOBS_8F33624, REQUESTS, *REQUEST_INDEXES, DONE_TTFT_INDEX,
                 WORKERS_57B23B3, MODEL_SWITCHES], ["m001_initial", "m002_job_counts"],
                True, True),
}


def build(url: str, statements: list[str], recorded: list[str]) -> None:
    engine = sa.create_engine(url)
    serial = "SERIAL" if engine.dialect.name == "postgresql" else "INTEGER"
    with engine.begin() as conn:
        for sql in statements:
            conn.exec_driver_sql(sql.replace("{serial}", serial))
        for name in recorded:
            conn.execute(sa.text("INSERT INTO nightshift_migrations VALUES (:n, :t)"),
                         {"n": name, "t": time.time()})
    engine.dispose()


NOW = float(int(time.time()))  # whole seconds: exact differences


def add_rows(url: str, job_counts: bool, engine_counters: bool) -> None:
    """A job of three requests (two done, one queued), a worker of this process and a
    model switch, as the release of that schema would have written them."""
    engine = sa.create_engine(url)
    job = {"id": "j1", "name": "old", "model": "m", "source": "in.jsonl", "priority": 0,
           "defaults": "{}", "total": 3, "created_at": NOW - 100, "started_at": NOW - 90,
           "prompt_tokens": 10, "completion_tokens": 20}
    if job_counts:
        job |= {"n_done": 2, "n_queued": 1, "prompt_tps_sum": 300.0, "prompt_tps_n": 2}
    worker = {"id": "w1", "host": socket.gethostname(), "pid": os.getpid(), "state": "idle",
              "model": "m", "started_at": NOW, "heartbeat_at": NOW}
    if engine_counters:
        worker |= {"decode_steps": 1, "sequences_decoded": 2, "prompt_tokens_computed": 3}
    with engine.begin() as conn:
        insert(conn, "jobs", job)
        for seq in range(3):
            row = {"job_id": "j1", "seq": seq, "line_no": seq + 1, "custom_id": f"c{seq}",
                   "kind": "completion", "body": f'"q{seq}"', "status": "queued",
                   "attempts": 0}
            if seq < 2:
                row |= {"status": "done", "attempts": 1, "worker_id": "w1",
                        "started_at": NOW - 90, "first_token_at": NOW - 90 + seq + 1,
                        "finished_at": NOW - 80, "response": f"a{seq}", "finish_reason":
                        "stop", "prompt_tokens": 5, "completion_tokens": 10,
                        "prompt_tps": 100.0 + 100 * seq}
            insert(conn, "requests", row)
        insert(conn, "workers", worker)
        insert(conn, "model_switches", {"worker_id": "w1", "from_model": None,
                                        "to_model": "m", "load_seconds": 1.0, "at": NOW})
    engine.dispose()


def insert(conn, table: str, row: dict) -> None:
    conn.execute(sa.text(f"INSERT INTO {table} ({', '.join(row)}) "
                         f"VALUES ({', '.join(':' + k for k in row)})"), row)


def shape(url: str) -> dict:
    """The tables' columns (name, type, nullable) and the index names, as the database
    reports them."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        tables = {t: {(c["name"], str(c["type"]), c["nullable"])
                      for c in inspector.get_columns(t)} for t in inspector.get_table_names()}
        sql = ("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'"
               if engine.dialect.name == "postgresql" else
               "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
        indexes = set(conn.exec_driver_sql(sql).scalars())
    engine.dispose()
    return {"tables": tables, "indexes": indexes}


@contextmanager
def empty_database(backend: str, tmp_path: Path, name: str) -> Iterator[str]:
    """The URL of an empty database: a SQLite file in ``tmp_path``, or a fresh database on
    the PostgreSQL server of NIGHTSHIFT_TEST_POSTGRES_URL (skipped without one)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / (name + '.db')}"
        return
    with postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def url(backend, tmp_path):
    with empty_database(backend, tmp_path, "old") as url:
        yield url


@pytest.fixture
def fresh_shape(backend, tmp_path) -> dict:
    """The shape of a database today's Store creates, on the same kind of server."""
    with empty_database(backend, tmp_path, "fresh") as url:
        Store(url).close()
        return shape(url)


def test_shipped_migration_names_are_frozen():
    assert migrations.names()[:len(SHIPPED)] == SHIPPED


@pytest.mark.parametrize("version", VERSIONS)
def test_an_earlier_database_opens_with_todays_schema_and_its_rows(url, fresh_shape, version):
    statements, recorded, job_counts, engine_counters = VERSIONS[version]
    build(url, statements, recorded)
    add_rows(url, job_counts, engine_counters)

    store = Store(url)
    try:
        after = shape(url)
        for table in schema.metadata.sorted_tables:
            have = {name: nullable for name, _, nullable in after["tables"][table.name]}
            assert {c.name: c.nullable for c in table.columns} == have, table.name
            assert {i.name for i in table.indexes} <= after["indexes"], table.name
        assert after == fresh_shape

        # The rows are all there, and the job's counters agree with its requests.
        [job] = store.list_jobs()
        assert (job.id, job.name, job.total, job.counts) == ("j1", "old", 3,
                                                             {"done": 2, "queued": 1})
        assert (job.prompt_tokens, job.completion_tokens) == (10, 20)
        assert store.request_stats("j1") == {"ttft_p50": 1.0, "ttft_p95": 2.0,
                                             "prompt_tps_mean": 150.0}
        assert [r.response for r in store.iter_requests("j1")] == ["a0", "a1", None]
        assert [s.to_model for s in store.switches()] == ["m"]

        store.update_worker("w1", state="running", decode_steps=100, sequences_decoded=400,
                            prompt_tokens_computed=5000)
        [worker] = store.live_workers()
        assert (worker.id, worker.state, worker.decode_steps, worker.sequences_decoded,
                worker.prompt_tokens_computed) == ("w1", "running", 100, 400, 5000)

        reads = open_reads(url)  # on SQLite, sqlite3 straight on the now migrated file
        try:
            assert reads.list_jobs() == store.list_jobs()
            # heartbeat_age is read at each call: compare the rest
            assert [w.id for w in reads.live_workers()] == [w.id for w in store.live_workers()]
        finally:
            reads.close()
        with store.read() as conn:
            recorded = conn.execute(sa.text("SELECT name FROM nightshift_migrations"))
            assert sorted(recorded.scalars()) == sorted(migrations.names())
    finally:
        store.close()


@pytest.mark.parametrize("upto", [1, 2])
def test_each_migration_makes_what_it_made_when_it_shipped(backend, tmp_path, upto):
    """m001 alone makes the first release's tables; m001 and m002 what the first
    release's database got from 8f33624."""
    statements = FIRST_RELEASE + (M002_AS_SHIPPED if upto == 2 else [])
    with empty_database(backend, tmp_path, "expected") as expected, \
            empty_database(backend, tmp_path, "migrated") as migrated:
        build(expected, statements, [])
        build(migrated, [MIGRATIONS_TABLE], [])
        engine = sa.create_engine(migrated)
        with engine.begin() as conn:
            for migration in migrations.MIGRATIONS[:upto]:
                migration(conn)
        engine.dispose()
        assert shape(migrated) == shape(expected)


def test_concurrent_first_opens_all_succeed_and_migrate_once(url):
    """Processes starting together on a new database (a worker and a submit, say) each
    open a Store: one migrates, the others wait for it and find the work done."""
    n = 8
    start = threading.Barrier(n)
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            start.wait()
            Store(url).close()
        except BaseException as e:  # reported below, with the others
            errors.append(e)

    threads = [threading.Thread(target=open_store) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store = Store(url)
    try:
        with store.read() as conn:
            recorded = conn.execute(sa.text("SELECT name FROM nightshift_migrations"))
            assert sorted(recorded.scalars()) == sorted(migrations.names())
    finally:
        store.close()
