"""``submit --notify COMMAND``: a shell command run once when a job has ended.

Whichever process first sees the job ended (a worker's heartbeat, or ``cancel``) takes
it from the store (``Store.claim_notifications``: once, whatever else is looking) and
runs the command with the job in its environment, so ``notify-send``, ``osascript`` or a
``curl`` to a webhook all work. The command runs in the background; its end is logged,
and a command that fails or hangs never stops the process that ran it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time

from nightshift.jobs.reads import JobSummary
from nightshift.jobs.vocabulary import CANCELLED, DONE, EXPIRED, FAILED

log = logging.getLogger("nightshift.notify")

TIMEOUT_SECONDS = 300  # a command still running then is killed, and that is logged
_running: list[threading.Thread] = []


def environment(job: JobSummary) -> dict[str, str]:
    """What the command is told: ``NIGHTSHIFT_JOB_*`` variables."""
    return {
        "NIGHTSHIFT_JOB_ID": job.id,
        "NIGHTSHIFT_JOB_NAME": job.name or "",
        "NIGHTSHIFT_JOB_STATE": job.state,
        "NIGHTSHIFT_JOB_MODEL": job.model,
        "NIGHTSHIFT_JOB_TOTAL": str(job.total),
        "NIGHTSHIFT_JOB_DONE": str(job.counts.get(DONE, 0)),
        "NIGHTSHIFT_JOB_FAILED": str(job.counts.get(FAILED, 0)),
        "NIGHTSHIFT_JOB_CANCELLED": str(job.counts.get(CANCELLED, 0)),
        "NIGHTSHIFT_JOB_EXPIRED": str(job.counts.get(EXPIRED, 0)),
    }


def sweep(store) -> int:
    """Expire the queued requests of jobs past their deadline (``Store.expire``), then
    run the commands of the jobs that ended since the last sweep; returns how many.
    Each part is a read when there is nothing to do."""
    for job_id, n in store.expire().items():
        log.info("job %s: its deadline passed; expired %d queued requests", job_id, n)
    claimed = store.claim_notifications()
    for job, command in claimed:
        run(command, job)
    return len(claimed)


def run(command: str, job: JobSummary) -> None:
    """Start ``command`` for ``job`` in the background; its outcome is logged."""
    try:
        proc = subprocess.Popen(command, shell=True, env={**os.environ, **environment(job)},
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        log.warning("job %s: --notify command could not start: %s", job.id, exc)
        return
    thread = threading.Thread(target=_wait, args=(proc, job.id), daemon=True,
                              name=f"notify-{job.id}")
    _running.append(thread)
    thread.start()


def _wait(proc: subprocess.Popen, job_id: str) -> None:
    try:
        _, err = proc.communicate(timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        log.warning("job %s: --notify command still running after %d s: killed", job_id,
                    TIMEOUT_SECONDS)
        return
    if proc.returncode:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
        log.warning("job %s: --notify command exited with %d%s", job_id, proc.returncode,
                    f": {tail[0]}" if tail else "")
    else:
        log.info("job %s: --notify command ran", job_id)


def wait(timeout: float = 10.0) -> None:
    """Give commands started by this process up to ``timeout`` seconds to end (before
    the process exits, so their outcome is logged)."""
    deadline = time.monotonic() + timeout
    for thread in list(_running):
        thread.join(max(0.0, deadline - time.monotonic()))
        _running.remove(thread)
