"""The long-lived worker: one Huey consumer feeding one warm model.

Threads:
- main: Huey's consumer loop (it owns the signals);
- Huey's one worker thread: runs queue tasks, each of which only registers a chunk
  of requests with the scheduler below and returns (waiting while enough work is
  already registered, so priorities and other workers still get a say);
- engine: owns MLX: loads the model, claims requests from the database into the
  batch as slots free up, steps the generator, stores each result as it finishes;
- heartbeat: tells the database this worker is alive, what it serves, its memory.

The database is the truth. Requests are claimed there (one worker each), results
are stored there guarded by that claim, and when the worker starts or idles it looks
there for work whose queue task was lost.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from huey.consumer import Consumer, ConsumerStopped
from nightshift.jobs import notify, settings
from nightshift.jobs.errors import NightshiftError, ResourceError
from nightshift.jobs.store import Store, worker_identity
from nightshift.jobs.vocabulary import CANCELLED, Chunk, Recovered, Result, WorkerState
from nightshift.worker import blas, dispatch, heap, loader
from nightshift.worker.engine import Engine
from nightshift.worker.prefix import PrefixCache
from nightshift.worker.queue import Queue
from nightshift.worker.scheduler import Scheduler

log = logging.getLogger("nightshift.worker")
SWEEP_SECONDS = 1.0  # how often an idle worker looks in the database for lost work
# How often a worker takes back requests held by workers that have gone since it
# started (another host's worker whose heartbeat went stale, say).
RECOVER_SECONDS = 10.0
# How often a busy worker looks for its jobs being cancelled or passing their deadline.
ENDED_POLL_SECONDS = 1.0
# The log gets a line on the jobs in progress this often (the newest PROGRESS_JOBS).
PROGRESS_SECONDS = 60.0
PROGRESS_JOBS = 10
IDLE_WAIT_SECONDS = 0.2
# A model that failed to load is not tried again for this long (a memory shortage
# may pass; a broken folder may be mended), so the worker serves the others meanwhile.
UNAVAILABLE_SECONDS = 60.0


@dataclass
class WorkerOptions:
    serves: str | None = None  # --model: serve only this model
    drain: bool = False  # exit when no runnable work is left
    grace_seconds: float = 30.0  # SIGINT: finish in-flight requests for this long
    prefix_cache: bool = True  # prefill shared prompt prefixes once
    # A request whose worker died this many times while running it is failed.
    max_attempts: int = settings.DEFAULT_MAX_ATTEMPTS
    load: loader.LoadOptions | None = None
    on_ready: Callable[[], None] | None = None  # called once the worker is ready
    # False holds claims back (worker --processes: until the others have loaded too).
    may_claim: Callable[[], bool] | None = None


def _end_mlx_thread() -> None:
    """Free the MLX streams of the calling thread, at the end of a thread that ran MLX.

    Without this, MLX 0.32 on Linux aborts the process at exit ("terminate called
    without an active exception", exit 134) about one exit in ten when a thread other
    than the main one ran MLX work (ml-explore/mlx#3126); MLX asks callers to clear
    their streams at the end of such threads.
    """
    import mlx.core as mx

    try:
        mx.clear_streams()
    except Exception:  # never let this keep the thread from reporting it finished
        log.exception("could not free this thread's MLX streams")


def _check_mlx_compiler() -> None:
    """Let MLX look for its CPU compiler now, before the worker takes over the signals.

    The first call of any ``mx.compile``d function (mlx-lm's ``swiglu``, in the
    warm-up) makes MLX's CPU backend run ``system("g++ --version")``, once per process
    (``JitCompiler::available``). glibc's ``system()`` sets SIGINT to SIG_IGN for the
    whole process until that command ends (about 10 ms), and the kernel discards a
    SIGINT sent meanwhile: no handler runs, nothing is left pending, so a Ctrl-C during
    the model's warm-up was lost about one time in ten (tests/test_signals.py).
    Called first thing in ``Worker.run``, the check is over before this worker has
    registered or started loading. SIGTERM is not touched by ``system()``. Metal and
    CUDA compile without that check, so MLX is left alone there.
    """
    if blas.mlx_backend() != "cpu":
        return
    try:
        import mlx.core as mx

        mx.compile(lambda x: x)(mx.array(0))
    except Exception:  # MLX then runs the check later, as it did before
        log.debug("could not run MLX's compiler check early", exc_info=True)


def _noted_by_wakeup_fd(_signum, _frame) -> None:
    """The Python-level handler does nothing: the wakeup fd carries the signal."""


def peak_memory_bytes(mlx_peak: int = 0) -> int:
    """The process's peak resident memory, or MLX's own peak where that is larger.

    ``mlx_peak`` is read by the engine thread (``Worker._read_mlx_peak``): MLX is called
    from that thread only, as its streams are per thread (ml-explore/mlx#3126).
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return max(rss, mlx_peak)


class Worker:
    def __init__(self, store: Store, queue_url: str | None = None,
                 options: WorkerOptions | None = None):
        self.store = store
        self.options = options or WorkerOptions()
        self.queue = Queue(queue_url, handler=self._accept)
        self.id, self.host, self.pid = worker_identity()
        self.loaded: loader.LoadedModel | None = None
        self.engine: Engine | None = None
        self.state = WorkerState.LOADING
        self.schedule = Scheduler()
        self.ready = threading.Event()
        self.stopping = threading.Event()  # stop taking work
        self.put_back_now = threading.Event()  # SIGTERM or a second SIGINT
        self.finished = threading.Event()
        self.error: Exception | None = None
        self.put_back: dict[str, int] = {}
        self.signalled: str | None = None  # the signal that stopped it
        self._signal_pipe: int | None = None  # read end of the signal wakeup fd
        self.mlx_peak = 0  # MLX's peak memory, as the engine thread last read it
        # Stopped before its model finished loading: the engine thread is still
        # inside MLX, so the process must end without interpreter teardown.
        self.abandoned_loading = False
        self._consumer: Consumer | None = None
        # Models that failed to load, and when to try each again (monotonic seconds).
        self.unavailable: dict[str, float] = {}
        self.short_of_memory: set[str] = set()  # of those, the ones that may load later
        # Requests lost with a dead worker wait for this model: run them apart first.
        self._lost_waiting = False

    # -- main thread ---------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped (or, with drain, until no work is left); exit code.

        A stop signal while the model loads returns at once (nothing is taken before
        the model is ready) with ``abandoned_loading`` set: the caller should then end
        the process with ``os._exit``, as the loading thread cannot be joined.
        """
        _check_mlx_compiler()  # its system() would drop a SIGINT sent while it runs
        self._install_signals()  # before any thread starts: every stop is ours
        if blas.mlx_backend() == "cpu":
            heap.keep_freed_memory()  # before the engine's thread takes an arena
        self.store.register_worker(self.id, self.host, self.pid, self.options.serves)
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        engine_thread = threading.Thread(target=self._serve, name="engine", daemon=True)
        engine_thread.start()
        # The model is loaded (and warm) before any work is taken.
        while not self.ready.wait(0.2):
            self._act_on_signals()
            if self.stopping.is_set():
                # A big model can take minutes to load; a stop should not wait for
                # that, and there is nothing to put back yet.
                self.abandoned_loading = True
                self._stopped()
                log.info("stopped while loading the model: put back 0 unfinished requests "
                         "(none had been taken)")
                return 0
        if self.error is not None:
            self._stopped()
            raise self.error
        recovered = self._recover()
        queued = dispatch.queue_runnable(self.store, self.queue, self.options.serves,
                                         self.unavailable)
        log.info("worker %s ready: %s; put back %d requests left running by stopped "
                 "workers; %d queue tasks for waiting work", self.id,
                 self.loaded.describe() if self.loaded else "no model", recovered.requeued,
                 queued)
        if self.options.on_ready is not None:
            self.options.on_ready()
        self._consume()
        while engine_thread.is_alive():  # a second SIGINT still stops it at once
            engine_thread.join(0.1)
            self._act_on_signals()
            if self.engine is None and self.state == WorkerState.LOADING:
                # Switching models: nothing is held, and a big model's load can take
                # minutes; the stop should not wait for it.
                self.abandoned_loading = True
                self._stopped()
                log.info("stopped while switching models: put back 0 unfinished requests "
                         "(none were held)")
                return 0
        self._act_on_signals()
        self._stopped()
        if self.put_back or self.signalled:
            total = sum(self.put_back.values())
            jobs = ", ".join(f"{j} ({n})" for j, n in self.put_back.items())
            log.info("put back %d unfinished requests for the next worker%s", total,
                     f": {jobs}" if jobs else "")
        if self.error is not None:
            raise self.error
        return 0

    def _consume(self) -> None:
        consumer = Consumer(self.queue.huey, workers=1, worker_type="thread",
                            periodic=False, max_delay=1.0, check_worker_health=True)
        self._consumer = consumer
        # Huey's start() installs its own handlers (SIGTERM as a graceful stop, a second
        # SIGINT as an exception); the worker's decide the stop, so they are put back at
        # once, and a signal arriving meanwhile waits, blocked, to reach them.
        stops = {signal.SIGINT, signal.SIGTERM}
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            consumer.start()
            self._install_signals()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        try:
            health_checked = time.monotonic()  # loop() checks Huey's thread with it
            while not self.finished.is_set():
                try:
                    health_checked = consumer.loop(health_checked)  # returns every 0.1 s
                except ConsumerStopped:
                    break
                self._act_on_signals()
        finally:
            self.stopping.set()
            with self.schedule.changed:
                self.schedule.changed.notify_all()
            consumer.stop(graceful=True)
            self.queue.huey.notify_interrupted_tasks()

    def _install_signals(self) -> None:
        """Route SIGINT and SIGTERM through a wakeup fd that the main thread reads.

        CPython runs a Python-level handler in the main thread only, when its eval
        loop next checks; a signal the kernel gives another thread while every thread
        waits can stay unhandled for good (seen here: about one SIGINT in a hundred in
        tests/test_crash.py never handled, the process idle but alive). The C-level
        handler writes the signal number to the wakeup fd at once, and the main thread
        reads it within 0.2 s (``_act_on_signals``).
        """
        signal.signal(signal.SIGINT, _noted_by_wakeup_fd)
        signal.signal(signal.SIGTERM, _noted_by_wakeup_fd)
        if self._signal_pipe is None:
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            os.set_blocking(write_end, False)
            signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
            self._signal_pipe = read_end

    def _act_on_signals(self) -> None:
        """Main thread: stop as the signals received ask."""
        try:
            received = os.read(self._signal_pipe, 64) if self._signal_pipe is not None else b""
        except BlockingIOError:  # none since the last look
            received = b""
        for signum in received:
            if signum not in (signal.SIGINT, signal.SIGTERM):
                continue
            name = signal.Signals(signum).name
            self.signalled = self.signalled or name
            if signum == signal.SIGTERM or self.stopping.is_set():
                log.info("%s: putting in-flight requests back and stopping", name)
                self.put_back_now.set()
            else:
                log.info("%s: finishing in-flight requests (up to %.0f s; again to stop now)",
                         name, self.options.grace_seconds)
            self.stopping.set()
            if self._consumer is not None:
                self._consumer.stop_flag.set()
            with self.schedule.changed:
                self.schedule.changed.notify_all()

    def _stopped(self) -> None:
        try:
            self._beat(state=WorkerState.STOPPED, stopped_at=time.time())
        except Exception:  # the database may be what failed; the exit says so
            log.exception("could not record that worker %s stopped", self.id)
        self._notify()
        notify.wait()  # their outcome in this worker's log

    def _notify(self) -> None:
        """Run the --notify commands of jobs that have ended (never fatal)."""
        try:
            notify.sweep(self.store)
        except Exception:
            log.exception("could not settle ended jobs (deadlines, --notify commands)")

    # -- Huey's worker thread --------------------------------------------------------

    def _accept(self, chunk: Chunk) -> None:
        """A queue task: register its chunk with the engine's scheduler."""
        serves = self.options.serves
        if serves is not None and chunk.model and chunk.model != serves:
            # Not ours. The requests stay queued in the database, where a worker
            # that serves that model finds them when it starts or idles.
            log.info("job %s is for model %s; this worker serves only %s",
                     chunk.job_id, chunk.model, serves)
            return
        with self.schedule.changed:
            # Hold the task while enough is scheduled, so Huey's priority order
            # decides what comes next and other workers can take the rest.
            while len(self.schedule) >= 2 and not self.stopping.is_set():
                self.schedule.changed.wait(0.5)
            if self.stopping.is_set():
                # Not taken: its requests are still queued in the database.
                return
            self.schedule.add(chunk)

    # -- engine thread -----------------------------------------------------------------

    def _serve(self) -> None:
        try:
            if self.options.serves:
                # Pinned to one model: if it cannot load there is nothing to serve,
                # and the user hears so at once, with the queue untouched.
                self._switch_to(self.options.serves)
            else:
                self._try_switch(self._first_model())
        except Exception as exc:
            self.error = exc
            _end_mlx_thread()
            self.ready.set()
            return
        self.ready.set()
        try:
            self._loop()
        except Exception as exc:  # a bug or a dead database: put work back, then report
            log.exception("worker loop failed")
            self.error = exc
            self.put_back_now.set()
        finally:
            try:
                self._shutdown()
            except Exception as exc:  # the database may be what failed
                log.exception("could not put in-flight requests back; the next worker to "
                              "start takes them back")
                self.error = self.error or exc
            finally:
                _end_mlx_thread()
                self.finished.set()
                if self._consumer is not None:
                    self._consumer.stop_flag.set()

    def _loop(self) -> None:
        last_sweep = last_ended_poll = 0.0
        last_recover = time.monotonic()  # run() recovered just before
        while not self.stopping.is_set():
            now = time.monotonic()
            engine = self.engine
            if engine is not None and engine.busy and now - last_ended_poll > ENDED_POLL_SECONDS:
                self._drop_ended()
                last_ended_poll = now
            if now - last_recover > RECOVER_SECONDS:
                # Workers can die after this one started; the sweep below then
                # finds their requests queued again.
                self._recover()
                self._release_orphans()
                last_recover = now
            if engine is not None:
                self._fill()
                if engine.busy or engine.suspects:
                    self.state = WorkerState.RUNNING
                    self._store(engine.step())
                    continue
            if self.state == WorkerState.RUNNING:
                heap.give_back()  # out of work: what the batch held goes back
            self.state = WorkerState.IDLE
            if now - last_sweep > SWEEP_SECONDS:
                # Lost queue tasks, and work for other models, are found here.
                for chunk in self._runnable():
                    self.schedule.add(chunk)
                if self.loaded is not None and not self._lost_waiting:
                    self._lost_waiting = self.store.has_lost(self.loaded.name)
                last_sweep = now
                if self.options.drain and not self._has_work():
                    # Requests held by a worker that died are not runnable until
                    # someone takes them back: look once more after doing so.
                    self._recover()
                    if not self._has_work():
                        self._drain_done()
                        return
            if self._next_model_switch():
                continue
            with self.schedule.changed:
                if not self.schedule.has_for(self._model_name()):
                    self.schedule.changed.wait(IDLE_WAIT_SECONDS)
        # Stopping. SIGINT: let in-flight requests finish for a while.
        deadline = time.monotonic() + self.options.grace_seconds
        while self.engine is not None and self.engine.busy and not self.put_back_now.is_set():
            if time.monotonic() > deadline:
                log.info("grace period over")
                break
            self._store(self.engine.step())

    def _fill(self) -> None:
        """Claim queued requests into free batch slots, highest priority first.

        Requests lost with a dead worker go first, apart: the batch drains, then they
        run alone or in small groups (``Store.claim_lost``), then healthy work resumes.
        """
        if self.options.may_claim is not None and not self.options.may_claim():
            return
        if self._lost_waiting:
            if self.engine.busy or self.engine.suspects:
                return
            group = max(1, self.engine.batch_size // 8)
            lost = self.store.claim_lost(self.id, self.loaded.name, group)
            if lost:
                log.info("running %d requests apart: a worker died while running them "
                         "(%d times so far)", len(lost), lost[0].lost)
                self._store(self.engine.add(lost, isolated=True))
                return
            self._lost_waiting = False
        share = None
        while (room := self.engine.free_slots()) > 0:
            chunk = self.schedule.best_for(self.loaded.name)
            if chunk is None:
                return
            if share is None:  # never more than this worker's share of what waits
                share = self.store.fair_share(self.loaded.name) - len(self.engine.live)
            if share <= 0:
                return
            # Held to its share, the worker splits the job with others: a share of
            # every size, so that they end together (Store.spread_by_size).
            claimed = self.store.claim(chunk, self.id, min(room, share), spread=share < room)
            share -= len(claimed)
            if not claimed:
                self.schedule.drop(chunk)
                continue
            self._store(self.engine.add(claimed))

    def _read_mlx_peak(self) -> None:
        """Engine thread only (see ``peak_memory_bytes``)."""
        import mlx.core as mx

        self.mlx_peak = mx.get_peak_memory()

    def _model_name(self) -> str | None:
        return self.loaded.name if self.loaded else None

    def _recover(self) -> Recovered:
        """Take back requests of workers that died; note lost ones waiting for our model."""
        recovered = self.store.recover(self.id, self.options.max_attempts)
        removed = self.store.remove_abandoned_jobs()
        if removed:
            log.info("removed %d jobs left half-stored by submits that died", len(removed))
        if recovered.requeued or recovered.failed:
            log.info("took back %d requests left running by workers that stopped; failed "
                     "%d that their workers died %d times running", recovered.requeued,
                     recovered.failed, self.options.max_attempts)
        if self.loaded is not None:
            self._lost_waiting = self.store.has_lost(self.loaded.name)
        return recovered

    def _release_orphans(self) -> None:
        """Put back requests the database says this worker holds but the engine does not
        (a claim whose commit succeeded after its connection failed, then retried)."""
        held = {c.id for c in self.engine.held()} if self.engine is not None else set()
        orphans = self.store.held_by(self.id) - held
        if orphans:
            log.warning("put back %d requests claimed but not running here", len(orphans))
            self.store.release(sorted(orphans), self.id)

    def _store(self, results: list[Result]) -> None:
        if results:
            self._read_mlx_peak()
            self.store.finish(results, self.id, peak_memory_bytes(self.mlx_peak))

    def _drop_ended(self) -> None:
        """Stop running the requests of jobs cancelled or past their deadline."""
        held = self.engine.held()
        ended = self.store.ended_among({c.job_id for c in held})
        for status in sorted(set(ended.values())):
            job_ids = sorted(j for j, s in ended.items() if s == status)
            removed = self.engine.remove({c.id for c in held if c.job_id in job_ids})
            self.store.mark_dropped([c.id for c in removed], self.id, status)
            why = "cancelled" if status == CANCELLED else "past their deadline"
            log.info("dropped %d in-flight requests of jobs %s: %s", len(removed),
                     ", ".join(job_ids), why)

    def _runnable(self) -> list[Chunk]:
        """Chunks that may start now, of models this worker serves and can load."""
        clock = time.monotonic()
        self.unavailable = {m: t for m, t in self.unavailable.items() if t > clock}
        return dispatch.runnable(self.store, self.options.serves, self.unavailable)

    def _has_work(self) -> bool:
        engine = self.engine
        if engine is not None and (engine.busy or engine.suspects):
            return True
        if self.schedule.next_model(skip=self.unavailable) is not None:
            return True
        return bool(self._runnable())

    def _drain_done(self) -> None:
        """--drain found nothing left it can run: say what stays queued, and why."""
        waiting = sorted(m for m in self.short_of_memory if self.store.has_runnable(m))
        if waiting and self.error is None:
            self.error = ResourceError(
                f"--drain: left the requests of {', '.join(waiting)} queued: not enough "
                "memory to load the model now (see the log above)")
            log.error("%s", self.error)
        else:
            log.info("no runnable work left (--drain): stopping")

    def _first_model(self) -> str:
        waiting = self._runnable()
        return waiting[0].model if waiting else settings.default_model()

    def _next_model_switch(self) -> bool:
        """Idle with nothing for the loaded model: switch to the next job's model."""
        if self.options.serves is not None:
            return False
        current = self._model_name()
        target = self.schedule.next_model(skip=self.unavailable)
        if self.schedule.has_for(current) or target is None:
            return False
        if current is not None and self.store.has_runnable(current):
            # Work for the loaded model whose queue task has not arrived yet: a
            # switch away and back would cost two loads (minutes for a large model).
            for chunk in self._runnable():
                self.schedule.add(chunk)
            return False
        if not self.store.has_runnable(target):
            self.schedule.drop_model(target)  # stale: cancelled or done meanwhile
            return True
        self._try_switch(target)
        return True

    def _try_switch(self, target: str) -> bool:
        """Switch to ``target``; if it cannot load, cost only its own requests.

        A memory shortage may pass: nothing is failed, and the model is tried again
        after UNAVAILABLE_SECONDS. Any other reason (a missing or damaged model) fails
        the requests of its jobs that could run now; jobs held for later are untouched.
        Either way the worker goes on serving the other models.
        """
        try:
            self._switch_to(target)
            self.short_of_memory.discard(target)
            return True
        except NightshiftError as exc:
            self.state = WorkerState.IDLE
            self.unavailable[target] = time.monotonic() + UNAVAILABLE_SECONDS
            self.schedule.drop_model(target)
            if isinstance(exc, ResourceError):
                self.short_of_memory.add(target)
                log.error("cannot load model %s now: %s; its requests stay queued, tried "
                          "again in %.0f s", target, exc, UNAVAILABLE_SECONDS)
            else:
                log.error("cannot serve model %s: %s", target, exc)
                n = self.store.fail_model(
                    target, f"the worker could not load model {target}: {exc}")
                log.error("marked %d queued requests for %s failed (nightshift retry JOB "
                          "once it loads)", n, target)
            return False

    def _switch_to(self, name: str) -> None:
        previous = self.loaded.name if self.loaded else None
        self.state = WorkerState.LOADING
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        unload_s = loader.unload(self.loaded) if self.loaded else 0.0
        self.loaded = None
        loaded = loader.load(name, self.options.load)
        self.state = WorkerState.WARMING
        self.store.update_worker(self.id, state=WorkerState.WARMING, model=name)
        loader.warm_up(loaded)
        self._read_mlx_peak()
        self.loaded = loaded
        prefixes = PrefixCache(loaded.model) if self.options.prefix_cache else None
        self.engine = Engine(loaded.model, loaded.tokenizer, batch_size=loaded.plan.batch_size,
                             context_length=loaded.context_length,
                             planned_tokens=loaded.planned_tokens, prefix_cache=prefixes)
        self._lost_waiting = self.store.has_lost(name)
        self.store.update_worker(
            self.id, model=name, state=WorkerState.IDLE, compute=loaded.plan.describe(),
            memory=loaded.estimate.describe() if loaded.estimate else None,
            batch_size=loaded.plan.batch_size,
            load_seconds=loaded.load_seconds, warmup_seconds=loaded.warmup_seconds,
        )
        if previous is not None:
            self.store.record_switch(self.id, previous, name, unload_s, loaded.load_seconds,
                                     loaded.warmup_seconds)
            log.info("switched model %s -> %s (unload %.1f s, load %.1f s, warm-up %.1f s)",
                     previous, name, unload_s, loaded.load_seconds, loaded.warmup_seconds)
        self.state = WorkerState.IDLE

    def _shutdown(self) -> None:
        """Put every request still held back in the queue, for the next worker."""
        if self.engine is None:
            return
        held = self.engine.held()
        if held:
            self.engine.remove({c.id for c in held})
            self.store.release([c.id for c in held], self.id)
            for c in held:
                self.put_back[c.job_id] = self.put_back.get(c.job_id, 0) + 1
            dispatch.queue_jobs(self.store, self.queue, self.put_back)
        self.engine.close()

    # -- heartbeat thread -------------------------------------------------------------

    def _heartbeat(self) -> None:
        last_progress = time.monotonic()
        while not self.finished.wait(settings.HEARTBEAT_SECONDS):
            try:
                self._beat()
            except Exception:  # a missed heartbeat is not worth stopping the work for
                log.exception("heartbeat failed")
            self._notify()
            if time.monotonic() - last_progress >= PROGRESS_SECONDS:
                last_progress = time.monotonic()
                self._log_progress()

    def _log_progress(self) -> None:
        """One line a minute on the jobs in progress, for whoever reads the log."""
        try:
            active = [j for j in self.store.list_jobs(PROGRESS_JOBS)
                      if j.remaining and j.started_at]
        except Exception:
            log.exception("could not read the jobs' progress")
            return
        if active:
            log.info("progress: %s", "; ".join(j.progress_line() for j in active))

    def _beat(self, **values) -> None:
        engine = self.engine
        report = {"state": self.state, "peak_memory": peak_memory_bytes(self.mlx_peak),
                  **(engine.counters() if engine is not None else {}), **values}
        self.store.update_worker(self.id, **report)
