"""Commands about jobs: submit, status, cancel, retry, export."""

from __future__ import annotations

import sys
import time

import click
from nightshift.cli import output
from nightshift.jobs import settings
from nightshift.jobs.export import FORMATS

# Commands import what they use when they run: `status` must not pay for SQLAlchemy,
# rich or the worker (see jobs/reads.py).


def _schema(path: str) -> str:
    """``--schema FILE``: the response format spec of a JSON Schema file."""
    import orjson
    from nightshift.jobs import response_format

    try:
        with open(path, "rb") as f:
            schema = orjson.loads(f.read())
    except OSError as exc:
        raise click.FileError(path, exc.strerror) from None
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"{path} is not JSON: {exc}", param_hint="--schema") from None
    try:
        return response_format.from_schema(schema, path)
    except response_format.FormatError as exc:
        raise click.BadParameter(str(exc), param_hint="--schema") from None


def _warn(warning: str | None) -> None:
    """A queue that failed once the job was stored: a warning, not an error (see
    worker/dispatch.py)."""
    if warning:
        click.echo(f"warning: {output.printable(warning)}", err=True)


@click.command("submit")
@click.argument("file", type=click.Path(allow_dash=True, dir_okay=False))
@click.option("--model", "-m", help="Model: a registry name, an alias, a model folder or an "
              f"org/name repo id [default: the lines' body.model, else "
              f"{settings.DEFAULT_MODEL}].")
@click.option("--name", help="A name for the job, shown by status.")
@click.option("--max-tokens", type=int, help=f"Tokens to generate at most "
              f"[default {settings.DEFAULT_MAX_TOKENS}].")
@click.option("--temperature", type=float, help="0 is greedy [default 0].")
@click.option("--top-p", type=float, help="Nucleus sampling [default 1].")
@click.option("--seed", type=int, help="Makes sampling reproducible, request by request.")
@click.option("--stop", multiple=True, help="Stop text (repeatable); the answer ends before it.")
@click.option("--system", help="System prompt for chat requests that have none.")
@click.option("--template", metavar="TEXT",
              help="FILE is a table (CSV, TSV, Parquet, or JSONL objects of columns): each row "
              "is a request whose prompt is TEXT with each {column} filled from the row; "
              "{{ and }} are literal braces. The row's columns come back in the export.")
@click.option("--id-column", metavar="COLUMN",
              help="With --template: the column whose values are the requests' custom ids.")
@click.option("--schema", "schema_file", type=click.Path(dir_okay=False),
              help="A JSON Schema file every answer must follow (a line's own "
              "response_format wins).")
@click.option("--raw", is_flag=True, help="Send {\"prompt\"} lines as raw text, no chat template.")
@click.option("--priority", default=0, show_default=True,
              type=click.IntRange(settings.PRIORITY_MIN, settings.PRIORITY_MAX),
              help="Higher runs first.")
@click.option("--at", "at", help='Do not start before this time: "02:00" or ISO 8601.')
@click.option("--deadline", metavar="WHEN",
              help='Requests not finished by then are expired, not run: a duration ("8h", '
              '"1h30m") or a time ("07:00", ISO 8601). Finished answers stay.')
@click.option("--notify", "notify_command", metavar="COMMAND",
              help="A shell command to run when the job ends (done, failed or cancelled), "
              "with NIGHTSHIFT_JOB_ID, _STATE, _DONE, _FAILED... in its environment.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@output.json_option
def submit_cmd(file, model, name, max_tokens, temperature, top_p, seed, stop, system, template,
               id_column,
               schema_file, raw, priority, at, deadline, notify_command, quiet, as_json):
    """Queue a JSONL file of prompts as one job; prints the job id.

    Each non-blank line is one request: {"prompt": "..."}, {"messages": [...]}, or an
    OpenAI Batch API line. The whole file is checked first: if any line is bad, every
    bad line is reported as FILE:LINE: reason and nothing is queued.

    With --template, FILE is a table and each row is a request (CSV and TSV with a
    header row, Parquet, or JSONL objects of columns); a bad row is FILE:ROW: reason.

    \b
    nightshift submit questions.jsonl --max-tokens 512 --at 02:00 --deadline 07:00
    cat batch.jsonl | nightshift submit - --model smollm2 --json
    nightshift submit reviews.csv --template 'Summarise in one sentence: {text}' --id-column id
    """
    from nightshift.jobs.errors import InputError
    from nightshift.jobs.formats import Params
    from nightshift.jobs.store import Store
    from nightshift.jobs.submit import JobOptions, parse_at, parse_deadline
    from nightshift.worker import aliases
    from nightshift.worker.dispatch import submit
    from nightshift.worker.queue import check_url
    from rich.progress import wrap_file

    try:
        not_before = parse_at(at) if at else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--at") from None
    try:
        until = parse_deadline(deadline) if deadline else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--deadline") from None
    if until is not None and not_before is not None and until <= not_before:
        raise click.BadParameter(f"{output.when(until)} is not after --at "
                                 f"{output.when(not_before)}: nothing could run",
                                 param_hint="--deadline")
    _check_template(template, id_column)
    options = JobOptions(
        model=model, name=name, system=system, raw=raw, priority=priority,
        template=template, id_column=id_column,
        not_before=not_before, deadline=until, notify=notify_command or None,
        params=Params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                      stop=tuple(stop) or None,
                      response_format=_schema(schema_file) if schema_file else None),
    )
    source = "<stdin>" if file == "-" else file
    store = Store()
    check_url()  # a queue URL that cannot work with what is installed: before storing
    try:
        if file == "-":
            done = submit(store, sys.stdin.buffer, source, options, aliases.reference)
        else:
            try:
                f = open(file, "rb")
            except OSError as exc:
                raise click.FileError(file, exc.strerror) from None
            with f:
                stream = f
                if not output.quiet_unless_tty(quiet or as_json):
                    stream = wrap_file(f, total=_size(f), description="checking and storing")
                done = submit(store, stream, source, options, aliases.reference)
    except InputError as exc:
        for problem in exc.problems:
            click.echo(output.printable(problem), err=True)
        if exc.more:
            click.echo(f"... and {exc.more} more bad lines", err=True)
        raise click.ClickException(
            f"{output.printable(source)}: nothing was queued; fix the lines above and submit again"
        ) from None
    _warn(done.warning)
    if as_json:
        output.print_json({"id": done.job_id, "requests": done.requests,
                           "queue_tasks": done.queue_tasks, "not_before": not_before,
                           "deadline": until,
                           "warning": done.warning})
        return
    click.echo(done.job_id)
    when = f", not before {output.when(not_before)}" if not_before else ""
    when += f", deadline {output.when(until)}" if until else ""
    click.echo(f"{'stored' if done.warning else 'queued'} {done.requests} requests as job "
               f"{done.job_id}{when}", err=True)


def _check_template(template: str | None, id_column: str | None) -> None:
    """``--template`` and ``--id-column``, checked before anything is read."""
    from nightshift.jobs.tables import Template, TemplateError

    if template is None:
        if id_column is not None:
            raise click.UsageError("--id-column names a column of a table: give --template too")
        return
    try:
        Template.parse(template)
    except TemplateError as exc:
        raise click.BadParameter(str(exc).removeprefix("--template: "),
                                 param_hint="--template") from None


def _size(f) -> int | None:
    try:
        import os

        return os.fstat(f.fileno()).st_size
    except OSError:
        return None


@click.command("status")
@click.argument("job", required=False)
@click.option("--limit", type=int, default=20, show_default=True, help="Jobs to list.")
@click.option("--watch", "-w", is_flag=True,
              help="Keep showing progress, refreshed in place (Ctrl-C stops; with JOB, "
              "stops when it ends). Plain lines when not on a terminal.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between refreshes of --watch.")
@output.json_option
def status_cmd(job, limit, watch, interval, as_json):
    """Show workers and jobs, or one JOB in detail.

    It says plainly whether a worker is running and which model it serves: a job
    queued with no worker running is the classic overnight failure.
    """
    from nightshift.cli.status_view import job_detail, overview, watch_progress
    from nightshift.jobs.database import open_reads

    reads = open_reads()
    if watch:
        if as_json:
            raise click.UsageError("--watch shows progress for people; --json is for scripts")
        watch_progress(reads, job, limit, interval)
    elif job:
        job_detail(reads, job, as_json)
    else:
        overview(reads, limit, as_json)


@click.command("cancel")
@click.argument("job")
@output.json_option
def cancel_cmd(job, as_json):
    """Stop a job's unstarted requests from running; finished results stay."""
    from nightshift.jobs import notify
    from nightshift.jobs.store import Store

    store = Store()
    n = store.cancel(job)
    if notify.sweep(store):  # a job that ends here tells its --notify command at once
        notify.wait()
    if as_json:
        output.print_json({"id": job, "cancelled": n})
    else:
        output.echo(f"cancelled {n} queued requests of job {job}")


@click.command("retry")
@click.argument("job")
@output.json_option
def retry_cmd(job, as_json):
    """Queue a job's failed requests again."""
    from nightshift.jobs.store import Store

    store = Store()
    n = store.retry(job)
    from nightshift.worker.dispatch import queue_job

    warning = queue_job(store, job)[1] if n else None
    _warn(warning)
    if as_json:
        output.print_json({"id": job, "requeued": n, "warning": warning})
    else:
        output.echo(f"queued {n} failed requests of job {job} again")


@click.command("export")
@click.argument("job")
@click.option("--format", "fmt", type=click.Choice(sorted(FORMATS)), default="jsonl",
              show_default=True, help="jsonl: OpenAI Batch output lines; csv: a flat table; "
              "parquet: the same table, typed, for pandas, polars or DuckDB.")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False),
              help="Write to this file (atomically) instead of stdout.")
@click.option("--force", is_flag=True, help="Overwrite an existing -o file.")
@click.option("--raw-cells", is_flag=True,
              help="CSV: write text exactly as stored, even cells a spreadsheet runs as a "
              "formula (starting with = + - @); by default those get a leading '.")
def export_cmd(job, fmt, out, force, raw_cells):
    """Write a job's results, one record per request in input order.

    \b
    nightshift export JOB -o results.jsonl
    nightshift export JOB --format csv > results.csv
    nightshift export JOB --format parquet -o results.parquet
    """
    from nightshift.jobs.database import open_reads
    from nightshift.jobs.export import export

    if raw_cells and fmt != "csv":
        raise click.UsageError("--raw-cells applies to --format csv only (JSONL is never "
                               "run as a formula)")
    start = time.perf_counter()
    # Read-only: an export works on a database it cannot write (a read-only home).
    n = export(open_reads(), job, fmt, out, force=force, raw_cells=raw_cells)
    if out:
        output.echo(f"wrote {n} records to {out} in {time.perf_counter() - start:.1f} s",
                    err=True)


@click.command("report")
@click.argument("jobs", nargs=-1, required=True)
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False),
              help="The HTML file to write [default: report-JOB.html].")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def report_cmd(jobs, out, force):
    """Write one self-contained HTML page of figures and plots for JOB (several JOBs:
    compared side by side). It opens in any browser, offline.

    \b
    nightshift report JOB
    nightshift report JOB1 JOB2 -o compare.html
    """
    from nightshift.jobs.database import open_reads
    from nightshift.jobs.export import write_file
    from nightshift.jobs.report import collect, render

    reads = open_reads()
    data = [collect(reads, job) for job in jobs]  # NotFound before anything is written
    out = out or f"report-{'-'.join(jobs)}.html"
    write_file(out, [render(data).encode()], force=force)
    output.echo(f"wrote {out}", err=True)
