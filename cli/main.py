"""The `nightshift` command: run big batches of prompts through a local model overnight.

Thin by design: each command parses its arguments, calls one function of jobs/ or
worker/, and formats the result.
"""

from __future__ import annotations

import os

import click
from nightshift.cli.output import printable
from nightshift.jobs import settings
from nightshift.jobs.errors import NightshiftError


class Group(click.Group):
    """Turns nightshift's own errors into clear messages: no traceback for a user's mistake."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NightshiftError as exc:
            # Messages quote names, paths and lines users wrote: escape what would drive
            # the terminal, keeping the message's own line breaks.
            text = "\n".join(printable(line) for line in str(exc).split("\n"))
            raise click.ClickException(text) from exc


def _set_env(name: str):
    def callback(_ctx, _param, value):
        if value:
            os.environ[name] = value
        return value

    return callback


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
# The version is looked up when asked for: importlib.metadata costs every command time.
@click.version_option(package_name="nightshift", prog_name="nightshift")
@click.option("--home", envvar=settings.HOME_ENV, expose_value=False, is_eager=True,
              callback=_set_env(settings.HOME_ENV),
              help=f"Data directory [env {settings.HOME_ENV}; default ./data].")
@click.option("--database-url", envvar=settings.DATABASE_URL_ENV, expose_value=False,
              callback=_set_env(settings.DATABASE_URL_ENV),
              help="Results database, a SQLAlchemy URL (sqlite:///..., postgresql://...) "
              f"[env {settings.DATABASE_URL_ENV}; default HOME/nightshift.db].")
@click.option("--queue-url", envvar=settings.QUEUE_URL_ENV, expose_value=False,
              callback=_set_env(settings.QUEUE_URL_ENV),
              help="Queue: a SQLite file or redis://host:port/db "
              f"[env {settings.QUEUE_URL_ENV}; default HOME/queue.db].")
def cli():
    """Run big batches of prompts through a local MLX model, overnight.

    \b
    nightshift models pull smollm2          # the small default model, offline
    nightshift submit prompts.jsonl --at 02:00
    nightshift worker                       # keeps the model loaded; Ctrl-C to stop
    nightshift status
    nightshift export JOB -o results.jsonl
    """


# The commands live in their own modules and import nothing from here; each is added
# once, below, so the command tree reads in one place.
from nightshift.cli import jobs_cmds, models_cmds, serve, worker_cmd  # noqa: E402

for command in (jobs_cmds.submit_cmd, jobs_cmds.status_cmd, jobs_cmds.cancel_cmd,
                jobs_cmds.retry_cmd, jobs_cmds.export_cmd, jobs_cmds.report_cmd,
                worker_cmd.worker_cmd, serve.serve_cmd,
                models_cmds.models):
    cli.add_command(command)
