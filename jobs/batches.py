"""Batches for `nightshift serve` (OpenAI's Batches API): a batch is a job.

Creating one checks its input file (jobs/files.py checked each line when it was
uploaded) against the batch's endpoint and the installed models, then stores and
queues it through the very path `nightshift submit` takes (the caller passes
worker/dispatch.py's ``submit``), as a job named by the batch's id. A file with bad
lines makes a failed batch whose ``errors.data`` hold the reasons `submit` prints, with
OpenAI's ``code``, ``line`` and ``param``.

The batch object is read off its job whenever it is asked for, so the command line and
the server see one truth: ``status`` and ``request_counts`` from the job's counts, the
times from the job's. A job submitted from the command line is a batch too,
``batch_<job id>``, with no input file (``input_file_id`` null) and its name and
source in ``metadata``. Batches created over HTTP have ids of 16 hex digits, which no
job id has (8 or 12), so the two kinds never meet.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from nightshift.jobs import files, notify, settings
from nightshift.jobs.errors import InputError, InvalidRequest, NotFound
from nightshift.jobs.formats import CHAT_URL, COMPLETIONS_URL
from nightshift.jobs.reads import JobSummary
from nightshift.jobs.schema import batches, jobs, requests
from nightshift.jobs.submit import JobOptions, parse_duration
from nightshift.jobs.vocabulary import CANCELLED, DONE, EXPIRED, FAILED, QUEUED, RUNNING
from sqlalchemy import and_, or_, select

if TYPE_CHECKING:
    from nightshift.jobs.store import Store
    from sqlalchemy import Connection

log = logging.getLogger("nightshift.serve")

ENDPOINTS = {CHAT_URL: "chat", COMPLETIONS_URL: "completion"}
# OpenAI's only completion_window, a deadline from the batch's creation; nightshift also
# takes any other duration ("30m", "8h", "2d": jobs/submit.py ``parse_duration``).
COMPLETION_WINDOW = "24h"
MAX_WINDOW_CHARS = 16
# OpenAI's metadata: at most 16 pairs of strings, keys up to 64 characters, values 512.
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
PREFIX = "batch_"
# The statuses after which nothing more happens to a batch's requests.
ENDED = ("completed", "failed", "cancelled", "expired")

# worker/dispatch.py's submit: (store, stream, source, options, model_reference) -> Submitted
Submit = Callable[..., Any]


def create(store: Store, *, input_file_id: Any, endpoint: Any, completion_window: Any,
           metadata: Any = None, submit: Submit,
           model_reference: Callable[[str], str | None]) -> dict:
    """Create a batch from an uploaded file and queue its job; returns the batch object:
    ``in_progress``, or ``failed`` with ``errors`` when the file cannot run as it is.

    The file is stored within this call, at the speed of `submit` (a million lines in
    about 20 s): ``validating`` is what a batch shows meanwhile.

    Raises:
        InvalidRequest: a parameter missing or not accepted (``param`` names it), or an
            input file whose purpose is not ``batch``.
        NotFound: no uploaded file ``input_file_id``.
    """
    _check_parameters(input_file_id, endpoint, completion_window)
    metadata = _check_metadata(metadata)
    upload, path = files.uploaded(store, input_file_id)
    if upload["purpose"] != files.PURPOSE:
        raise InvalidRequest(f"file {input_file_id} has purpose {upload['purpose']!r}; a "
                             f"batch's input file must be uploaded with purpose "
                             f"{files.PURPOSE!r}", param="input_file_id")
    batch_id = _unused_id(store)
    created = time.time()
    with store.write() as conn:
        conn.execute(batches.insert().values(
            id=batch_id, input_file_id=input_file_id, endpoint=endpoint,
            completion_window=completion_window, created_at=created,
            metadata=orjson.dumps(metadata).decode() if metadata is not None else None))
    checked = upload["checked"]
    errors = (checked["errors"] + _endpoint_errors(checked["kinds"], endpoint)
              + _model_errors(checked["models"], model_reference))
    job_id = None
    if not errors:
        try:
            with open(path, "rb") as stream:
                options = JobOptions(name=batch_id,
                                     deadline=created + parse_duration(completion_window))
                done = submit(store, stream, input_file_id, options, model_reference)
        except FileNotFoundError:  # the file was deleted meanwhile
            errors = [files.line_error(None, f"the input file {input_file_id} was deleted",
                                       code="file_not_found", param="input_file_id")]
        except InputError as exc:  # what the upload's check could not see: all models
            errors = _submit_errors(exc, input_file_id)
        except BaseException as exc:  # nothing was stored (see dispatch.submit): say so
            _fail(store, batch_id, [files.line_error(
                None, f"the file could not be stored: {exc or type(exc).__name__}",
                code="server_error")])
            raise
        else:
            job_id = done.job_id
            if done.warning:
                log.warning("batch %s: %s", batch_id, done.warning)
    if job_id is None:
        _fail(store, batch_id, errors)
    else:
        with store.write() as conn:
            conn.execute(batches.update().where(batches.c.id == batch_id)
                         .values(job_id=job_id, in_progress_at=time.time()))
    return get(store, batch_id)


def _fail(store: Store, batch_id: str, errors: list[dict]) -> None:
    with store.write() as conn:
        conn.execute(batches.update().where(batches.c.id == batch_id)
                     .values(failed_at=time.time(), errors=orjson.dumps(errors).decode()))


def _check_parameters(input_file_id: Any, endpoint: Any, completion_window: Any) -> None:
    for name, value in (("input_file_id", input_file_id), ("endpoint", endpoint),
                        ("completion_window", completion_window)):
        if value is None:
            raise InvalidRequest(f"Missing required parameter: '{name}'.", param=name,
                                 code="missing_required_parameter")
        if not isinstance(value, str):
            raise InvalidRequest(f"{name} must be a string", param=name)
    if endpoint not in ENDPOINTS:
        raise InvalidRequest(f"endpoint {endpoint!r} is not supported by nightshift (use "
                             f"{' or '.join(ENDPOINTS)})", param="endpoint")
    seconds = (parse_duration(completion_window)
               if len(completion_window) <= MAX_WINDOW_CHARS else None)
    if not seconds:
        raise InvalidRequest(f"completion_window must be {COMPLETION_WINDOW!r} or another "
                             f"duration (nightshift also takes '30m', '8h', '2d'), got "
                             f"{completion_window!r}", param="completion_window")


def _check_metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest("metadata must be an object of strings", param="metadata")
    if len(value) > METADATA_PAIRS:
        raise InvalidRequest(f"metadata has {len(value)} keys; at most {METADATA_PAIRS} are "
                             "allowed", param="metadata")
    for key, text in value.items():
        if len(key) > METADATA_KEY_CHARS:
            raise InvalidRequest(f"metadata key {key[:70]!r}... is longer than "
                                 f"{METADATA_KEY_CHARS} characters", param="metadata")
        if not isinstance(text, str) or len(text) > METADATA_VALUE_CHARS:
            raise InvalidRequest(f"metadata[{key!r}] must be a string of at most "
                                 f"{METADATA_VALUE_CHARS} characters", param="metadata")
    return value


def _endpoint_errors(kinds: dict[str, list[int]], endpoint: str) -> list[dict]:
    """Lines whose kind of request is not the batch's endpoint's (OpenAI runs one
    endpoint per batch): the first of each other kind."""
    url = {kind: u for u, kind in ENDPOINTS.items()}
    return [files.line_error(
        first, f"line {first} is a {url[kind]} request ({count} such lines in all); this "
        f"batch's endpoint is {endpoint}, and every line must be one of its requests",
        code="mismatched_endpoint", param="url")
        for kind, (first, count) in sorted(kinds.items()) if kind != ENDPOINTS[endpoint]]


def _model_errors(models: dict[str, int], model_reference: Callable[[str], str | None],
                  ) -> list[dict]:
    """The models the lines name (or the default model, where none does) that are
    neither installed nor an alias."""
    named = models.items() if models else [(settings.default_model(), None)]
    return [files.line_error(
        line, f"unknown model {name!r}: install it (nightshift models pull) or name an "
        f"installed model for it (nightshift models alias {name} MODEL)",
        code="model_not_found", param="body.model" if line else None)
        for name, line in named if model_reference(name) is None]


def _submit_errors(exc: InputError, source: str) -> list[dict]:
    """`submit`'s ``FILE:LINE: reason`` problems as ``errors.data`` entries."""
    out = []
    for problem in exc.problems:
        line, message = None, problem
        if problem.startswith(source + ":"):
            rest = problem[len(source) + 1:]
            m = re.match(r"(\d+): (.*)\Z", rest, re.S)
            line, message = (int(m[1]), m[2]) if m else (None, rest.strip())
        out.append(files.line_error(line, message))
    if exc.more:
        out.append(files.line_error(None, f"... and {exc.more} more bad lines",
                                    code="too_many_errors"))
    return out


def _unused_id(store: Store) -> str:
    with store.read() as conn:
        while True:
            batch_id = PREFIX + secrets.token_hex(8)
            if conn.execute(select(batches.c.id).where(batches.c.id == batch_id)).first() is None:
                return batch_id


# -- reading ---------------------------------------------------------------------------


def get(store: Store, batch_id: str) -> dict:
    """The batch object, as OpenAI's, from the store's state now.

    Raises:
        NotFound: no such batch (nor job).
    """
    with store.read() as conn:
        found = _find(conn, batch_id)
        if found is None:
            raise NotFound(f"No such Batch object: {batch_id}")
        row, job = found
        return _object(row, job, _first_kinds(conn, [job] if row is None else []))


def _find(conn: Connection, batch_id: str) -> tuple[dict | None, dict | None] | None:
    """(batch row, job row) of a batch created over HTTP, or (None, job row) of a job
    from the command line (a batch id of ``batch_<job id>``); None if neither."""
    row = conn.execute(select(batches).where(batches.c.id == batch_id)).mappings().first()
    if row is not None:
        return dict(row), _job_row(conn, row["job_id"]) if row["job_id"] else None
    if not batch_id.startswith(PREFIX):
        return None
    job = _job_row(conn, batch_id[len(PREFIX):])
    if job is None:
        return None
    # The job of a batch created over HTTP answers to the batch's own id.
    row = conn.execute(select(batches).where(batches.c.job_id == job["id"])).mappings().first()
    return (dict(row) if row else None), job


def _job_row(conn: Connection, job_id: str) -> dict | None:
    row = conn.execute(select(jobs).where(jobs.c.id == job_id, jobs.c.submitter.is_(None))
                       ).mappings().first()
    return dict(row) if row else None


def _first_kinds(conn: Connection, job_rows: list[dict]) -> dict[str, str]:
    """Each job's first request's kind: the endpoint a job from the command line shows."""
    ids = [j["id"] for j in job_rows]
    if not ids:
        return {}
    rows = conn.execute(select(requests.c.job_id, requests.c.kind)
                        .where(requests.c.job_id.in_(ids), requests.c.seq == 0))
    return dict(rows.all())


def status(row: dict | None, job: JobSummary | None) -> str:
    """OpenAI's batch status from the job's counts: ``validating`` until its job is
    stored (or ``failed`` if it never was), ``in_progress`` while requests are queued
    or running, ``cancelling`` while a cancelled job's running requests finish, then
    ``completed``, ``cancelled``, or ``expired`` once its deadline passed with requests
    unfinished (its finished results stay, as OpenAI's do). Requests that failed leave a
    batch ``completed``, with them counted as failed, as OpenAI's do."""
    if job is None:
        return "failed" if row is not None and row["failed_at"] else "validating"
    remaining = job.counts.get(QUEUED, 0) + job.counts.get(RUNNING, 0)
    if job.cancelled_at:
        return "cancelling" if remaining else "cancelled"
    if job.state == "expired":
        return "expired"
    return "in_progress" if remaining else "completed"


def _object(row: dict | None, job_row: dict | None, first_kinds: dict[str, str]) -> dict:
    job = JobSummary.from_row(job_row) if job_row is not None else None
    state = status(row, job)
    if row is not None:
        batch_id, created = row["id"], row["created_at"]
        in_progress = row["in_progress_at"]
        endpoint, window = row["endpoint"], row["completion_window"]
        metadata = orjson.loads(row["metadata"]) if row["metadata"] else None
        input_file = row["input_file_id"]
    else:
        batch_id, created, in_progress = PREFIX + job.id, job.created_at, job.created_at
        kind = first_kinds.get(job.id, "chat")
        endpoint = next(url for url, k in ENDPOINTS.items() if k == kind)
        window, input_file = _window(job), None
        metadata = {"nightshift_job": job.id, "name": job.name or "",
                    "source": (job_row["source"] or "")[:METADATA_VALUE_CHARS]}
    done = failed = ended_with = 0
    end = None
    if job is not None:
        done, failed = job.counts.get(DONE, 0), job.counts.get(FAILED, 0)
        ended_with = failed + job.counts.get(CANCELLED, 0) + job.counts.get(EXPIRED, 0)
        end = max(t for t in (job.finished_at, job.cancelled_at, job.expired_at, in_progress,
                              created) if t)
    ended = state in ENDED
    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": endpoint,
        "model": job.model if job is not None else None,
        "errors": ({"object": "list", "data": orjson.loads(row["errors"])}
                   if row is not None and row["errors"] else None),
        "input_file_id": input_file,
        "completion_window": window,
        "status": state,
        "output_file_id": files.output_file_id(job.id) if ended and done else None,
        "error_file_id": files.error_file_id(job.id) if ended and ended_with else None,
        "created_at": int(created),
        "in_progress_at": _int(in_progress),
        "expires_at": _int(job.deadline) if job is not None else None,
        # Results are stored as each finishes and the files made from them when read:
        # nothing is left to do at the end, so finalizing and completion are one moment.
        "finalizing_at": _int(end) if state == "completed" else None,
        "completed_at": _int(end) if state == "completed" else None,
        "failed_at": _int(row["failed_at"]) if row is not None else None,
        "expired_at": _int(job.expired_at or job.deadline) if state == "expired" else None,
        "cancelling_at": _int(job.cancelled_at) if job is not None else None,
        "cancelled_at": _int(end) if state == "cancelled" else None,
        "request_counts": {"total": job.total if job is not None else 0,
                           "completed": done, "failed": failed},
        "usage": None,
        "metadata": metadata,
    }


def _window(job: JobSummary) -> str:
    """A command-line job's completion window: from its submission to its deadline. One
    without a deadline shows OpenAI's "24h" (the field is never empty) with a null
    ``expires_at``."""
    if job.deadline is None:
        return COMPLETION_WINDOW
    seconds = max(0, round(job.deadline - job.created_at))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _int(t: float | None) -> int | None:
    return None if t is None else int(t)


def list_page(store: Store, *, after: str | None = None, limit: int = 20) -> dict:
    """Batches, newest first: those created over HTTP and the jobs from the command
    line, ``limit`` of them after the batch ``after`` (OpenAI's cursor page).

    Raises:
        InvalidRequest: ``after`` names no batch.
    """
    linked = select(batches.c.job_id).where(batches.c.job_id.is_not(None))
    http = select(batches)
    cli = select(jobs).where(jobs.c.submitter.is_(None), jobs.c.id.not_in(linked))
    with store.read() as conn:
        if after is not None:
            found = _find(conn, after)
            if found is None:
                raise InvalidRequest(f"after: no batch {after!r}", param="after")
            row, job = found
            at, key = (row["created_at"], row["id"]) if row else (job["created_at"], after)
            http = http.where(or_(batches.c.created_at < at,
                                  and_(batches.c.created_at == at, batches.c.id < key)))
            # batch_<job id> sorts as the job id does: the prefix is common.
            cli = cli.where(or_(jobs.c.created_at < at,
                                and_(jobs.c.created_at == at,
                                     jobs.c.id < key[len(PREFIX):])))
        rows = conn.execute(http.order_by(batches.c.created_at.desc(), batches.c.id.desc())
                            .limit(limit + 1)).mappings().all()
        cli_jobs = conn.execute(cli.order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
                                .limit(limit + 1)).mappings().all()
        merged = sorted([(r["created_at"], r["id"], dict(r), None) for r in rows]
                        + [(j["created_at"], PREFIX + j["id"], None, dict(j))
                           for j in cli_jobs], key=lambda t: (t[0], t[1]),
                        reverse=True)[:limit + 1]
        wanted = [r["job_id"] for _, _, r, _ in merged if r is not None and r["job_id"]]
        job_rows = {j["id"]: dict(j) for j in conn.execute(
            select(jobs).where(jobs.c.id.in_(wanted))).mappings()} if wanted else {}
        pairs = [(r, job_rows.get(r["job_id"]) if r is not None and r["job_id"] else job)
                 for _, _, r, job in merged]
        kinds = _first_kinds(conn, [j for r, j in pairs if r is None])
    return files.page([_object(r, j, kinds) for r, j in pairs], limit)


# -- changing ----------------------------------------------------------------------------


def cancel(store: Store, batch_id: str) -> dict:
    """Cancel a batch: its queued requests are cancelled at once, its running ones
    finish (``cancelling``), and every result finished stays, in the output file.
    Cancelling a cancelled batch changes nothing. The job's --notify runs if it ends here.

    Raises:
        NotFound: no such batch.
        InvalidRequest: the batch has ended (completed or failed).
    """
    batch = get(store, batch_id)
    if batch["status"] in ("cancelling", "cancelled"):
        return batch
    if batch["status"] in ENDED or batch["status"] == "validating":
        raise InvalidRequest(f"Cannot cancel a batch with status {batch['status']!r}.",
                             param="batch_id", code="batch_not_cancellable")
    store.cancel(_job_id(store, batch_id))
    notify.sweep(store)
    return get(store, batch_id)


def _job_id(store: Store, batch_id: str) -> str:
    with store.read() as conn:
        found = _find(conn, batch_id)
    if found is None or found[1] is None:
        raise NotFound(f"No such Batch object: {batch_id}")
    return found[1]["id"]


def recover(store: Store) -> int:
    """Settle the batches a server left ``validating`` when it stopped (one `serve` per
    database): linked to their job where it was stored whole (it is named by the batch's
    id), else failed, to be created again. Returns how many."""
    with store.read() as conn:
        stuck = conn.execute(select(batches.c.id).where(
            batches.c.job_id.is_(None), batches.c.failed_at.is_(None))).scalars().all()
    for batch_id in stuck:
        with store.write() as conn:
            job_id = conn.execute(select(jobs.c.id).where(
                jobs.c.name == batch_id, jobs.c.submitter.is_(None))).scalar()
            if job_id is not None:
                conn.execute(batches.update().where(batches.c.id == batch_id)
                             .values(job_id=job_id, in_progress_at=time.time()))
        if job_id is None:
            _fail(store, batch_id, [files.line_error(
                None, "the server stopped while it stored this batch's file; create the "
                "batch again", code="server_stopped")])
    return len(stuck)


__all__ = ["create", "get", "list_page", "cancel", "recover", "status", "ENDPOINTS"]
