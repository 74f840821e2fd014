"""Crash recovery, proven against the real worker process.

The worker runs as `nightshift worker` in its own process, with probes
(tests/probed_worker.py) that report its phase. Each test stops it again and again at
random moments of a chosen phase (start-up and loading, prefill, decode, inside the
transaction that writes results) and restarts it; at the end every request must be
done exactly once, with its own answer: the one a clean, uninterrupted run gives.

Set NIGHTSHIFT_CHAOS_SEED to replay a run's moments; failures print the seed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter

import pytest
from nightshift.jobs.schema import requests, workers
from nightshift.jobs.store import Store
from nightshift.jobs.vocabulary import QUEUED, RUNNING
from sqlalchemy import select, update

from tests.chaos import (
    PUT_BACK,
    Phases,
    check_exactly_once,
    counts,
    in_home,
    install_model,
    responses,
    run_cli,
    start_worker,
    submit,
    write_prompts,
)

pytestmark = pytest.mark.slow

PHASES = ("loading", "prefill", "decode", "writing")
# A stop lands this long (at most; uniform) after the worker enters the phase: the
# results transaction stays open 20 ms (the probe's pause), so a "writing" stop lands
# inside it before the commit.
JITTER = {"loading": 0.05, "prefill": 0.01, "decode": 0.03, "writing": 0.012}
KILLS_PER_PHASE = 6  # SIGKILL: at least this many deaths in each phase (24 or more)
STOPS_PER_PHASE = 2  # SIGTERM and SIGINT: this many stops in each phase
STOP_BOUND_SECONDS = 15.0  # a signalled worker is gone within this (grace 1 s included)
# Dozens of deaths at random moments: a request in flight at three of them would be
# failed as the one that kills the worker (--max-attempts 3, tests/test_many_workers.py
# proves that); here every request must be done, so the limit is out of reach.
WORKER_ARGS = ("--model", "tiny", "--batch-size", "4", "--max-attempts", "100")


def _rng() -> tuple[random.Random, int]:
    seed = int(os.environ.get("NIGHTSHIFT_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    return random.Random(seed), seed


@pytest.fixture(scope="module")
def workload(tmp_path_factory, tiny_llama_dir):
    """120 distinct requests and each one's answer from a clean run (greedy, so the
    answer depends on the request alone, whatever shares its batch)."""
    root = tmp_path_factory.mktemp("workload")
    prompts = root / "prompts.jsonl"
    write_prompts(prompts, 120, seed=1)
    home = root / "home"
    install_model(home, tiny_llama_dir)
    job = submit(prompts, "--model", "tiny", NIGHTSHIFT_HOME=home)
    clean = run_cli("worker", "--drain", *WORKER_ARGS, timeout=300, NIGHTSHIFT_HOME=home)
    assert clean.returncode == 0, clean.stderr
    with in_home(home):
        store = Store()
        expected = responses(store, job)
        store.close()
    assert None not in expected.values()
    # Distinct answers, or "its own answer" would prove little.
    assert len(set(expected.values())) > 0.9 * len(expected)
    return prompts, expected


def _pick_phase(done: Counter, phases: tuple[str, ...] = PHASES) -> str:
    return min(phases, key=lambda p: (done[p], phases.index(p)))


def _top_up(store: Store, prompts, jobs: list[str], low: int = 40) -> None:
    """Keep work waiting, so every life of the worker has something to be killed in."""
    c = counts(store)
    if c[QUEUED] + c[RUNNING] < low:
        jobs.append(submit(prompts, "--model", "tiny"))


def _finish(store: Store, jobs: list[str], expected, tmp_path) -> dict:
    """Let one clean worker finish what is left, then check every request."""
    result = run_cli("worker", "--drain", *WORKER_ARGS, timeout=300)
    (tmp_path / "final.log").write_text(result.stderr)
    assert result.returncode == 0, result.stderr
    assert counts(store)[RUNNING] == 0
    return check_exactly_once(store, jobs, expected)


def test_sigkill_at_random_moments_loses_nothing_and_runs_nothing_twice(
        workload, tiny_model, tmp_path):
    prompts, expected = workload
    rng, seed = _rng()
    store = Store()
    jobs = [submit(prompts, "--model", "tiny", "--priority", "1")]
    died_in: Counter = Counter()
    lives = 0
    while min(died_in[p] for p in PHASES) < KILLS_PER_PHASE:
        assert lives < 20 * KILLS_PER_PHASE, f"phases not reached (seed {seed}): {died_in}"
        _top_up(store, prompts, jobs)
        target = _pick_phase(died_in)
        phases = Phases(tmp_path / f"phases-{lives}")
        proc = start_worker(*WORKER_ARGS, log_path=tmp_path / "worker.log", phases=phases.path)
        try:
            phases.wait_for(target, proc)
            time.sleep(rng.uniform(0, JITTER[target]))
        finally:
            proc.kill()
            proc.wait()
        died_in[phases.last] += 1  # where it really was when it died
        lives += 1
    # Each death left requests running under a dead worker; the next start took
    # them back. Nothing else cleaned up after the kills.
    figures = _finish(store, jobs, expected, tmp_path)
    print(f"\nSIGKILL (seed {seed}): {lives} kills survived, by phase {dict(died_in)}; "
          f"{figures['requests']} requests in {len(jobs)} jobs done exactly once; "
          f"a request ran at most {figures['max_attempts']} times")


def _attempts(store: Store) -> dict[int, tuple[int, str]]:
    with store.read() as conn:
        return {r.id: (r.attempts, r.status) for r in
                conn.execute(select(requests.c.id, requests.c.attempts, requests.c.status))}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_in_bounded_time_and_says_what_it_put_back(
        sig, workload, tiny_model, tmp_path):
    prompts, expected = workload
    rng, seed = _rng()
    store = Store()
    jobs = [submit(prompts, "--model", "tiny")]
    stopped_in: Counter = Counter()
    put_back = 0
    slowest = 0.0
    lives = 0
    while min(stopped_in[p] for p in PHASES) < STOPS_PER_PHASE:
        assert lives < 10 * STOPS_PER_PHASE, f"phases not reached (seed {seed}): {stopped_in}"
        _top_up(store, prompts, jobs)
        target = _pick_phase(stopped_in, PHASES)
        before = _attempts(store)
        phases = Phases(tmp_path / f"phases-{lives}")
        log = tmp_path / f"worker-{lives}.log"
        # SIGINT: in-flight requests finish within the grace period, or are put back.
        grace = rng.choice(["0", "1"])
        proc = start_worker(*WORKER_ARGS, "--grace", grace, log_path=log, phases=phases.path)
        try:
            phases.wait_for(target, proc)
            time.sleep(rng.uniform(0, JITTER[target]))
            at = phases.last
            signalled = time.monotonic()
            proc.send_signal(sig)
            try:
                code = proc.wait(timeout=STOP_BOUND_SECONDS)
            except subprocess.TimeoutExpired:  # stuck: show where each thread is
                proc.send_signal(signal.SIGUSR1)
                time.sleep(2)
                print(log.read_text()[-20000:])
                raise
            took = time.monotonic() - signalled
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = log.read_text()
        assert code == 0, f"{sig.name} in {at} (seed {seed}): exit {code}\n{text}"
        said = [int(n) for n in PUT_BACK.findall(text)]
        assert len(said) == 1, f"{sig.name} in {at}: no put-back line\n{text}"
        # What it said is what it did: the requests it took and did not finish are
        # queued again, and none is left running.
        after = _attempts(store)
        taken_back = [i for i, (n, status) in after.items()
                      if n > before.get(i, (0, ""))[0] and status == QUEUED]
        assert said[0] == len(taken_back), (sig.name, at, said, taken_back)
        assert not [i for i, (_, status) in after.items() if status == RUNNING]
        stopped_in[at] += 1
        put_back += said[0]
        slowest = max(slowest, took)
        lives += 1
    figures = _finish(store, jobs, expected, tmp_path)
    print(f"\n{sig.name} (seed {seed}): {lives} stops, by phase {dict(stopped_in)}; "
          f"slowest exit {slowest:.1f} s; {put_back} requests put back in all; "
          f"{figures['requests']} requests done exactly once")


def test_signal_while_a_big_model_loads_stops_at_once(tiny_model, tmp_path):
    """A 253B model takes minutes to load; SIGTERM must not wait for that."""
    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, 8)
    job = submit(prompts, "--model", "tiny")
    store = Store()
    phases = Phases(tmp_path / "phases")
    log = tmp_path / "worker.log"
    proc = start_worker(*WORKER_ARGS, log_path=log, phases=phases.path,
                        NIGHTSHIFT_TEST_LOAD_SECONDS=120)
    try:
        phases.wait_for("loading", proc)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [int(n) for n in PUT_BACK.findall(log.read_text())] == [0]
    assert store.job(job).counts == {QUEUED: 8}
    assert not store.live_workers()


def test_a_live_worker_takes_over_from_one_that_dies_later(workload, tiny_model, tmp_path):
    """Requests held by another worker (another host, say) come back when its heartbeat
    goes stale, though this worker started while it still looked alive."""
    prompts, expected = workload
    store = Store()
    job = submit(prompts, "--model", "tiny")
    other = "elsewhere:1:1"
    store.register_worker(other, "elsewhere", 1, None)
    chunk = store.chunks(job)[0]
    held = store.claim(chunk, other, 5)
    log = tmp_path / "worker.log"
    proc = start_worker(*WORKER_ARGS, log_path=log)
    try:
        def settled():
            c = store.job(job).counts
            return c.get("done") == store.job(job).total - len(held) and c.get(RUNNING) == 5

        from tests.workers import wait_for

        wait_for(settled, timeout=120)
        with store.write() as conn:  # the other worker stops beating
            conn.execute(update(workers).where(workers.c.id == other)
                         .values(heartbeat_at=time.time() - 3600))
        wait_for(lambda: store.job(job).counts == {"done": store.job(job).total}, timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STOP_BOUND_SECONDS)
    check_exactly_once(store, [job], expected)


def test_a_worker_restarted_with_the_same_pid_takes_back_what_it_held(workload, tiny_model):
    """In a container the worker is often process 1 every time: a previous life with
    our pid and a fresh heartbeat is not alive, it is us."""
    import os

    from nightshift.jobs.hosts import host_id

    prompts, _ = workload
    store = Store()
    job = submit(prompts, "--model", "tiny")
    store.register_worker("previous-life", host_id(), os.getpid(), None)
    held = store.claim(store.chunks(job)[0], "previous-life", 3)
    assert store.recover("this-life").requeued == len(held) == 3
    assert store.job(job).counts == {QUEUED: store.job(job).total}
