"""Helpers for the tests that attack the real worker: start it with probes, follow its
phases, kill it, and check that every request was done exactly once."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from nightshift.jobs import settings
from nightshift.jobs.store import Store
from nightshift.jobs.vocabulary import DONE

REPO = Path(__file__).resolve().parent.parent
PUT_BACK = re.compile(r"put back (\d+) unfinished requests")
_WORDS = ("the quick brown fox jumps over a lazy dog while the night shift keeps every "
          "prompt in the queue until one worker takes it and writes the answer down").split()


def env(**extra) -> dict:
    """The environment for a worker or client process: this test's home, one BLAS
    thread (the CPU is shared), unbuffered output."""
    out = dict(os.environ, PYTHONUNBUFFERED="1", **{k: str(v) for k, v in extra.items()})
    out.setdefault("OPENBLAS_NUM_THREADS", "1")
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), out.get("PYTHONPATH")]))
    return out


def run_script(script: str, *args: str, **extra) -> dict:
    """Run ``python -c script ARGS`` as a worker process would run (``env``); returns
    the JSON of its last line of output."""
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env(**extra))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def start_worker(*args, log_path: Path, phases: Path | None = None, **extra) -> subprocess.Popen:
    """Start the real `nightshift worker ARGS` with probes (tests/probed_worker.py)."""
    if phases is not None:
        extra["NIGHTSHIFT_TEST_PHASES"] = phases
    out = open(log_path, "ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.probed_worker", "worker", *map(str, args)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env(**extra),
            start_new_session=True)
    finally:
        out.close()


def run_cli(*args, timeout=120, **extra) -> subprocess.CompletedProcess:
    """`nightshift ARGS` in its own process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "nightshift.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env(**extra))


class Phases:
    """Follows the phase file a probed worker appends to."""

    def __init__(self, path: Path):
        self.path = path
        path.write_text("")
        self.offset = 0
        self.seen: list[str] = []

    def poll(self) -> list[str]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        new = data[:end].decode().split()
        self.seen += new
        return new

    @property
    def last(self) -> str | None:
        self.poll()
        return self.seen[-1] if self.seen else None

    def wait_for(self, phase: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
        """Return as soon as the worker enters ``phase`` (polling every millisecond)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if phase in self.poll():
                return
            if proc.poll() is not None:
                raise AssertionError(f"the worker exited ({proc.returncode}) before {phase}")
            time.sleep(0.001)
        raise TimeoutError(f"the worker did not reach {phase} in {timeout} s")


def write_prompts(path: Path, n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct chat prompts of varied length (5 to 300 words) and budgets."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.choice([5, 20, 60, 150, 300])))
        rows.append({"custom_id": f"r{i}", "prompt": f"Request {i}: {words}",
                     "max_tokens": rng.randint(12, 64)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def submit(path: Path, *args, **extra) -> str:
    """`nightshift submit PATH ARGS` in its own process; returns the job id."""
    result = run_cli("submit", path, "--json", "-q", *args, **extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["id"]


@contextmanager
def in_home(path: Path):
    """Point this process's NIGHTSHIFT_HOME somewhere else for a while."""
    old = os.environ.get(settings.HOME_ENV)
    os.environ[settings.HOME_ENV] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(settings.HOME_ENV, None)
        else:
            os.environ[settings.HOME_ENV] = old


def install_model(home: Path, source: Path, name: str = "tiny") -> str:
    target = home / "models" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target)
    return name


def responses(store: Store, job_id: str) -> dict[str, str]:
    return {r.custom_id: r.response for r in store.iter_requests(job_id)}


def counts(store: Store) -> Counter:
    """Request statuses over every job."""
    total: Counter = Counter()
    for job in store.list_jobs():
        total.update(job.counts)
    return total


def check_exactly_once(store: Store, job_ids: list[str], expected: dict[str, str]) -> dict:
    """Every request of these jobs is done once, with its own request's answer.

    Checks the rows (one per input line, all done, none running), the answers (each
    equals what a clean run gave for the same custom_id), the job totals (each
    result counted once) and the export (one record per request, in order).
    Returns figures for the report: requests, and the most attempts any took.
    """
    from nightshift.jobs.export import iter_jsonl

    requests = attempts = 0
    for job_id in job_ids:
        job = store.job(job_id)
        rows = list(store.iter_requests(job_id))
        assert job.counts == {DONE: job.total}, (job_id, job.counts)
        assert Counter(r.status for r in rows) == job.counts  # the kept counts are the rows'
        assert [r.seq for r in rows] == list(range(job.total))
        assert len({r.custom_id for r in rows}) == job.total
        wrong = [r.custom_id for r in rows if r.response != expected[r.custom_id]]
        assert not wrong, f"job {job_id}: answers that are not their request's own: {wrong}"
        assert job.completion_tokens == sum(r.completion_tokens for r in rows)
        assert job.prompt_tokens == sum(r.prompt_tokens for r in rows)
        records = [json.loads(line) for line in iter_jsonl(store, job_id)]
        assert [r["custom_id"] for r in records] == [r.custom_id for r in rows]
        assert all(r["response"]["body"]["choices"][0]["message"]["content"]
                   == expected[r["custom_id"]] for r in records)
        requests += job.total
        attempts = max(attempts, *(r.attempts for r in rows))
    return {"requests": requests, "max_attempts": attempts}
