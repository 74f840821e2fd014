"""When ``worker --processes N``'s processes load: one after another, or together.

The supervisor (worker/processes.py) runs stand-in child processes here, small Python
scripts that speak its pipe protocol, so the order is exact and takes a second: all
start at once; a process that says the others may load lets the next load while it is
still loading; one that does not holds it back until it is ready. The loader's side (when a real
worker says so) is checked through ``MemoryEstimate.fits_copies``,
``processes_to_load`` and one real load; tests/test_processes.py runs real worker
processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from nightshift.worker import memory, processes

CHILD = """
import os, sys, time
index = os.environ["NIGHTSHIFT_WORKER_PROCESS"].split("/")[0]
with open(sys.argv[1], "a") as log:
    log.write(f"{time.monotonic()} start {index}\\n")
os.read(int(os.environ["NIGHTSHIFT_WORKER_LOAD_FD"]), 1)
with open(sys.argv[1], "a") as log:
    log.write(f"{time.monotonic()} load {index}\\n")
ready = int(os.environ["NIGHTSHIFT_WORKER_READY_FD"])
if os.environ.get("SAY_OTHERS_MAY_LOAD"):
    os.write(ready, b"s")
time.sleep(1.0)  # loading
with open(sys.argv[1], "a") as log:
    log.write(f"{time.monotonic()} ready {index}\\n")
os.write(ready, b"1")
os.read(int(os.environ["NIGHTSHIFT_WORKER_GO_FD"]), 1)
with open(sys.argv[1], "a") as log:
    log.write(f"{time.monotonic()} go {index}\\n")
"""


def run_supervised(tmp_path, monkeypatch, others_may_load: bool) -> dict[str, float]:
    """When each event happened: {"load 2": monotonic seconds, ...}."""
    events = tmp_path / "events"
    monkeypatch.setattr(processes, "child_argv", lambda argv: [sys.executable, *argv])
    if others_may_load:
        monkeypatch.setenv("SAY_OTHERS_MAY_LOAD", "1")
    assert processes.Supervisor(["-c", CHILD, str(events)], 2).run() == 0
    lines = [line.split() for line in events.read_text().splitlines()]
    return {f"{what} {index}": float(when) for when, what, index in lines}


def test_a_process_that_says_so_lets_the_next_load_beside_it(tmp_path, monkeypatch):
    start = time.monotonic()
    at = run_supervised(tmp_path, monkeypatch, others_may_load=True)
    assert at["start 2"] < at["ready 1"]  # started together
    assert at["load 1"] < at["load 2"] < at["ready 1"], at
    # Neither claims work before both are ready.
    assert max(at["ready 1"], at["ready 2"]) < min(at["go 1"], at["go 2"]), at
    assert time.monotonic() - start < 1.9  # the two seconds of loading overlapped


def test_otherwise_the_next_waits_until_it_is_ready(tmp_path, monkeypatch):
    at = run_supervised(tmp_path, monkeypatch, others_may_load=False)
    assert at["start 2"] < at["ready 1"]  # started together: their imports overlap
    assert at["load 1"] < at["ready 1"] < at["load 2"] < at["ready 2"], at
    assert at["ready 2"] < min(at["go 1"], at["go 2"]), at


def test_processes_to_load_counts_itself_and_those_after_it(monkeypatch):
    monkeypatch.delenv(processes.INDEX_ENV, raising=False)
    assert processes.processes_to_load() == 1  # not supervised
    monkeypatch.setenv(processes.INDEX_ENV, "2/4")
    monkeypatch.setenv(processes.READY_FD_ENV, "99")
    assert processes.processes_to_load() == 3
    monkeypatch.delenv(processes.READY_FD_ENV)  # ready already: a later load
    assert processes.processes_to_load() == 1


@pytest.mark.parametrize("available_gb, copies, fits", [(2.4, 3, True), (2.2, 3, False),
                                                        (1.2, 1, True), (1.2, 2, False)])
def test_copies_fit_with_their_weights_loaded_and_one_cache_grown(available_gb, copies, fits):
    gb = 2**30
    est = memory.MemoryEstimate(weights=gb // 2, kv_cache=gb // 2, overhead=0, total=gb,
                                available=int(available_gb * gb), fits=True, batch_size=8,
                                context_tokens=1024, kv_per_sequence=gb // 16)
    # 1 GB for the first copy, 0.5 GB of weights for each other; 15% to spare.
    assert est.fits_copies(copies) is fits


@pytest.mark.slow
def test_a_load_with_a_remembered_batch_size_lets_the_next_load(smollm2, monkeypatch):
    """The worker's usual case: no --batch-size, the size measured at an earlier start.
    The loader looks it up before loading, under the plan it expects to choose; a key
    that differed from the one the measurement stored would hold every start back."""
    from nightshift.worker import batch_size, loader, registry

    first = loader.load(smollm2, loader.LoadOptions(batch_size=4))
    batch_size.remember_batch_size(registry.resolve(smollm2), first.plan, 4, {4: 100.0})
    read, write = os.pipe()
    monkeypatch.setenv(processes.INDEX_ENV, "1/2")
    monkeypatch.setenv(processes.READY_FD_ENV, str(write))
    second = loader.load(smollm2)
    os.close(write)
    assert second.plan.batch_size == 4
    assert os.read(read, 1) == processes.OTHERS_MAY_LOAD
    os.close(read)


def test_the_supervisor_never_imports_mlx():
    code = "import sys, nightshift.worker.processes; print('mlx.core' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
