"""The `nightshift worker` command."""

from __future__ import annotations

import logging
import os
import sys

import click
from nightshift.worker.processes import PROCESSES_ENV


@click.command("worker")
@click.option("--model", "-m", help="Serve only this model (default: whatever the jobs ask "
              "for, switching between models one at a time).")
@click.option("--drain", is_flag=True, help="Exit when no runnable work is left.")
@click.option("--batch-size", type=click.IntRange(1, 1024),
              help="Sequences decoded together [default: measured for this machine].")
@click.option("--dtype", type=click.Choice(["auto", "as-loaded", "float32", "bfloat16",
                                            "float16"]), default="auto", show_default=True,
              help="Weights in memory: auto keeps quantized weights on Metal/CUDA and "
              "dequantizes on CPU, where that is much faster.")
@click.option("--max-context", type=int, help="Tokens per sequence to plan memory for.")
@click.option("--force", is_flag=True, help="Load even if the memory estimate says no.")
@click.option("--grace", type=float, default=30.0, show_default=True,
              help="On Ctrl-C, seconds to let in-flight requests finish before putting "
              "them back (SIGTERM puts them back at once).")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow a model folder's own Python code to run (off by default).")
@click.option("--max-attempts", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Fail a request once a worker has died this many times while running it "
              "(it is likely what kills the worker).")
@click.option("--prefix-cache/--no-prefix-cache", default=True, show_default=True,
              help="Prefill a prompt prefix that requests share (a job's system prompt) once.")
@click.option("--processes", default="auto", show_default=True, envvar=PROCESSES_ENV,
              callback=lambda _ctx, _param, value: _processes(value),
              help="Worker processes on this machine, each with its own copy of the model: "
              "auto is one per core on a CPU (MLX runs on one core outside BLAS) and one "
              "on Metal or CUDA.")
@click.option("--verbose", "-v", is_flag=True, help="Log debug detail.")
def worker_cmd(model, drain, batch_size, dtype, max_context, force, grace, trust_remote_code,
               max_attempts, prefix_cache, processes, verbose):
    """Load a model once, keep it warm, and run queued requests with continuous batching.

    \b
    nightshift worker                   # serve every job, until Ctrl-C
    nightshift worker --drain           # exit when the queue is empty
    nightshift worker --model smollm2   # serve only this model
    nightshift worker --processes 1     # one process (on a CPU, auto runs one per core)
    """
    from nightshift.worker import blas
    from nightshift.worker import processes as supervised

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format=f"%(asctime)s {supervised.log_prefix()}%(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("huey").setLevel(logging.INFO if verbose else logging.WARNING)
    blas.require_backend()
    if processes > 1:
        raise SystemExit(supervised.Supervisor(sys.orig_argv[1:], processes).run())
    # Before MLX loads: on Linux CPU, restart with an optimised BLAS preloaded.
    blas.ensure_fast_blas()

    from nightshift.jobs.store import Store
    from nightshift.worker import registry
    from nightshift.worker.loader import LoadOptions
    from nightshift.worker.service import Worker, WorkerOptions

    options = WorkerOptions(
        on_ready=supervised.notify_ready, may_claim=supervised.GoAhead(),
        # Jobs store a model folder as an absolute path (registry.reference): match so.
        serves=(registry.reference(model) or model) if model else None,
        drain=drain, grace_seconds=grace, prefix_cache=prefix_cache, max_attempts=max_attempts,
        load=LoadOptions(dtype=None if dtype == "auto" else dtype, batch_size=batch_size,
                         max_context=max_context, force=force,
                         trust_remote_code=trust_remote_code),
    )
    worker = Worker(Store(), options=options)
    code = worker.run()
    if not worker.abandoned_loading:
        worker.store.close()
    # Everything is stored and every thread that writes has ended. Tearing the
    # interpreter down would only free the model (0.25 s here for SmolLM2, more for a
    # large one); stopped while loading, that thread is still inside MLX, and tearing
    # down under it can abort the process.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _processes(value: str) -> int:
    from nightshift.worker import processes

    try:
        count = processes.resolve(value)
    except ValueError:
        count = 0
    if count < 1:
        raise click.BadParameter(f"{value!r}: give a number of processes (1 or more) or auto")
    return count
