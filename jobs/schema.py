"""The database tables. Changes go through jobs/migrations.py, never silent create_all drift:
a column or index added here needs a migration that adds it (tests/test_migrations.py
checks that every earlier database reaches these tables).

Times are float seconds since the epoch (UTC): exact, portable between SQLite and
PostgreSQL, and what timing arithmetic wants.
"""

from __future__ import annotations

from nightshift.jobs.vocabulary import DONE_TTFT_WHERE, STATUSES, TTFT, count_column
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
    text,
)

metadata = MetaData()

# Per-status request counts and the sum of done requests' prompt rates, moved by the
# same transaction that moves a request (jobs/store.py ``_move`` and ``finish``), so
# `status` of a million-request job reads one row.
JOB_COUNTERS = [Column(count_column(s), BigInteger, nullable=False, default=0,
                       server_default="0") for s in STATUSES] + [
    Column("prompt_tps_sum", Float, nullable=False, default=0, server_default="0"),
    Column("prompt_tps_n", BigInteger, nullable=False, default=0, server_default="0"),
]

# While a job is being stored (Store.create_job), who stores it (``submitter_identity``)
# and when it last stored a batch; both NULL once the job is whole. Until then its
# counts stay 0, so nothing claims, counts or lists it, and one left behind by a
# killed submit is found by these and removed.
SUBMIT_COLUMNS = [Column("submitter", Text), Column("submit_touched_at", Float)]

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", Text),
    Column("model", Text, nullable=False),
    Column("source", Text),  # the submitted file's name, for messages
    Column("priority", Integer, nullable=False, default=0),
    Column("not_before", Float),  # --at: not started before this time
    Column("defaults", Text, nullable=False),  # JSON: Params + system + raw
    Column("total", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("cancelled_at", Float),
    # submit --deadline (a batch's completion_window): requests not finished by then are
    # expired; expired_at is when the first of them was.
    Column("deadline", Float),
    Column("expired_at", Float),
    Column("peak_memory", BigInteger),  # the worker's peak bytes while serving it
    # submit --notify: a shell command to run once the job has ended, and when it was
    # handed to a process to run (once, whichever process sees the end first).
    Column("notify", Text),
    Column("notified_at", Float),
    # submit --template: the table's columns, a JSON list of {"name", "type"} in the
    # file's order (jobs/tables.py); NULL for a job of request lines.
    Column("input_columns", Text),
    # Running totals over done requests, kept by the same transaction that stores
    # each result, so status of a million-request job needs no scan.
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("prompt_tokens", BigInteger, nullable=False, default=0),
    Column("completion_tokens", BigInteger, nullable=False, default=0),
    *JOB_COUNTERS,
    *SUBMIT_COLUMNS,
)

requests = Table(
    "requests",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(32), ForeignKey("jobs.id"), nullable=False),
    Column("seq", Integer, nullable=False),  # 0-based position in the input
    Column("line_no", Integer, nullable=False),
    Column("custom_id", Text),
    Column("kind", String(16), nullable=False),  # chat | completion
    Column("body", Text, nullable=False),  # JSON: messages list or prompt string
    Column("params", Text),  # JSON: this line's overrides of the job defaults
    Column("metadata", Text),  # JSON object, kept for export
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    # Times a worker died while running it (taken back by Store.recover).
    Column("lost", Integer, nullable=False, default=0, server_default="0"),
    Column("worker_id", String(128)),
    Column("started_at", Float),
    Column("first_token_at", Float),
    Column("finished_at", Float),
    Column("response", Text),
    Column("finish_reason", String(16)),
    Column("prompt_tokens", Integer),
    Column("cached_tokens", Integer),  # prompt tokens served from a shared prefix cache
    Column("completion_tokens", Integer),
    Column("prompt_tps", Float),
    Column("generation_tps", Float),
    Column("error", Text),
    # JSON, for requests that asked: [{"token", "logprob", "bytes", "top_logprobs"}, ...]
    Column("logprobs", Text),
    Column("reasoning", Text),  # a reasoning model's thinking, apart from the answer
    # JSON, for n > 1: [{"text", "finish_reason", "logprobs", "completion_tokens"}, ...]
    Column("choices", Text),
    # JSON object: a table row's columns (jobs/tables.py), kept for export.
    Column("input_row", Text),
)
Index("requests_job_seq", requests.c.job_id, requests.c.seq, unique=True)
Index("requests_job_status", requests.c.job_id, requests.c.status)
Index("requests_status", requests.c.status)
# Done requests in order of time to first token: status reads p50/p95 a few index
# steps from one end instead of sorting them all. Partial, so submit pays nothing.
done_ttft_index = Index(
    "requests_done_ttft", requests.c.job_id, text(f"({TTFT})"),
    sqlite_where=text(DONE_TTFT_WHERE), postgresql_where=text(DONE_TTFT_WHERE),
)

workers = Table(
    "workers",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("host", Text, nullable=False),  # host id: hostname + machine, boot, pid namespace
    Column("pid", Integer, nullable=False),
    Column("serves", Text),  # --model: the only model it serves; NULL = any
    Column("model", Text),  # the model loaded now
    Column("state", String(16), nullable=False),  # a nightshift.jobs.vocabulary.WorkerState
    Column("compute", Text),  # the compute plan, one line
    Column("memory", Text),  # the memory estimate, one line
    Column("batch_size", Integer),
    Column("load_seconds", Float),
    Column("warmup_seconds", Float),
    Column("peak_memory", BigInteger),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    Column("stopped_at", Float),
    # Engine counters since the model was loaded: batch occupancy is
    # sequences_decoded / (decode_steps * batch_size).
    Column("decode_steps", BigInteger),
    Column("sequences_decoded", BigInteger),
    Column("prompt_tokens_computed", BigInteger),
)

model_switches = Table(
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

migrations = Table(
    "nightshift_migrations",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("applied_at", Float, nullable=False),
)

# `nightshift serve` (the OpenAI Files and Batches API; jobs/files.py, jobs/batches.py).
# An uploaded file: its bytes live in HOME/files/ID.jsonl; the row says what it is and
# what checking it found. Output and error files are made from a job's requests when
# read, and have no row.
files = Table(
    "files",
    metadata,
    Column("id", String(64), primary_key=True),  # file-<24 hex>
    Column("purpose", String(32), nullable=False),
    Column("filename", Text, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("status", String(16), nullable=False),  # processed | error (bad lines)
    Column("status_details", Text),
    # JSON: requests, bad lines (the first as errors), and each kind and model's first
    # line: what a batch checks against its endpoint and the installed models.
    Column("checked", Text),
)
Index("files_created", files.c.created_at, files.c.id)

# A batch created over HTTP. Its job (named by the batch's id) holds its requests and
# results; a batch whose file failed the checks has none, only its errors. A job
# submitted from the command line shows as a batch with no row here.
batches = Table(
    "batches",
    metadata,
    Column("id", String(64), primary_key=True),  # batch_<16 hex>
    Column("job_id", String(32)),  # NULL while validating, and for a failed batch
    Column("input_file_id", String(64), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("metadata", Text),  # JSON object, strings to strings
    Column("created_at", Float, nullable=False),
    Column("in_progress_at", Float),
    Column("failed_at", Float),
    Column("errors", Text),  # JSON list of {code, line, message, param}
)
Index("batches_job", batches.c.job_id, unique=True)
Index("batches_created", batches.c.created_at, batches.c.id)
