"""Running the real worker as a separate process, as a user does."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def worker_command(*args) -> list[str]:
    return [sys.executable, "-m", "nightshift.cli", "worker", *map(str, args)]


def start_worker(*args, log_path=None) -> subprocess.Popen:
    """Start `nightshift worker ARGS` in its own process group; output goes to log_path."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(worker_command(*args), stdout=out, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            start_new_session=True)


def run_worker(*args, timeout=600, log_path=None) -> subprocess.CompletedProcess:
    """Run `nightshift worker ARGS` to completion (use with --drain)."""
    result = subprocess.run(worker_command(*args), capture_output=True, text=True,
                            timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if log_path:
        with open(log_path, "a") as f:
            f.write(result.stdout + result.stderr)
    return result


def wait_for(predicate, timeout=120.0, interval=0.1):
    """Poll until predicate() is true; returns its value, or raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout} s")
