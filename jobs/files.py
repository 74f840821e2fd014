"""Files for `nightshift serve` (OpenAI's Files API): uploads, and a job's output and
error files.

An upload is written to ``HOME/files`` as it arrives (``Upload``: never whole in
memory, refused past the server's limit), then read back through the reader `submit`
uses (``formats.iter_requests``) and kept under its id with what the check found: how
many requests, the bad lines (what a batch made from it fails with), and each kind of
request and each model its lines name, with the first line of each. Only ids made
here reach the disk: a client names a file by id, the id is looked up in the
``files`` table, and the path is built from the row's id, never from what was sent.

A job's output file (its done requests) and error file (its failed, cancelled and
expired ones)
have no bytes of their own: they are the job's export lines (``export.batch_record``),
made from the store when read, in input order. So they hold every result stored so far,
and a retried request moves from one to the other.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from nightshift.jobs import settings
from nightshift.jobs.errors import InvalidRequest, NotFound, UploadTooLarge
from nightshift.jobs.export import batch_record
from nightshift.jobs.formats import LineError, iter_requests
from nightshift.jobs.schema import files
from nightshift.jobs.submit import MAX_REPORTED_PROBLEMS
from nightshift.jobs.vocabulary import CANCELLED, DONE, EXPIRED, FAILED
from sqlalchemy import and_, or_, select

if TYPE_CHECKING:
    from nightshift.jobs.store import Store

PURPOSE = "batch"  # the only purpose nightshift keeps files for
OUTPUT_PURPOSE = "batch_output"
FOLDER = "files"
MAX_FILENAME_CHARS = 255
# Models recorded per file: a file naming more is refused anyway (one job runs one model).
MAX_RECORDED_MODELS = 64
# A part file this old was left by a server that was killed mid-upload.
STALE_PART_SECONDS = 3600.0

_UPLOAD_ID = re.compile(r"file-[0-9a-f]{24}")
# A job's output and error files: which requests each holds.
MADE = {"output": (DONE,), "errors": (FAILED, CANCELLED, EXPIRED)}
_MADE_ID = re.compile(r"file-(output|errors)-([A-Za-z0-9]{1,32})")

# What a bad line's reason says -> OpenAI's error code for it (errors.data[].code).
_CODES = [
    (re.compile(r"not valid (JSON|UTF-8)|expected a JSON object"), "invalid_json_line"),
    (re.compile(r"duplicate custom_id"), "duplicate_custom_id"),
    (re.compile(r"(unsupported|missing) url"), "invalid_url"),
    (re.compile(r"line is \d+ bytes long"), "line_too_long"),
    (re.compile(r"body\.model .* differs"), "mismatched_model"),
]
_CODE_PARAMS = {"duplicate_custom_id": "custom_id", "invalid_url": "url",
                "mismatched_model": "body.model"}
# The parameter a reason names first: `body.temperature must be ...`, `unknown field
# 'tools'`, `missing body.messages`, `empty prompt: prompt is blank`.
_PARAM = re.compile(
    r"unknown field '(?P<field>[^']+)'"
    r"|(?:missing |empty prompt: (?:every content in )?)(?P<named>[\w.\[\]]+)"
    r"|(?P<lead>(?:body\.)?[a-z_]+(?:\[\d+\])?(?:\.[a-z_]+(?:\[\d+\])?)*)"
    r" (?:must|is|has|belongs|=|differs)"
)


def line_error(line: int | None, message: str, code: str | None = None,
               param: str | None = None) -> dict:
    """One entry of a batch's ``errors.data``: a reason `submit` gives, with OpenAI's
    ``code`` and the ``param`` it names worked out from it unless given."""
    if code is None:
        code = next((c for pattern, c in _CODES if pattern.match(message)), "invalid_request")
    if param is None and code == "invalid_request":
        if m := _PARAM.match(message):
            param = m["field"] or m["named"] or m["lead"]
    return {"code": code, "line": line, "message": message,
            "param": param or _CODE_PARAMS.get(code)}


def folder() -> Path:
    path = settings.home() / FOLDER
    path.mkdir(exist_ok=True)
    return path


def _path(file_id: str) -> Path:
    """Where an upload's bytes are: only for an id this module made (checked again here)."""
    if not _UPLOAD_ID.fullmatch(file_id):
        raise NotFound(f"No such File object: {file_id}")
    return folder() / f"{file_id}.jsonl"


class Upload:
    """A file arriving over HTTP, written as it comes to a hidden part file in
    ``HOME/files``. ``write`` raises UploadTooLarge past ``limit`` bytes; ``keep``
    checks the file and stores it; ``discard`` removes what was written."""

    def __init__(self, limit: int):
        self.limit = limit
        self.size = 0
        self.id = f"file-{secrets.token_hex(12)}"
        self.part = folder() / f".{self.id}.part"
        self._file = open(self.part, "xb")  # closed by keep or discard

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise UploadTooLarge(
                f"the file is larger than this server takes: at most {self.limit:,} bytes "
                "(nightshift serve --max-upload-mb)", param="file", code="file_too_large")
        self._file.write(data)

    def discard(self) -> None:
        self._file.close()
        self.part.unlink(missing_ok=True)

    def keep(self, store: Store, filename: str, purpose: str) -> dict:
        """Check the file line by line as `submit` does, and keep it under its id;
        returns the file object. A file with bad lines is kept too, with status
        ``error``: a batch made from it fails with its lines' errors, as OpenAI's do."""
        try:
            self._file.close()
            checked = check(self.part, self.id)
            row = {"id": self.id, "purpose": purpose, "filename": filename[:MAX_FILENAME_CHARS],
                   "bytes": self.size, "created_at": time.time(),
                   "status": "error" if checked["errors"] else "processed",
                   "status_details": _details(checked), "checked": orjson.dumps(checked).decode()}
            # Renamed before the row is stored: a crash between leaves a file no id
            # reaches, never an id without its file.
            os.replace(self.part, _path(self.id))
        except BaseException:
            self.discard()
            raise
        try:
            with store.write() as conn:
                conn.execute(files.insert().values(**row))
        except BaseException:
            _path(self.id).unlink(missing_ok=True)
            raise
        return _upload_object(row)


def check(path: Path, source: str) -> dict:
    """Read a file as `submit` reads one (every line, constant memory) and say what is in
    it: ``requests``, ``bad`` lines and the first MAX_REPORTED_PROBLEMS of them as
    ``errors`` (``line_error``), ``kinds`` ({kind: [first line, count]}) and
    ``models`` ({body.model: first line})."""
    requests = bad = 0
    errors: list[dict] = []
    kinds: dict[str, list[int]] = {}
    models: dict[str, int] = {}
    with open(path, "rb") as f:
        for spec in iter_requests(f, source):
            if isinstance(spec, LineError):
                bad += 1
                if len(errors) < MAX_REPORTED_PROBLEMS:
                    errors.append(line_error(spec.line_no, spec.reason))
                continue
            requests += 1
            kinds.setdefault(spec.kind, [spec.line_no, 0])[1] += 1
            if spec.model is not None and len(models) < MAX_RECORDED_MODELS:
                models.setdefault(spec.model, spec.line_no)
    if bad > len(errors):
        errors.append(line_error(None, f"... and {bad - len(errors)} more bad lines",
                                 code="too_many_errors"))
    if not requests and not bad:
        errors.append(line_error(None, "no requests (the file is empty or blank)",
                                 code="empty_file"))
    return {"requests": requests, "bad": bad, "errors": errors, "kinds": kinds,
            "models": models}


def _details(checked: dict) -> str | None:
    if not checked["errors"]:
        return None
    first = checked["errors"][0]
    where = f"line {first['line']}: " if first["line"] else ""
    return (f"{checked['bad']} bad lines of {checked['bad'] + checked['requests']}; "
            f"{where}{first['message']}" if checked["bad"] else first["message"])


def _upload_object(row) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"],
            "created_at": int(row["created_at"]), "filename": row["filename"],
            "purpose": row["purpose"], "status": row["status"],
            "status_details": row["status_details"], "expires_at": None}


def output_file_id(job_id: str) -> str:
    return f"file-output-{job_id}"


def error_file_id(job_id: str) -> str:
    return f"file-errors-{job_id}"


def uploaded(store: Store, file_id: str) -> tuple[dict, Path]:
    """An upload's row (with ``checked`` read) and the path of its bytes.

    Raises:
        NotFound: no upload has this id.
    """
    with store.read() as conn:
        row = conn.execute(select(files).where(files.c.id == file_id)).mappings().first()
    if row is None:
        raise NotFound(f"No such File object: {file_id}")
    row = dict(row)
    row["checked"] = orjson.loads(row["checked"]) if row["checked"] else None
    return row, _path(file_id)


def get(store: Store, file_id: str) -> dict:
    """The file object of an upload or of a job's output or error file.

    Raises:
        NotFound: no such file.
    """
    if made := _MADE_ID.fullmatch(file_id):
        kind, job_id = made.groups()
        job = _job(store, job_id, file_id)
        return {"id": file_id, "object": "file", "bytes": _made_size(store, file_id, job),
                "created_at": int(job.finished_at or job.created_at),
                "filename": f"{job.name or job.id}_{kind}.jsonl", "purpose": OUTPUT_PURPOSE,
                "status": "processed", "status_details": None, "expires_at": None}
    return _upload_object(uploaded(store, file_id)[0])


def content(store: Store, file_id: str) -> Iterator[bytes]:
    """A file's bytes, in pieces. Looked up at once (NotFound before anything is sent),
    read as the pieces are taken."""
    if made := _MADE_ID.fullmatch(file_id):
        kind, job_id = made.groups()
        return _made_lines(store, _job(store, job_id, file_id), MADE[kind])
    path = uploaded(store, file_id)[1]
    try:
        f = open(path, "rb")  # closed by _read
    except FileNotFoundError:  # deleted meanwhile
        raise NotFound(f"No such File object: {file_id}") from None
    return _read(f)


def _read(f) -> Iterator[bytes]:
    with f:
        while chunk := f.read(1 << 20):
            yield chunk


def _job(store: Store, job_id: str, file_id: str):
    try:
        return store.job(job_id)
    except NotFound:
        raise NotFound(f"No such File object: {file_id}") from None


def _made_lines(store: Store, job, statuses: tuple[str, ...]) -> Iterator[bytes]:
    for row in store.iter_requests(job.id):
        if row.status in statuses:
            yield orjson.dumps(batch_record(row, job)) + b"\n"


# Sizes of made files, by their id and what their job's counts were: counting the bytes
# reads every request of the job, so it is done once per state of the job.
_sizes: dict[tuple, int] = {}


def _made_size(store: Store, file_id: str, job) -> int:
    key = (file_id, job.total, tuple(sorted(job.counts.items())), job.finished_at)
    if key not in _sizes:
        if len(_sizes) > 1000:
            _sizes.clear()
        kind = _MADE_ID.fullmatch(file_id)[1]
        _sizes[key] = sum(len(line) for line in _made_lines(store, job, MADE[kind]))
    return _sizes[key]


def delete(store: Store, file_id: str) -> dict:
    """Delete an upload (a batch made from it keeps its requests: they are in its job).
    A job's output and error files are made from the job and go with it: asking to
    delete one deletes nothing and says so (``deleted: false``).

    Raises:
        NotFound: no such file.
    """
    if _MADE_ID.fullmatch(file_id):
        get(store, file_id)
        return {"id": file_id, "object": "file", "deleted": False}
    path = _path(file_id)
    with store.write() as conn:
        if not conn.execute(files.delete().where(files.c.id == file_id)).rowcount:
            raise NotFound(f"No such File object: {file_id}")
    path.unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}


def list_page(store: Store, *, after: str | None = None, limit: int = 10000,
              order: str = "desc", purpose: str | None = None) -> dict:
    """Uploads, newest first (``order="asc"``: oldest first), ``limit`` of them after the
    file ``after``: OpenAI's cursor page (``data``, ``first_id``, ``last_id``,
    ``has_more``). Output and error files are reached through their batches.

    Raises:
        InvalidRequest: ``after`` names no upload.
    """
    newest_first = order == "desc"
    query = select(files)
    if purpose is not None:
        query = query.where(files.c.purpose == purpose)
    with store.read() as conn:
        if after is not None:
            at = conn.execute(select(files.c.created_at).where(files.c.id == after)).scalar()
            if at is None:
                raise InvalidRequest(f"after: no file {after!r}", param="after")
            if newest_first:
                query = query.where(or_(files.c.created_at < at,
                                        and_(files.c.created_at == at, files.c.id < after)))
            else:
                query = query.where(or_(files.c.created_at > at,
                                        and_(files.c.created_at == at, files.c.id > after)))
        keys = (files.c.created_at, files.c.id)
        query = query.order_by(*(k.desc() if newest_first else k.asc() for k in keys))
        rows = conn.execute(query.limit(limit + 1)).mappings().all()
    return page([_upload_object(r) for r in rows], limit)


def page(items: list[dict], limit: int) -> dict:
    """OpenAI's list object from ``limit`` + 1 items read (the one more says there are
    more)."""
    data = items[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(items) > limit}


def sweep_parts(now: float | None = None) -> int:
    """Remove the part files of uploads cut short by a server that was killed; returns
    how many."""
    now = now or time.time()
    removed = 0
    for part in folder().glob(".file-*.part"):
        try:
            if now - part.stat().st_mtime > STALE_PART_SECONDS:
                part.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed
