"""Submitting a file: read it as a stream, check every line, store the job whole or not at all."""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from nightshift.jobs import settings, tables
from nightshift.jobs.errors import InputError
from nightshift.jobs.formats import LineError, Params, RequestSpec, iter_requests, validate_params

if TYPE_CHECKING:
    from nightshift.jobs.store import Store

# Bad lines listed in an error report; the rest are counted ("... and N more").
MAX_REPORTED_PROBLEMS = 50


@dataclass
class JobOptions:
    """A job's settings from the command line; a line's own settings override them."""

    model: str | None = None
    name: str | None = None
    params: Params = field(default_factory=Params)
    system: str | None = None
    raw: bool = False
    priority: int = 0
    not_before: float | None = None
    deadline: float | None = None  # --deadline: requests not finished by then expire
    notify: str | None = None  # a shell command run when the job ends (jobs/notify.py)
    # --template: the file is a table, each row a request (jobs/tables.py); --id-column
    # names its column of custom ids.
    template: str | None = None
    id_column: str | None = None

    def defaults(self) -> dict:
        base = Params(max_tokens=settings.DEFAULT_MAX_TOKENS,
                      temperature=settings.DEFAULT_TEMPERATURE, top_p=settings.DEFAULT_TOP_P)
        out = self.params.merged_over(base).to_json()
        if self.system:
            out["system"] = self.system
        out["raw"] = self.raw
        return out


def parse_duration(text: str) -> float | None:
    """"90s", "45m", "8h", "2d", "1h30m" in seconds; None if ``text`` is not one."""
    m = _DURATION.fullmatch(text.strip())
    if m is None or not any(m.groups()):
        return None
    return sum(int(n or 0) * unit for n, unit in zip(m.groups(), (86400, 3600, 60, 1)))


_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_deadline(text: str, now: dt.datetime | None = None, *,
                   option: str = "--deadline") -> float:
    """``--deadline``: a duration from now ("8h", "90m", "1h30m") or a time as ``--at``
    takes it ("07:00", the next one to come, or ISO 8601). Returns a Unix timestamp.

    Raises:
        ValueError: none of those forms, a duration of 0, or a time already past.
    """
    now = now or dt.datetime.now().astimezone()
    seconds = parse_duration(text)
    if seconds is not None:
        if seconds <= 0:
            raise ValueError(f"{option} {text!r}: a deadline must be later than now")
        return min(now.timestamp() + seconds, settings.LATEST_START)
    when = parse_at(text, now, option=option, accepted=(
        "a duration like 8h or 1h30m, a time of day like 07:00, or a date-time like "
        "2026-12-01T07:00 (ISO 8601)"))
    if when <= now.timestamp():
        raise ValueError(f"{option} {text!r}: that time has passed; a deadline must be "
                         "later than now")
    return when


def parse_at(text: str, now: dt.datetime | None = None, *, option: str = "--at",
             accepted: str = "a time of day like 02:00 or a date-time like 2026-12-01T02:00 "
                             "(ISO 8601)") -> float:
    """``--at``: a time of day ("02:00", the next one to come) or an ISO 8601 date-time
    (local time unless it names a zone). Returns a Unix timestamp.

    Raises:
        ValueError: neither form, with what is accepted; or a time later than the queue
            can schedule (settings.LATEST_START).
    """
    now = now or dt.datetime.now().astimezone()
    for fmt in ("%H:%M", "%H:%M:%S"):
        try:
            t = dt.datetime.strptime(text, fmt).time()
        except ValueError:
            continue
        when = now.replace(hour=t.hour, minute=t.minute, second=t.second, microsecond=0)
        if when <= now:
            when += dt.timedelta(days=1)
        return when.timestamp()
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{option} {text!r}: give {accepted}") from None
    try:
        if when.tzinfo is None:
            when = when.astimezone()  # naive: the user's local time
        timestamp = when.timestamp()
    except (OverflowError, ValueError, OSError):  # the ends of year 1 and 9999
        timestamp = None
    if timestamp is None or timestamp > settings.LATEST_START:
        raise ValueError(
            f"{option} {text!r}: beyond the times the queue can schedule (up to 9999-12-30 "
            "UTC); give a nearer date-time"
        )
    return timestamp


class _ModelFromLines:
    """Which model a job runs: --model, else the one its OpenAI lines name, else the default.

    One job runs one model, so lines naming different models are an error.
    """

    def __init__(self, source: str, flag: str | None):
        self.source, self.flag = source, flag
        self.named: str | None = None
        self.first_line = 0

    def check(self, specs: Iterator[RequestSpec | LineError]) -> Iterator:
        for spec in specs:
            if self.flag is None and isinstance(spec, RequestSpec) and spec.model:
                if self.named is None:
                    self.named, self.first_line = spec.model, spec.line_no
                elif spec.model != self.named:
                    yield LineError(
                        self.source, spec.line_no,
                        f"body.model {spec.model!r} differs from {self.named!r} on line "
                        f"{self.first_line}: one job runs one model; split the file or "
                        "pass --model",
                    )
                    continue
            yield spec

    def model(self, model_reference: Callable[[str], str | None]) -> str:
        """The model's reference to store (see ``submit``); InputError if unknown."""
        model = self.flag or self.named or settings.default_model()
        found = model_reference(model)
        if found is None:
            where = (f"named by body.model on {self.source}:{self.first_line}"
                     if not self.flag and self.named else "")
            hint = "pass --model with an installed one" if where else "pull or import it first"
            raise InputError([
                f"unknown model {model!r} {where}".rstrip() + f": {hint} "
                "(nightshift models list; nightshift models pull smollm2)"
            ])
        return found


class _Problems:
    """A file's bad lines: the first MAX_REPORTED_PROBLEMS as ``FILE:LINE: reason``, and
    how many in all."""

    def __init__(self, source: str):
        self.source = source
        self.reported: list[str] = []
        self.bad = 0

    def good(self, specs: Iterator[RequestSpec | LineError]) -> Iterator[RequestSpec]:
        """The good lines up to the first bad one; every line is read and checked.

        Raises:
            InputError: once every line was read, if any was bad or there were none.
        """
        count = 0
        for spec in specs:
            if isinstance(spec, LineError):
                self.bad += 1
                if len(self.reported) < MAX_REPORTED_PROBLEMS:
                    self.reported.append(str(spec))
            elif not self.bad:  # after a bad line, only check the rest
                count += 1
                yield spec
        if not self.bad and count == 0:
            self.reported.append(f"{self.source}: no requests (the file is empty or blank)")
            self.bad = 1
        if self.bad:
            raise InputError(self.reported, more=self.bad - len(self.reported))


def submit(
    store: Store,
    stream: BinaryIO,
    source: str,
    options: JobOptions,
    model_reference: Callable[[str], str | None],
) -> tuple[str, int]:
    """Check and store a whole file as one job; returns (job id, request count).

    ``model_reference`` turns the model a user named into what the job stores (a
    folder as an absolute path: see ``nightshift.worker.registry.reference``), None if unknown.

    With ``options.template`` the file is a table (CSV, TSV, Parquet or JSONL objects of
    columns, see ``nightshift.jobs.tables``): each row is a request, its prompt the
    template filled from its columns, and its columns are kept for the export.

    Partial jobs left by submits that were killed are removed first.

    Raises:
        InputError: bad lines (``FILE:LINE: reason``), an empty file, an unknown model,
            or a table given without a template. Nothing is stored then.
        TemplateError: a template that cannot be used (``tables.Template.parse``).
    """
    validate_params(options.params, "job settings")
    template = None if options.template is None else tables.Template.parse(options.template)
    if template is None:
        if options.id_column is not None:
            raise tables.TemplateError("--id-column names a column of a table: it goes with "
                                       "--template")
        fmt = tables.format_of_name(source)
        if fmt in ("csv", "tsv", "parquet"):
            raise InputError([f"{source}: a {fmt.upper()} file is a table: give --template "
                              "'... {column} ...' to make each row a prompt (README: From a "
                              "table to answers)"])
    store.remove_abandoned_jobs()
    chooser = _ModelFromLines(source, options.model)
    with _read_at_disk_speed(stream) as stream:
        columns = None
        if template is None:
            specs = iter_requests(stream, source, raw_default=options.raw)
        else:
            fmt = tables.format_of_name(source) or tables.table_format(source, _peek(stream))
            table = tables.TableRequests(stream, source, fmt, template,
                                         id_column=options.id_column, raw=options.raw)
            specs, columns = iter(table), table.columns_json
        return store.create_job(
            model=lambda: chooser.model(model_reference),
            defaults=options.defaults(),
            specs=_Problems(source).good(chooser.check(specs)),
            name=options.name,
            source=source,
            priority=options.priority,
            not_before=options.not_before,
            deadline=options.deadline,
            notify=options.notify,
            input_columns=columns,
        )


def _peek(stream: BinaryIO) -> bytes:
    """The first bytes of a stream that ``_read_at_disk_speed`` made seekable."""
    head = stream.read(4096)
    stream.seek(0)
    return head


@contextmanager
def _read_at_disk_speed(stream: BinaryIO) -> Iterator[BinaryIO]:
    """The stream, or for a pipe, socket or terminal a temporary copy of all of it.

    The job is stored batch by batch as the lines are read, and is partial (rows to
    remove if anything fails) until the last one. Fed by a slow producer (``generate |
    nightshift submit -``), it would stay partial for as long as the producer runs,
    and one that stores nothing for SUBMIT_STALE_SECONDS is taken as abandoned. A
    regular file (or one in memory) is read as fast as it is parsed; anything else is
    copied first to a file in NIGHTSHIFT_HOME that is gone when closed.
    """
    try:
        regular = stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (AttributeError, OSError, io.UnsupportedOperation):
        regular = True  # no file descriptor: an in-memory stream
    if regular:
        yield stream
        return
    with tempfile.TemporaryFile(dir=settings.home(), prefix=".submit-") as copy:
        shutil.copyfileobj(stream, copy, 1 << 20)
        copy.seek(0)
        yield copy
