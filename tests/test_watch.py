"""status --watch (issue 13): a live view refreshed in place on a terminal (a real
pseudo-terminal here), plain lines when piped, and the worker's progress line."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

from nightshift.jobs.reads import JobSummary

WATCH = [sys.executable, "-m", "nightshift.cli", "status"]


def submit(invoke, tmp_path, tiny_model, n=3) -> str:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(n)))
    return json.loads(invoke("submit", prompts, "--json", "--name", "nightly", "--model",
                             tiny_model).output)["id"]


def read_pty(fd: int, proc: subprocess.Popen, until: float, seen: bytes | None = None) -> bytes:
    """What the terminal shows until ``until``, or until ``seen`` has shown."""
    out = b""
    while time.monotonic() < until and not (seen and seen in out):
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return out


def test_piped_it_prints_a_line_when_something_moves_and_ends_with_the_job(
        invoke, tiny_model, tmp_path):
    job = submit(invoke, tmp_path, tiny_model)
    proc = subprocess.Popen([*WATCH, job, "--watch", "--interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    invoke("cancel", job)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2, out  # queued, then cancelled: nothing printed while nothing moved
    assert lines[0].endswith(f"job {job} (nightly): queued, 0/3 done")
    assert lines[1].endswith(f"job {job} (nightly): cancelled, 0/3 done")


def test_on_a_terminal_it_redraws_in_place_and_leaves_the_last_frame(
        invoke, tiny_model, tmp_path):
    job = submit(invoke, tmp_path, tiny_model)
    master, slave = pty.openpty()
    proc = subprocess.Popen([*WATCH, "--watch", "--interval", "0.2"], stdin=slave,
                            stdout=slave, stderr=slave, env={**os.environ, "COLUMNS": "120"})
    os.close(slave)
    # The first frame, then the cancelled one: as long as a loaded machine takes.
    first = read_pty(master, proc, time.monotonic() + 60, seen=b"nightly")
    invoke("cancel", job)
    later = read_pty(master, proc, time.monotonic() + 60, seen=b"cancelled")
    proc.send_signal(signal.SIGINT)  # Ctrl-C ends the watch
    last = read_pty(master, proc, time.monotonic() + 10)
    assert proc.wait(timeout=10) == 0
    os.close(master)
    screen = (first + later + last).decode(errors="replace")
    assert "No worker is running" in screen and "nightly" in screen
    assert "\x1b[" in screen  # cursor movement: redrawn in place, not appended
    assert "0/3" in screen and "cancelled" in (later + last).decode(errors="replace")
    assert "Traceback" not in screen and "KeyboardInterrupt" not in screen


def test_progress_line():
    job = JobSummary(id="1a2b", name="nightly", model="m", priority=0, total=10_000,
                     created_at=0.0, not_before=None, cancelled_at=None,
                     started_at=time.time() - 3600, finished_at=None, prompt_tokens=0,
                     completion_tokens=180_000, peak_memory=None,
                     counts={"done": 4_500, "failed": 3, "running": 64, "queued": 5_433})
    line = job.progress_line()
    assert line.startswith("job 1a2b (nightly): running, 4,500/10,000 done, 3 failed, 50.0 tok/s")
    assert line.endswith("ETA 1h13m")
