"""The `nightshift serve` command: OpenAI's Files and Batches API (cli/api.py)."""

from __future__ import annotations

import logging

import click
from nightshift.cli import output
from nightshift.jobs import settings


@click.command("serve")
@click.option("--host", default=settings.SERVE_HOST, show_default=True,
              help="Address to listen on. Anything but loopback needs --api-key.")
@click.option("--port", type=click.IntRange(1, 65535), default=settings.SERVE_PORT,
              show_default=True)
@click.option("--api-key", envvar=settings.API_KEY_ENV,
              help="Require this key (Authorization: Bearer KEY; the openai client's "
              f"api_key) [env {settings.API_KEY_ENV}].")
@click.option("--max-upload-mb", type=click.IntRange(1, 1_000_000),
              default=settings.MAX_UPLOAD_MB, show_default=True,
              help="Largest file upload, in MB (10^6 bytes); a larger one gets 413.")
def serve_cmd(host, port, api_key, max_upload_mb):
    """Serve OpenAI's Files and Batches API over the local queue, so code written for
    OpenAI's Batch API runs unchanged: point the openai client's base_url here.
    Workers run the batches; this server never loads a model.

    \b
    nightshift serve                                  # http://127.0.0.1:8000/v1
    nightshift serve --host 0.0.0.0 --api-key "$KEY"  # reachable from other machines

    \b
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="local")
    """
    from nightshift.cli.api import is_loopback

    if not is_loopback(host):
        if not api_key:
            raise click.UsageError(
                f"--host {host} lets other machines in: give an API key with --api-key or "
                f"{settings.API_KEY_ENV} (python -c 'import secrets; print(secrets."
                "token_urlsafe())' makes one), or keep the default --host 127.0.0.1")
        if len(api_key) < settings.MIN_API_KEY_CHARS:
            raise click.UsageError(f"an API key for --host {host} needs at least "
                                   f"{settings.MIN_API_KEY_CHARS} characters")
    try:
        import uvicorn
        from nightshift.cli.api import create_app
    except ImportError as exc:
        raise click.ClickException(f"nightshift serve needs {exc.name}: pip install "
                                   "'nightshift[serve]'") from None
    from nightshift.jobs import batches, files
    from nightshift.jobs.store import Store
    from nightshift.worker import aliases
    from nightshift.worker.dispatch import submit
    from nightshift.worker.queue import check_url

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    store = Store()
    check_url()  # a queue URL that cannot work with what is installed: before serving
    batches.recover(store)
    files.sweep_parts()
    app = create_app(store, api_key=api_key, max_upload_bytes=max_upload_mb * 1_000_000,
                     submit=submit, model_reference=aliases.reference)
    shown = f"[{host}]" if ":" in host else host
    output.echo(f"nightshift serve: OpenAI Files and Batches API at http://{shown}:{port}/v1 "
                f"({'API key required' if api_key else 'no API key: this machine only'}; "
                f"uploads up to {max_upload_mb:,} MB)", err=True)
    if not store.live_workers():
        output.echo("no worker is running: batches wait until one starts "
                    "(nightshift worker)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=True)
