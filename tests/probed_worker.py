"""The real `nightshift worker`, with probes a test can see from outside.

Run as ``python -m tests.probed_worker worker ARGS``: it installs the probes below and
then runs the ordinary command line, so everything the worker does is the product's
own code. The probes only observe, except where a test asks for a fault:

* ``NIGHTSHIFT_TEST_PHASES=FILE``: append the worker's phase to FILE each time it
  changes: ``loading`` (model load and warm-up), ``prefill`` (a generator step while
  some request has no first token yet), ``decode`` (a step of requests all past
  prefill), ``writing`` (inside the transaction that stores results, before it
  commits), ``stored`` (that transaction committed). A test kills the process when
  the phase it wants shows up; the file's last line then says where the worker died.
* ``NIGHTSHIFT_TEST_WRITE_PAUSE=SECONDS``: hold the results transaction open that long
  before it commits (default 0.02), so a kill can land inside it.
* ``NIGHTSHIFT_TEST_LOAD_SECONDS=SECONDS``: loading takes that much longer, as a big
  model's would.
* ``NIGHTSHIFT_TEST_SWITCH_SECONDS=SECONDS``: every load after the first (a switch to
  another model) takes that much longer.
* ``NIGHTSHIFT_TEST_STEP_SECONDS=SECONDS``: every generator step takes that much longer,
  as a big model's would (a tiny model's answers then take as long as a test needs).
* SIGUSR1 writes every thread's Python stack to the worker's log.
* ``NIGHTSHIFT_TEST_POISON_SEED=N[,M...]``: a request sampled with one of these seeds
  raises inside the generator step, as a broken request would.
* ``NIGHTSHIFT_TEST_KILLER_SEED=N``: a request sampled with seed N kills the worker
  process (SIGKILL) each time it is sampled, as one that crashes the model would.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time

PHASES_ENV = "NIGHTSHIFT_TEST_PHASES"
WRITE_PAUSE_ENV = "NIGHTSHIFT_TEST_WRITE_PAUSE"
LOAD_SECONDS_ENV = "NIGHTSHIFT_TEST_LOAD_SECONDS"
SWITCH_SECONDS_ENV = "NIGHTSHIFT_TEST_SWITCH_SECONDS"
POISON_ENV = "NIGHTSHIFT_TEST_POISON_SEED"
KILLER_ENV = "NIGHTSHIFT_TEST_KILLER_SEED"
STEP_SECONDS_ENV = "NIGHTSHIFT_TEST_STEP_SECONDS"


class PhaseLog:
    """Appends a phase to a file when it changes; survives the process being killed
    (each line is one write(2) to an O_APPEND file, in the kernel once it returns)."""

    def __init__(self, path: str | None):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if path else None
        self.last = None

    def __call__(self, phase: str) -> None:
        if self.fd is not None and phase != self.last:
            self.last = phase
            os.write(self.fd, f"{phase}\n".encode())


def install() -> None:
    # A test that finds the worker stuck asks it for every thread's stack (SIGUSR1).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    from nightshift.jobs import store
    from nightshift.worker import engine, loader

    mark = PhaseLog(os.environ.get(PHASES_ENV))
    pause = float(os.environ.get(WRITE_PAUSE_ENV, "0.02"))
    load_seconds = float(os.environ.get(LOAD_SECONDS_ENV, "0"))
    switch_seconds = float(os.environ.get(SWITCH_SECONDS_ENV, "0"))
    step_seconds = float(os.environ.get(STEP_SECONDS_ENV, "0"))
    loads = [0]

    real_load, real_warm_up = loader.load, loader.warm_up

    def load(*args, **kwargs):
        mark("loading")
        time.sleep(load_seconds + (switch_seconds if loads[0] else 0))
        loads[0] += 1
        return real_load(*args, **kwargs)

    def warm_up(*args, **kwargs):
        mark("loading")
        return real_warm_up(*args, **kwargs)

    loader.load, loader.warm_up = load, warm_up

    real_step = engine.Engine.step

    def step(self):
        waiting = any(live.first_token_at is None for live in self.live.values())
        mark("prefill" if waiting or self.suspects else "decode")
        time.sleep(step_seconds)
        return real_step(self)

    engine.Engine.step = step

    # Through public seams only: Store.finish, and SQLAlchemy's commit event, which
    # fires inside the results transaction after its rows are written and before the
    # COMMIT reaches the database.
    import threading

    from sqlalchemy import Engine, event

    finishing = threading.local()

    @event.listens_for(Engine, "commit")
    def before_commit(_conn):
        if getattr(finishing, "active", False):
            mark("writing")
            time.sleep(pause)

    real_finish = store.Store.finish

    def finish(self, *args, **kwargs):
        finishing.active = True
        try:
            stored = real_finish(self, *args, **kwargs)
        finally:
            finishing.active = False
        mark("stored")
        return stored

    store.Store.finish = finish

    poison = {int(x) for x in os.environ.get(POISON_ENV, "").split(",") if x}
    killer = int(os.environ[KILLER_ENV]) if os.environ.get(KILLER_ENV) else None
    if poison or killer is not None:
        real_sampler = engine.seeded_sampler

        def seeded_sampler(temperature, top_p, seed):
            sample = real_sampler(temperature, top_p, seed)
            if seed == killer:
                def kill(logprobs):
                    mark("killed-by-request")
                    os.kill(os.getpid(), signal.SIGKILL)

                return kill
            if seed not in poison:
                return sample

            def broken(logprobs):
                raise RuntimeError(f"poisoned request (seed {seed})")

            return broken

        engine.seeded_sampler = seeded_sampler


def main() -> None:
    from nightshift.worker import blas

    # Re-executes this module with OpenBLAS preloaded (as the command does) before
    # the probes import MLX, so they are installed once, in the final process.
    blas.ensure_fast_blas()
    install()
    from nightshift.cli.main import cli

    cli(args=sys.argv[1:], prog_name="nightshift")


if __name__ == "__main__":
    main()
