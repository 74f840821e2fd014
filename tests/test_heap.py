"""A CPU worker's heap keeps what a step frees for the next step (worker/heap.py)."""

from __future__ import annotations

import sys

import pytest

from tests.chaos import run_script

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="glibc's malloc settings")

# A step's worth of buffers, allocated, written and freed twice in a thread (the engine
# runs in one): page faults of the second round, and after give_back.
STEPS = """
import ctypes, json, resource, sys, threading
from nightshift.worker import heap
kept = heap.keep_freed_memory() if sys.argv[1] == "1" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [libc.malloc(size) for size in (48 << 20, 3 << 20, 700 << 10)]
    for b, size in zip(buffers, (48 << 20, 3 << 20, 700 << 10)):
        ctypes.memset(b, 1, size)
    for b in buffers:
        libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
def engine():
    step()
    step()
thread = threading.Thread(target=engine)
thread.start()
thread.join()
heap.give_back()
print(json.dumps({"kept": kept, "faults": faults}))
"""


def test_freed_buffers_are_reused_without_faulting_in_fresh_pages():
    kept = run_script(STEPS, "1")
    plain = run_script(STEPS, "0")
    assert kept["kept"] is True
    pages = (48 << 20) // 4096
    # glibc's defaults map a 48 MB buffer afresh at every malloc: every page faults again.
    assert plain["faults"][1] > pages * 0.9
    # Kept: the second step reuses the first step's pages.
    assert kept["faults"][1] < pages * 0.05


def test_off_with_the_environment_variable():
    assert run_script(STEPS, "1", NIGHTSHIFT_KEEP_FREED_MEMORY="0")["kept"] is False
