"""Concurrent use: while the real worker writes results, several clients submit, read
status and export at once, each command its own process as a user runs it. No command
may fail, and no client may see a half-written job."""

from __future__ import annotations

import csv
import io
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from nightshift.jobs.store import Store
from nightshift.jobs.vocabulary import CANCELLED, DONE, EXPIRED, FAILED, QUEUED, RUNNING

from tests.chaos import REPO, counts, env, run_cli, start_worker, submit, write_prompts

pytestmark = pytest.mark.slow

DURATION = 30.0  # seconds the clients run together
STATUSES = {QUEUED, RUNNING, DONE, FAILED, CANCELLED, EXPIRED}


class Clients:
    """Client loops sharing what was submitted, so readers can check what they see."""

    def __init__(self, tmp_path, deadline: float):
        self.tmp = tmp_path
        self.deadline = deadline
        self.lock = threading.Lock()
        self.known: dict[str, list[str]] = {}  # job id -> its custom_ids, in order
        self.commands: Counter = Counter()
        self.problems: list[str] = []
        self.rng = random.Random()

    def run(self, role: str) -> None:
        step = getattr(self, role)
        n = 0
        while time.monotonic() < self.deadline:
            try:
                step(f"{role}-{n}")
            except Exception as exc:  # a failed check: record it, keep the pressure on
                with self.lock:
                    self.problems.append(f"{role}: {exc!r}")
            n += 1

    def _cli(self, *args, stdin: bytes | None = None) -> str:
        result = subprocess.run([sys.executable, "-m", "nightshift.cli", *map(str, args)], cwd=REPO,
                                input=stdin, capture_output=True, timeout=120, env=env())
        with self.lock:
            self.commands[args[0]] += 1
        err = result.stderr.decode(errors="replace")
        if result.returncode != 0 or "Traceback" in err or "locked" in err:
            raise AssertionError(f"{' '.join(map(str, args))}: exit {result.returncode}: {err}")
        return result.stdout.decode()

    def _lines(self, name: str) -> tuple[bytes, list[str]]:
        ids = [f"{name}-{i}" for i in range(self.rng.randint(1, 6))]
        data = "".join(json.dumps({"custom_id": c, "prompt": f"Say {c}", "max_tokens": 8}) + "\n"
                       for c in ids)
        return data.encode(), ids

    def _pick(self) -> tuple[str, list[str]] | None:
        with self.lock:
            if not self.known:
                return None
            job = self.rng.choice(sorted(self.known))
            return job, self.known[job]

    # -- roles ------------------------------------------------------------------------

    def submit_file(self, name: str) -> None:
        data, ids = self._lines(name)
        path = self.tmp / f"{name}.jsonl"
        path.write_bytes(data)
        out = json.loads(self._cli("submit", path, "--model", "tiny", "--json", "-q"))
        assert out["requests"] == len(ids)
        with self.lock:
            self.known[out["id"]] = ids

    def submit_stdin(self, name: str) -> None:
        data, ids = self._lines(name)
        out = json.loads(self._cli("submit", "-", "--model", "tiny", "--json", "--priority",
                                   self.rng.randint(0, 3), stdin=data))
        with self.lock:
            self.known[out["id"]] = ids

    def status(self, _name: str) -> None:
        overview = json.loads(self._cli("status", "--json", "--limit", "1000"))
        for job in overview["jobs"]:
            c = job["counts"]
            assert set(c) <= STATUSES and sum(c.values()) == job["total"] > 0, job
            with self.lock:
                ids = self.known.get(job["id"])
            assert ids is None or job["total"] == len(ids), job

    def detail(self, _name: str) -> None:
        picked = self._pick()
        if picked is None:
            return
        job, ids = picked
        detail = json.loads(self._cli("status", job, "--json"))
        assert sum(detail["counts"].values()) == detail["total"] == len(ids), detail

    def export(self, name: str) -> None:
        picked = self._pick()
        if picked is None:
            return
        job, ids = picked
        how = self.rng.choice(["jsonl", "csv", "file"])
        if how == "csv":
            rows = list(csv.DictReader(io.StringIO(self._cli("export", job, "--format", "csv"))))
            assert [r["custom_id"] for r in rows] == ids
            assert all(r["response"] for r in rows if r["status"] == DONE)
            return
        if how == "file":
            out = self.tmp / f"{name}.out.jsonl"
            self._cli("export", job, "-o", out, "--force")
            text = out.read_text()
        else:
            text = self._cli("export", job)
        records = [json.loads(line) for line in text.splitlines()]
        assert [r["custom_id"] for r in records] == ids
        for r in records:
            if r["nightshift"]["status"] == DONE:
                assert r["response"]["body"]["choices"][0]["message"]["content"] is not None


def test_clients_submit_read_and_export_while_the_worker_writes(tiny_model, tmp_path):
    write_prompts(tmp_path / "first.jsonl", 40)
    submit(tmp_path / "first.jsonl", "--model", "tiny")
    log = tmp_path / "worker.log"
    worker = start_worker("--model", "tiny", "--batch-size", "4", log_path=log)
    store = Store()
    try:
        from tests.workers import wait_for

        wait_for(lambda: counts(store)[DONE] > 0, timeout=120)  # it is writing
        done_before = counts(store)[DONE]
        clients = Clients(tmp_path, time.monotonic() + DURATION)
        roles = ["submit_file", "submit_stdin", "status", "detail", "export"]
        threads = [threading.Thread(target=clients.run, args=(r,)) for r in roles]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        written = counts(store)[DONE] - done_before
        assert worker.poll() is None, log.read_text()
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=30)
    text = log.read_text()
    assert code == 0 and "Traceback" not in text and "locked" not in text, text
    assert not clients.problems, "\n".join(clients.problems[:20])
    assert written > 0
    assert counts(store)[RUNNING] == 0
    for job in store.list_jobs(limit=None):  # every job whole, its totals its own results
        rows = list(store.iter_requests(job.id))
        assert len(rows) == job.total == sum(job.counts.values())
        assert job.counts == Counter(r.status for r in rows)  # the kept counts are the rows'
        assert job.completion_tokens == sum(r.completion_tokens or 0 for r in rows
                                            if r.status == DONE)
    print(f"\nconcurrency: {len(roles)} clients for {elapsed:.0f} s, "
          f"{sum(clients.commands.values())} commands ({dict(clients.commands)}), "
          f"none failed; the worker stored {written} results meanwhile")


def test_a_slow_submit_does_not_hold_up_the_worker(tiny_model, tmp_path):
    """A producer piping into `submit -` may take minutes; meanwhile the worker must
    still be able to store results (it would fail with "database is locked" after the
    busy timeout if the submit held the write lock while it waited for input)."""
    store = Store()
    first = write_prompts(tmp_path / "p.jsonl", 10)
    lines = [json.dumps(r).encode() + b"\n" for r in first]
    proc = subprocess.Popen([sys.executable, "-m", "nightshift.cli", "submit", "-", "--model",
                             "tiny", "--json", "-q"], cwd=REPO, env=env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"".join(lines[:5]))
        proc.stdin.flush()
        time.sleep(1.5)  # the submit has read half and waits for the rest
        wrote = threading.Event()

        def write():
            store.register_worker("probe", "host", 1, None)  # a write transaction
            wrote.set()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        took_ok = wrote.wait(5)
        out, err = proc.communicate(b"".join(lines[5:]), timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert json.loads(out)["requests"] == 10
    assert took_ok, "a write waited for a submit that was waiting for its input"
    writer.join(timeout=60)


def test_status_and_export_need_no_write_lock(tiny_model, tmp_path):
    """Read commands run while a writer holds the lock for a long time (a big submit)."""
    write_prompts(tmp_path / "p.jsonl", 3)
    job = submit(tmp_path / "p.jsonl", "--model", "tiny")
    store = Store()
    with store.write():  # hold the write lock, as a long transaction would
        for args in (("status", "--json"), ("status", job, "--json"), ("export", job)):
            started = time.monotonic()
            result = run_cli(*args, timeout=30)
            assert result.returncode == 0, result.stderr
            assert time.monotonic() - started < 10, args
