"""A CPU worker's heap (Linux, glibc): what a step frees is kept for the next step.

Every engine step allocates and frees the same large buffers again: activations, logits,
the KV cache's growth and gathers. glibc gives each thread an arena of its own and
unmaps an arena's heap once it empties, and serves a buffer over its mmap threshold
with a mapping of its own, unmapped at ``free``; either way the next step faults in
fresh, zeroed pages. In one process's share of the benchmark's job (32 prompts, ~30 s
on this 2-core machine) that was about 600,000 page faults (2.4 GB) and 2.5-3.5 s of
system time. One arena, no mappings of their own, and a 1 GiB trim threshold leave the
freed memory in the heap for the next step: about 210,000 faults (the heap growing to
its peak once) and 1.5 s. The worker gives the free pages back to the system when it
runs out of work (``give_back``).

Set before the engine's thread starts: a thread takes its arena at its first
allocation. Nothing changes elsewhere (macOS and Metal, CUDA, other C libraries), nor
with ``NIGHTSHIFT_KEEP_FREED_MEMORY=0``.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

log = logging.getLogger(__name__)

KEEP_ENV = "NIGHTSHIFT_KEEP_FREED_MEMORY"  # "0": glibc's defaults
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top beyond this goes back at once
# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8

_kept = False


def keep_freed_memory() -> bool:
    """Keep freed memory in this process's heap from now on (see the module docstring);
    returns whether that is on. Call before starting the threads that run the model."""
    global _kept
    if _kept:
        return True
    libc = _glibc()
    if libc is None or os.environ.get(KEEP_ENV, "1") == "0":
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _kept = all(libc.mallopt(param, value) == 1 for param, value in settings)
    if not _kept:
        log.warning("could not set glibc's malloc to keep freed memory; running with "
                    "its defaults")
    return _kept


def give_back() -> None:
    """Return the heap's free pages to the system (a worker out of work); nothing if
    ``keep_freed_memory`` is off."""
    libc = _glibc() if _kept else None
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """This process's C library where it is glibc (it has ``mallopt`` and
    ``malloc_trim``); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc
