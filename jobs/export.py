"""Export a job's results, streamed in input order: OpenAI Batch output JSONL, CSV, or
Parquet.

The JSONL line is the OpenAI Batch API's output line, so existing batch tooling
reads it; nightshift's own timings ride along in an extra "nightshift" field. CSV and
Parquet are one flat row per request with the same columns, typed in Parquet. A job
submitted from a table (``submit --template``) gives its input columns back in each.
"""

from __future__ import annotations

import csv
import io
import os
import secrets
import stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import orjson
from nightshift.jobs.errors import NightshiftError
from nightshift.jobs.vocabulary import DONE, ttft_seconds

if TYPE_CHECKING:  # the CLI imports this module for FORMATS: keep it light
    from nightshift.jobs.reads import Reads
    from nightshift.jobs.tables import InputColumn

CSV_COLUMNS = [
    "line", "custom_id", "status", "response", "finish_reason", "prompt_tokens",
    "cached_tokens", "completion_tokens", "queued_at", "started_at", "first_token_at",
    "finished_at", "ttft_s", "prompt_tps", "generation_tps", "attempts", "error", "metadata",
]
# Columns holding text from a user or a model; the others are numbers.
CSV_TEXT_COLUMNS = ("custom_id", "status", "response", "finish_reason", "error", "metadata")
# A cell starting with one of these is run as a formula by Excel, LibreOffice and Google
# Sheets ("CSV injection"): a model's answer could fetch URLs or run commands there.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# The Parquet types of CSV_COLUMNS: times as UTC timestamps, counts as 64-bit integers,
# rates and seconds as doubles, the rest (metadata as JSON) text.
PARQUET_TIMES = ("queued_at", "started_at", "first_token_at", "finished_at")
PARQUET_INTEGERS = ("line", "prompt_tokens", "cached_tokens", "completion_tokens", "attempts")
PARQUET_FLOATS = ("ttft_s", "prompt_tps", "generation_tps")
# A Parquet row group is written once it holds this many rows or this many bytes of
# text: what the export holds in memory, whatever the job's size. A million rows of
# 150-character answers and inputs export with ~100 MB over the process's own ~110 MB
# at peak (tests/test_tables.py), at ~60,000 rows a second on 2 cores; pandas, polars
# and DuckDB read row groups this size as well as larger ones.
PARQUET_ROW_GROUP_ROWS = 16_384
PARQUET_ROW_GROUP_BYTES = 16 << 20


def _timings(row, queued_at: float) -> dict:
    return {
        "queued_at": queued_at, "started_at": row.started_at,
        "first_token_at": row.first_token_at, "finished_at": row.finished_at,
        "ttft_s": ttft_seconds(row.started_at, row.first_token_at),
        "prompt_tps": row.prompt_tps, "generation_tps": row.generation_tps,
    }


def completion_logprobs(content: list[dict]) -> dict:
    """The chat shape of log-probabilities (as stored) in the completions endpoint's."""
    offsets, at = [], 0
    for entry in content:
        offsets.append(at)
        at += len(entry["token"])
    return {"tokens": [e["token"] for e in content],
            "token_logprobs": [e["logprob"] for e in content],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}
                             for e in content],
            "text_offset": offsets}


def _message(content: str, reasoning: str | None) -> dict:
    message = {"role": "assistant", "content": content}
    if reasoning is not None:  # a reasoning model's thinking, as OpenAI's reasoning models
        message["reasoning_content"] = reasoning
    return message


def batch_record(row, job) -> dict:
    """One request as an OpenAI Batch output line (plus the "nightshift" field)."""
    extra = {
        "status": row.status, "line": row.line_no, "attempts": row.attempts,
        "cached_tokens": row.cached_tokens,
        "metadata": orjson.loads(row.metadata) if row.metadata else None,
        **_timings(row, job.created_at),
    }
    if row.input_row is not None:  # a table's row (submit --template), as it came in
        extra["columns"] = orjson.loads(row.input_row)
    record = {"id": f"batch_req_{job.id}_{row.seq}", "custom_id": row.custom_id,
              "response": None, "error": None, "nightshift": extra}
    if row.status != DONE:
        code = {"failed": "request_failed", "cancelled": "cancelled",
                "expired": "batch_expired"}.get(row.status, "not_finished")
        message = row.error or f"the request is {row.status}"
        record["error"] = {"code": code, "message": message}
        return record
    usage = {"prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens,
             "total_tokens": (row.prompt_tokens or 0) + (row.completion_tokens or 0),
             "prompt_tokens_details": {"cached_tokens": row.cached_tokens or 0}}
    created = int(row.finished_at)
    samples = orjson.loads(row.choices) if row.choices else [
        {"text": row.response, "finish_reason": row.finish_reason, "reasoning": row.reasoning,
         "logprobs": orjson.loads(row.logprobs) if row.logprobs else None}]
    if row.kind == "completion":
        choices = [{"index": i, "text": s["text"],
                    "logprobs": None if s["logprobs"] is None
                    else completion_logprobs(s["logprobs"]),
                    "finish_reason": s["finish_reason"]} for i, s in enumerate(samples)]
        body = {"id": f"cmpl-{job.id}-{row.seq}", "object": "text_completion",
                "created": created, "model": job.model, "choices": choices, "usage": usage}
    else:
        choices = [{"index": i, "message": _message(s["text"], s.get("reasoning")),
                    "logprobs": None if s["logprobs"] is None
                    else {"content": s["logprobs"], "refusal": None},
                    "finish_reason": s["finish_reason"]} for i, s in enumerate(samples)]
        body = {"id": f"chatcmpl-{job.id}-{row.seq}", "object": "chat.completion",
                "created": created, "model": job.model, "choices": choices, "usage": usage}
    record["response"] = {"status_code": 200, "request_id": f"{job.id}-{row.seq}", "body": body}
    return record


def iter_jsonl(store: Reads, job_id: str) -> Iterator[bytes]:
    """Export lines (bytes, newline-terminated), one per request in input order."""
    job = store.job(job_id)
    for row in store.iter_requests(job_id):
        yield orjson.dumps(batch_record(row, job)) + b"\n"


def _input_columns(store: Reads, job_id: str) -> list[InputColumn]:
    """A table job's input columns (none for a job of request lines)."""
    stored = store.input_columns(job_id)
    if stored is None:
        return []
    from nightshift.jobs.tables import input_columns

    return input_columns(stored, taken=CSV_COLUMNS)


def flat_columns(inputs: list[InputColumn]) -> list[str]:
    """A flat export's columns: CSV_COLUMNS with a table's after ``custom_id``."""
    at = CSV_COLUMNS.index("custom_id") + 1
    return CSV_COLUMNS[:at] + [c.export_name for c in inputs] + CSV_COLUMNS[at:]


# What a flat export reads of each request (not the prompt, nor log-probabilities).
FLAT_READS = ("line_no", "custom_id", "status", "response", "finish_reason", "prompt_tokens",
              "cached_tokens", "completion_tokens", "attempts", "error", "metadata",
              "started_at", "first_token_at", "finished_at", "prompt_tps", "generation_tps",
              "input_row")


def flat_record(row, job) -> dict:
    """One request as CSV_COLUMNS (without a table's input columns)."""
    return {
        "line": row.line_no, "custom_id": row.custom_id, "status": row.status,
        "response": row.response, "finish_reason": row.finish_reason,
        "prompt_tokens": row.prompt_tokens, "cached_tokens": row.cached_tokens,
        "completion_tokens": row.completion_tokens, "attempts": row.attempts,
        "error": row.error, "metadata": row.metadata,
        **_timings(row, job.created_at),
    }


def csv_header(inputs: list[InputColumn] | None = None) -> bytes:
    """The CSV header line, which goes before ``iter_csv``'s rows."""
    buf = io.StringIO()
    csv.writer(buf).writerow(flat_columns(inputs or []))
    return buf.getvalue().encode()


def neutralise(cell: str | None) -> str | None:
    """A text cell a spreadsheet shows as text: one that would start a formula gets a
    leading single quote (OWASP's advice for CSV injection)."""
    return "'" + cell if cell and cell.startswith(FORMULA_START) else cell


def iter_csv(store: Reads, job_id: str, *, raw_cells: bool = False) -> Iterator[bytes]:
    """CSV rows (bytes), one per request in input order; ``csv_header()`` goes first.

    Text cells that a spreadsheet would run as a formula are neutralised (see
    ``neutralise``) unless ``raw_cells``; numbers are written as they are.
    """
    job = store.job(job_id)
    inputs = _input_columns(store, job_id)
    if inputs:
        from nightshift.jobs.tables import cell_text
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=flat_columns(inputs))
    for row in store.iter_requests(job_id, columns=FLAT_READS):
        record = flat_record(row, job)
        if not raw_cells:
            for column in CSV_TEXT_COLUMNS:
                record[column] = neutralise(record[column])
        if inputs:
            values = orjson.loads(row.input_row) if row.input_row else {}
            for column in inputs:
                cell = cell_text(values.get(column.name), column)
                record[column.export_name] = (neutralise(cell) if column.text and not raw_cells
                                              else cell)
        writer.writerow(record)
        yield buf.getvalue().encode()
        buf.seek(0)
        buf.truncate()


def iter_parquet(store: Reads, job_id: str, *,
                 row_group_rows: int = PARQUET_ROW_GROUP_ROWS) -> Iterator[bytes]:
    """A Parquet file's bytes, a row group at a time: the CSV's columns, typed (see
    PARQUET_TIMES...), with a table's input columns in their own types."""
    import pyarrow as pa
    from nightshift.jobs.tables import ParquetChunks, arrow_array, arrow_type, timestamps

    job = store.job(job_id)
    inputs = _input_columns(store, job_id)
    types = {name: pa.timestamp("us", tz="UTC") if name in PARQUET_TIMES
             else pa.int64() if name in PARQUET_INTEGERS
             else pa.float64() if name in PARQUET_FLOATS else pa.string()
             for name in CSV_COLUMNS}
    at = CSV_COLUMNS.index("custom_id") + 1
    fields = [pa.field(name, types[name]) for name in CSV_COLUMNS[:at]] + [
        pa.field(c.export_name, arrow_type(c.kind)) for c in inputs] + [
        pa.field(name, types[name]) for name in CSV_COLUMNS[at:]]
    writer = ParquetChunks(pa.schema(fields))

    def row_group(rows: list) -> bytes:
        # Column by column over the group's records: list comprehensions, not a Python
        # step per cell, are what keep a million rows to seconds.
        records = [flat_record(row, job) for row in rows]
        own = {name: timestamps([r[name] for r in records]) if name in PARQUET_TIMES
               else pa.array([r[name] for r in records], types[name])
               for name in CSV_COLUMNS}
        given = []
        if inputs:
            values = [orjson.loads(row.input_row) if row.input_row else {} for row in rows]
            given = [arrow_array([v.get(c.name) for v in values], c) for c in inputs]
        return writer.write([own[name] for name in CSV_COLUMNS[:at]] + given
                            + [own[name] for name in CSV_COLUMNS[at:]])

    rows: list = []
    size = 0
    for row in store.iter_requests(job_id, columns=FLAT_READS):
        rows.append(row)
        size += len(row.response or "") + len(row.input_row or "") + len(row.error or "")
        if len(rows) >= row_group_rows or size >= PARQUET_ROW_GROUP_BYTES:
            yield row_group(rows)
            rows, size = [], 0
    if rows:
        yield row_group(rows)
    yield writer.close()


FORMATS = {"jsonl": iter_jsonl, "csv": iter_csv, "parquet": iter_parquet}


def export(store: Reads, job_id: str, fmt: str, out: str | None, *, force: bool = False,
           stdout: BinaryIO | None = None, raw_cells: bool = False) -> int:
    """Write a job's export to ``out`` (atomically; never over a file unless forced)
    or to ``stdout``. Returns the number of records. ``raw_cells``: see ``iter_csv``.

    Raises:
        NightshiftError: ``out`` exists (a dangling link included) and ``force`` is not
            set; its folder does not exist or cannot be written; Parquet to a terminal.
        NotFound: no such job.
    """
    job = store.job(job_id)  # NotFound before anything is written
    sink = (stdout or sys.stdout.buffer) if out is None else None
    if fmt == "csv":  # the header is not a record
        header = csv_header(_input_columns(store, job_id))
        rows = iter_csv(store, job_id, raw_cells=raw_cells)
    else:
        if fmt == "parquet" and sink is not None and sink.isatty():
            raise NightshiftError("Parquet is binary: write it to a file with -o FILE, or "
                                  "redirect the output")
        header, rows = b"", FORMATS[fmt](store, job_id)
    count = 0
    if sink is not None:
        sink.write(header)
        for record in rows:
            sink.write(record)
            count += 1
        sink.flush()
    else:
        count = write_file(out, rows, force=force, header=header)
    return job.total if fmt == "parquet" else count  # its chunks are row groups


def write_file(out: str, chunks: Iterable[bytes], *, force: bool = False,
               header: bytes = b"") -> int:
    """Write ``header`` and ``chunks`` to ``out`` atomically, never over a file unless
    forced; returns how many chunks. Raises NightshiftError as ``export`` says."""
    path = Path(out)
    fd, tmp = _open_temporary(path, force)
    count = 0
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            for chunk in chunks:
                f.write(chunk)
                count += 1
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def _open_temporary(path: Path, force: bool) -> tuple[int, Path]:
    """A new file beside ``path`` to write the export into, then rename over ``path``.

    It gets the permissions ``open(path, "w")`` would give: those of the file it
    replaces, else 0666 less the umask (mkstemp's 0600 would hide results from a
    group that reads them). Raises NightshiftError as ``export`` says.
    """
    try:
        existing = path.lstat()  # the link itself: a dangling link exists too
    except FileNotFoundError:
        existing = None
    if existing is not None and not force:
        raise NightshiftError(f"{path} exists: pass --force to overwrite it, or choose another -o")
    folder = path.parent
    if not folder.is_dir():
        raise NightshiftError(f"cannot write {path}: folder {folder} does not exist"
                              if not folder.exists() else
                              f"cannot write {path}: {folder} is not a folder")
    while True:
        tmp = folder / f".{path.name}.{secrets.token_hex(4)}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise NightshiftError(f"cannot write {path}: {e.strerror}") from e
        break
    # A replaced regular file keeps its mode; a replaced link does not lend its target's.
    if existing is not None and stat.S_ISREG(existing.st_mode):
        os.fchmod(fd, stat.S_IMODE(existing.st_mode))
    return fd, tmp
