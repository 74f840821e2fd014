"""Several worker processes on one machine under one command: ``worker --processes N``.

Outside BLAS, MLX runs on one core. On a CPU, N worker processes with one BLAS thread
each decode about 1.66 times what one process does with two threads (ENGINE-NOTES);
the database already makes several workers on one queue safe (each request is
claimed by one, and the requests of one that dies are taken back). On Metal or CUDA
one process owns the device, so ``auto`` means one there.

The supervisor here never imports MLX. It starts the processes together (their imports
overlap) but lets them load their models one at a time, each once the previous one is
ready (``wait_for_turn_to_load``): a model's memory check then sees the copies already
loaded, and the first run's batch-size measurement (worker/batch_size.py) runs alone
instead of seeing the others as contention. Where neither wait buys anything (the
copies still to load fit in memory beside this one, and the batch size is known), a
loading process says so (``notify_others_may_load``) and the next loads at once, so
that loading and warm-up overlap too. They claim work once all have loaded,
each up to a fair share (``GoAhead``, ``Store.fair_share``). It passes SIGINT and
SIGTERM on to every process once (they run in their own process groups, so a Ctrl-C
on the terminal reaches them only through it), and starts again a process that a signal killed (an
out-of-memory kill, a request that crashes MLX) while the others go on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from nightshift.worker import blas

log = logging.getLogger("nightshift.processes")
PROCESSES_ENV = "NIGHTSHIFT_WORKER_PROCESSES"
READY_FD_ENV = "NIGHTSHIFT_WORKER_READY_FD"  # a child writes here once it is ready
OTHERS_MAY_LOAD = b"s"  # on the ready pipe, before the readiness byte: see the docstring
LOAD_FD_ENV = "NIGHTSHIFT_WORKER_LOAD_FD"  # a child loads its model once this is written
GO_FD_ENV = "NIGHTSHIFT_WORKER_GO_FD"  # ...and claims work once the supervisor writes here
INDEX_ENV = "NIGHTSHIFT_WORKER_PROCESS"  # "2/4": which of the supervisor's processes
POLL_SECONDS = 0.2
# A process killed within this long of being ready again and again (a crash at every
# start) is restarted after a growing pause, up to MAX_RESTART_PAUSE seconds.
QUICK_DEATH_SECONDS = 30.0
MAX_RESTART_PAUSE = 60.0


def auto_processes() -> int:
    """One process per physical core on a CPU; one on Metal or CUDA."""
    return blas.cpu_threads() if blas.mlx_backend() == "cpu" else 1


def resolve(value: str) -> int:
    """``--processes`` as a number (``auto`` resolved)."""
    if value == "auto":
        return auto_processes()
    return int(value)


def child_argv(argv: list[str]) -> list[str]:
    """This command again, as one process of the supervisor's (a later option wins)."""
    return [sys.executable, *argv, "--processes", "1"]


def notify_ready() -> None:
    """In a supervised process: tell the supervisor this worker is ready (once)."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    try:
        os.write(int(fd), b"1")
        os.close(int(fd))
    except OSError:  # the supervisor went away; the process's own stop decides
        log.warning("could not tell the supervisor this worker is ready")


def processes_to_load() -> int:
    """In a supervised process still loading for the first time: itself and the
    supervisor's processes after it, which wait for their turn to load; otherwise 1."""
    index = os.environ.get(INDEX_ENV)
    if not index or READY_FD_ENV not in os.environ:
        return 1
    this, count = (int(n) for n in index.split("/"))
    return count - this + 1


def notify_others_may_load() -> None:
    """In a supervised process still loading: the supervisor may let the next process
    load now instead of once this one is ready."""
    fd = os.environ.get(READY_FD_ENV)
    if fd is None:
        return
    try:
        os.write(int(fd), OTHERS_MAY_LOAD)
    except OSError:
        log.warning("could not tell the supervisor to let the next process load")


def wait_for_turn_to_load() -> None:
    """In a supervised process's first load: block until the processes started before
    it are ready, or have said that it need not wait; at once otherwise. Called in the
    loading thread: a stop signal meanwhile ends the process as any stop while loading
    does (worker/service.py)."""
    fd = os.environ.pop(LOAD_FD_ENV, None)
    if fd is None:
        return
    waited = time.monotonic()
    os.read(int(fd), 1)  # the byte, or end of file (the supervisor is gone): load
    os.close(int(fd))
    waited = time.monotonic() - waited
    if waited >= 1.0:
        log.info("waited %.1f s for the processes before this one to load", waited)


class GoAhead:
    """In a supervised process: whether it may claim work yet (``WorkerOptions.may_claim``).

    The supervisor says go once every process has loaded, so the first one ready does
    not take a whole small job before the others can share it (they hold a fair share
    each: ``Store.fair_share``). Unsupervised, or if the supervisor is gone: always.
    """

    def __init__(self):
        fd = os.environ.pop(GO_FD_ENV, None)
        self.fd = int(fd) if fd is not None else None

    def __call__(self) -> bool:
        if self.fd is None:
            return True
        readable, _, _ = select.select([self.fd], [], [], 0)
        if readable:
            os.read(self.fd, 1)  # the byte, or end of file: either way, go
            os.close(self.fd)
            self.fd = None
        return self.fd is None


def log_prefix() -> str:
    """"[2/4] " in a supervised process, so interleaved logs tell the processes apart."""
    index = os.environ.get(INDEX_ENV)
    return f"[{index}] " if index else ""


@dataclass
class Child:
    index: int
    process: subprocess.Popen
    ready_pipe: int | None  # read end, until the child says it is ready (or dies)
    go_pipe: int | None  # write end, until the supervisor says go
    load_pipe: int | None  # write end, until the supervisor lets it load
    ready_at: float | None = None
    others_may_load: bool = False  # the next process need not wait for this one


class Supervisor:
    """Runs ``count`` copies of a worker command (see the module docstring).

    Args:
        argv: the interpreter's arguments that ran this command (``sys.orig_argv[1:]``).
        count: processes to run.
    """

    def __init__(self, argv: list[str], count: int):
        self.argv = argv
        self.count = count
        self.children: dict[int, Child] = {}
        self.signals: list[int] = []  # received, not yet passed on
        self.stopping = False
        self.codes: dict[int, int] = {}  # last exit status of each process index
        self.restart_at: dict[int, float] = {}  # index -> monotonic time to start again
        self.quick_deaths: dict[int, int] = {}  # index -> killed soon after ready, in a row
        self._die_with_parent = _parent_death_signal()
        self.wake: int | None = None  # while running: the read end of the signals' pipe
        # Started with OpenBLAS preloaded, a process need not start over to load it
        # (blas.ensure_fast_blas): half a second less for each.
        self.env = blas.preloaded_env() or dict(os.environ)

    def run(self) -> int:
        """Run until every process has ended; the exit code (0 if all ended with 0)."""
        previous = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}
        # A signal (a child's end included) wakes _watch at once rather than at its next
        # poll: the command ends as soon as its last process does.
        previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *_: None)
        self.wake, wake_write = os.pipe()
        for fd in (self.wake, wake_write):
            os.set_blocking(fd, False)
        previous_wakeup = signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        threads = max(1, blas.cpu_threads() // self.count)
        log.info("starting %d worker processes, %d BLAS thread%s each",
                 self.count, threads, "" if threads == 1 else "s")
        try:
            for index in range(1, self.count + 1):
                self._start(index, threads)
            while self.children or self.restart_at:
                self._pass_signals()
                if not self.stopping:
                    self._let_the_next_load()
                if not self._loading():
                    self._say_go()  # every first start has ended loading (or failed)
                self._start_due_restarts(threads)
                self._watch()
                if self.stopping:
                    self.restart_at.clear()
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for s, handler in previous.items():
                signal.signal(s, handler)
            os.close(self.wake)
            os.close(wake_write)
        failed = {i: c for i, c in self.codes.items() if c != 0}
        if failed:
            log.error("worker processes ended with errors: %s",
                      ", ".join(f"{i}: exit {c}" for i, c in sorted(failed.items())))
        return next(iter(failed.values()), 0)

    def _note(self, signum, _frame) -> None:
        self.signals.append(signum)

    def _pass_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            self.stopping = True
            for child in self.children.values():
                try:
                    child.process.send_signal(signum)
                except ProcessLookupError:
                    pass

    def _loading(self) -> bool:
        return any(c.ready_pipe is not None for c in self.children.values())

    def _let_the_next_load(self) -> None:
        """Let the first process still waiting to load do so, unless one loading wants
        the others to wait until it is ready."""
        if any(c.load_pipe is None and c.ready_pipe is not None and not c.others_may_load
               for c in self.children.values()):
            return
        child = next((self.children[i] for i in sorted(self.children)
                      if self.children[i].load_pipe is not None), None)
        if child is not None:
            os.write(child.load_pipe, b"1")
            os.close(child.load_pipe)
            child.load_pipe = None

    def _say_go(self) -> None:
        for child in self.children.values():
            if child.go_pipe is not None and child.ready_at is not None:
                os.write(child.go_pipe, b"1")
                os.close(child.go_pipe)
                child.go_pipe = None

    def _start(self, index: int, threads: int) -> None:
        ready_read, ready_write = os.pipe()
        go_read, go_write = os.pipe()
        load_read, load_write = os.pipe()
        env = dict(self.env, **{
            READY_FD_ENV: str(ready_write), GO_FD_ENV: str(go_read),
            LOAD_FD_ENV: str(load_read), INDEX_ENV: f"{index}/{self.count}",
            blas.OPENBLAS_THREADS_ENV: str(threads),
        })
        process = subprocess.Popen(child_argv(self.argv), env=env,
                                   pass_fds=(ready_write, go_read, load_read),
                                   start_new_session=True, preexec_fn=self._die_with_parent)
        for fd in (ready_write, go_read, load_read):
            os.close(fd)
        self.children[index] = Child(index, process, ready_read, go_write, load_write)
        log.info("worker process %d/%d started (pid %d)", index, self.count, process.pid)

    def _start_due_restarts(self, threads: int) -> None:
        now = time.monotonic()
        for index, when in list(self.restart_at.items()):
            if when <= now:
                del self.restart_at[index]
                self._start(index, threads)

    def _watch(self) -> None:
        """Wait a moment for readiness or exits; deal with what happened."""
        pipes = [c.ready_pipe for c in self.children.values() if c.ready_pipe is not None]
        readable, _, _ = select.select([*pipes, self.wake], [], [], POLL_SECONDS)
        if self.wake in readable:  # what woke it is dealt with below and in run()
            with contextlib.suppress(BlockingIOError):
                os.read(self.wake, 4096)
        for child in list(self.children.values()):
            if child.ready_pipe is not None and child.ready_pipe in readable:
                said = os.read(child.ready_pipe, 1)
                if said == OTHERS_MAY_LOAD:  # still loading: readiness (or end) comes later
                    child.others_may_load = True
                else:
                    os.close(child.ready_pipe)
                    child.ready_pipe = None
                    if said:
                        child.ready_at = time.monotonic()
            code = child.process.poll()
            if code is not None:
                self._ended(child, code)

    def _ended(self, child: Child, code: int) -> None:
        del self.children[child.index]
        for fd in (child.ready_pipe, child.go_pipe, child.load_pipe):
            if fd is not None:
                os.close(fd)
        self.codes[child.index] = code
        if code >= 0 or self.stopping or child.ready_at is None:
            # Its own decision (drained, stopped, an error it reported), or it never
            # became ready (a model that cannot load would fail again).
            if code != 0:
                log.warning("worker process %d/%d exited with status %d", child.index,
                            self.count, code)
            return
        quick = time.monotonic() - child.ready_at < QUICK_DEATH_SECONDS
        deaths = self.quick_deaths.get(child.index, 0) + 1 if quick else 0
        self.quick_deaths[child.index] = deaths
        pause = min(MAX_RESTART_PAUSE, 2.0 ** deaths) if deaths else 1.0
        log.warning("worker process %d/%d was killed by %s; its requests go back to the "
                    "queue, and it starts again in %.0f s", child.index, self.count,
                    signal.Signals(-code).name, pause)
        self.restart_at[child.index] = time.monotonic() + pause


def _parent_death_signal():
    """A function for a child to run before exec: on Linux, it then gets SIGTERM (puts
    its requests back and stops) if the supervisor dies; elsewhere None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    return lambda: libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
