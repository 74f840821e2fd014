"""Ctrl-C and SIGTERM are acted on at every moment of the worker's life, again and again.

A worker that ignores Ctrl-C is one a user kills with -9. The signal used to be lost now
and then (about one run in several of tests/test_crash.py's signal test), so this test
sends it many times at the moments that lost it: just after the worker says it is ready,
and while the model loads (MLX's first compiled call runs ``system()``, which ignores
SIGINT meanwhile: see ``_check_mlx_compiler`` in worker/service.py); and during a switch
between models, where a stop used to wait for the whole load.
"""

from __future__ import annotations

import random
import signal
import time

import pytest
from nightshift.jobs.store import Store
from nightshift.jobs.vocabulary import DONE, QUEUED

from tests.chaos import PUT_BACK, Phases, install_model, start_worker, submit, write_prompts
from tests.workers import wait_for

pytestmark = pytest.mark.slow

RUNS = 50
LOADING_RUNS = 20
STOP_BOUND_SECONDS = 15.0


def test_a_signal_just_after_ready_stops_the_worker_every_time(tiny_model, tmp_path):
    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, 40)
    submit(prompts, "--model", "tiny")
    rng = random.Random(RUNS)
    slowest = 0.0
    for run in range(RUNS):
        sig = (signal.SIGINT, signal.SIGTERM)[run % 2]
        log = tmp_path / f"worker-{run}.log"
        proc = start_worker("--model", "tiny", "--batch-size", "4", "--grace", "1",
                            log_path=log)
        try:
            wait_for(lambda log=log, proc=proc: " ready: " in log.read_text()
                     or proc.poll() is not None, timeout=120, interval=0.005)
            time.sleep(rng.uniform(0, 0.3))
            sent = time.monotonic()
            proc.send_signal(sig)
            try:
                code = proc.wait(timeout=STOP_BOUND_SECONDS)
            except Exception as exc:
                proc.send_signal(signal.SIGUSR1)  # every thread's stack, into the log
                time.sleep(2)
                raise AssertionError(f"run {run}: {sig.name} ignored\n{log.read_text()}") \
                    from exc
            slowest = max(slowest, time.monotonic() - sent)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert code == 0, f"run {run}: {sig.name}: exit {code}\n{log.read_text()}"
        assert len(PUT_BACK.findall(log.read_text())) == 1, log.read_text()
    print(f"\n{RUNS} stops just after ready, none missed; slowest exit {slowest:.1f} s")


def test_a_signal_while_the_model_loads_stops_the_worker_every_time(tiny_model, tmp_path):
    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, 8)
    submit(prompts, "--model", "tiny")
    rng = random.Random(LOADING_RUNS)
    for run in range(LOADING_RUNS):
        sig = (signal.SIGINT, signal.SIGTERM)[run % 2]
        phases = Phases(tmp_path / f"phases-{run}")
        log = tmp_path / f"loading-{run}.log"
        proc = start_worker("--model", "tiny", "--batch-size", "4", "--grace", "1",
                            log_path=log, phases=phases.path)
        try:
            phases.wait_for("loading", proc)
            time.sleep(rng.uniform(0, 0.05))
            proc.send_signal(sig)
            assert proc.wait(timeout=STOP_BOUND_SECONDS) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_stop_during_a_model_switch_is_prompt(home, tiny_llama_dir, tmp_path):
    first = install_model(home, tiny_llama_dir, "first")
    second = install_model(home, tiny_llama_dir, "second")
    write_prompts(tmp_path / "p.jsonl", 3)
    done = submit(tmp_path / "p.jsonl", "--model", first)
    waiting = submit(tmp_path / "p.jsonl", "--model", second)
    store = Store()
    phases = Phases(tmp_path / "phases")
    log = tmp_path / "worker.log"
    proc = start_worker("--batch-size", "4", log_path=log, phases=phases.path,
                        NIGHTSHIFT_TEST_SWITCH_SECONDS=120)
    try:
        phases.wait_for("loading", proc)
        wait_for(lambda: store.job(done).counts == {DONE: 3}, timeout=120)
        wait_for(lambda: phases.poll() is not None and phases.seen.count("loading") >= 2,
                 timeout=60, interval=0.01)
        time.sleep(0.3)  # inside the second model's (slow) load
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, log.read_text()
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert took < 5, took
    assert [int(n) for n in PUT_BACK.findall(log.read_text())] == [0]
    assert store.job(waiting).counts == {QUEUED: 3}
    assert not store.live_workers()
