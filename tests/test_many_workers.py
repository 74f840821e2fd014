"""Several workers through a night that goes wrong, against real processes and servers.

Three workers share a PostgreSQL database and a Redis queue; two share one SQLite home.
Both groups serve jobs of two models, one of them a broken folder. While they run, the
test kills workers at random and restarts them, submits and cancels jobs, and stores a
500,000-line file. One request kills whichever worker runs it (the probe SIGKILLs the
process), and two raise inside the model step every time.

At the end: every request has at most one stored result and each healthy one is done;
the killer failed after --max-attempts deaths with the reason; the raising ones failed
alone; the broken model's runnable requests failed and nothing else did; no worker
exited that was not killed; and each worker ran a fair share.

Set NIGHTSHIFT_CHAOS_SEED to replay a run's kill schedule; failures print the seed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nightshift.jobs import settings
from nightshift.jobs.store import Store
from nightshift.jobs.vocabulary import CANCELLED, DONE, FAILED, QUEUED, RUNNING

from tests.backends import postgres_database, redis_queue
from tests.chaos import in_home, install_model, run_cli, start_worker

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

KILLER_SEED, RAISER_SEEDS = 4242, (31337, 27182)
MAX_ATTEMPTS = 3
KILLS = 4  # random SIGKILLs by the test, per group of workers (the killer adds its own)
KILL_EVERY = (1.5, 4.0)  # seconds between random kills, uniform
BIG_SUBMIT_LINES = 500_000
DEADLINE_SECONDS = 900
WORKER_ARGS = ("--batch-size", "8", "--max-attempts", str(MAX_ATTEMPTS), "--grace", "1")
_WORDS = "night shift queue worker answer prompt model batch token morning".split()


def _rng() -> tuple[random.Random, int]:
    seed = int(os.environ.get("NIGHTSHIFT_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    return random.Random(seed), seed


def _write(path: Path, n: int, tag: str, special: dict[int, int] | None = None) -> Path:
    """``n`` short prompts; ``special`` maps a line index to a sampling seed (the
    probe's killer or raisers), sampled at temperature 1."""
    rng = random.Random(tag)
    with open(path, "w") as f:
        for i in range(n):
            row = {"custom_id": f"{tag}-{i}",
                   "prompt": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 30))),
                   "max_tokens": rng.randint(8, 32)}
            if special and i in special:
                row.update(temperature=1.0, seed=special[i])
            f.write(json.dumps(row) + "\n")
    return path


def _write_big(path: Path, n: int) -> Path:
    line = json.dumps({"prompt": "held for tomorrow night", "max_tokens": 4}) + "\n"
    with open(path, "w") as f:
        for _ in range(n // 10_000):
            f.write(line * 10_000)
    return path


@dataclass
class Slot:
    """One worker's place: restarted after each death, counted as one worker."""

    name: str
    proc: subprocess.Popen | None = None
    pids: list[int] = field(default_factory=list)
    killed_by_test: int = 0
    died_by_itself: list[int] = field(default_factory=list)  # return codes


@dataclass
class Group:
    """Workers sharing one database and queue."""

    label: str
    env: dict
    home: Path
    slots: list[Slot]
    logs: Path
    jobs: dict[str, str] = field(default_factory=dict)  # role -> job id
    kills_left: int = KILLS

    def store(self) -> Store:
        with in_home(self.home):
            return Store(self.env.get(settings.DATABASE_URL_ENV))

    def cli(self, *args, **kw):
        return run_cli(*args, **self.env, **kw)

    def submit(self, path: Path, *args) -> str:
        result = self.cli("submit", path, "--json", "-q", *args, timeout=600)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["id"]

    def start(self, slot: Slot) -> None:
        slot.proc = start_worker(*WORKER_ARGS, log_path=self.logs / f"{slot.name}.log",
                                 NIGHTSHIFT_TEST_KILLER_SEED=KILLER_SEED,
                                 NIGHTSHIFT_TEST_POISON_SEED=",".join(map(str, RAISER_SEEDS)),
                                 **self.env)
        slot.pids.append(slot.proc.pid)


@contextmanager
def _group(label, tmp_path, tiny_llama_dir, n_workers, database_url=None, queue_url=None):
    home = tmp_path / label
    env = {settings.HOME_ENV: str(home)}
    if database_url:
        env[settings.DATABASE_URL_ENV] = database_url
    if queue_url:
        env[settings.QUEUE_URL_ENV] = queue_url
    install_model(home, tiny_llama_dir, "tiny")
    broken = Path(install_model(home, tiny_llama_dir, "broken"))
    (home / "models" / "broken" / "config.json").write_text("{damaged")
    assert broken
    logs = tmp_path / f"{label}-logs"
    logs.mkdir()
    group = Group(label, env, home, [Slot(f"{label}-w{i}") for i in range(n_workers)], logs)
    try:
        yield group
    finally:
        for slot in group.slots:
            if slot.proc and slot.proc.poll() is None:
                os.killpg(slot.proc.pid, signal.SIGKILL)
                slot.proc.wait()


def _unfinished(group: Group, store: Store) -> int:
    """Requests of the group's jobs that can still run now (not the jobs held for later)."""
    return sum(store.job(j).remaining for role, j in group.jobs.items()
               if role not in ("later", "big"))


def _safe_to_kill(store: Store, slot: Slot) -> bool:
    """The test's own kills spare a worker running requests lost before, so no healthy
    request dies three times by the test's hand (the killer request does that alone)."""
    from nightshift.jobs.schema import requests
    from sqlalchemy import select

    with store.read() as conn:
        return conn.execute(
            select(requests.c.id).where(requests.c.status == RUNNING, requests.c.lost > 0,
                                        requests.c.worker_id.like(f"%:{slot.proc.pid}:%"))
            .limit(1)).first() is None


def test_many_workers_through_a_night_that_goes_wrong(tmp_path, tiny_llama_dir):
    rng, seed = _rng()
    with ExitStack() as stack:
        pg_url = stack.enter_context(postgres_database())
        rq_url = stack.enter_context(redis_queue())
        pg = stack.enter_context(_group("pg", tmp_path, tiny_llama_dir, 3, pg_url, rq_url))
        lite = stack.enter_context(_group("sqlite", tmp_path, tiny_llama_dir, 2))
        groups = [pg, lite]
        sizes = {"pg": (500, 400, 80), "sqlite": (350, 250, 60)}
        for g in groups:
            first, more, cancel = sizes[g.label]
            special = {7: KILLER_SEED, 20: RAISER_SEEDS[0], 21: RAISER_SEEDS[1]}
            g.jobs["first"] = g.submit(_write(tmp_path / f"{g.label}-1.jsonl", first,
                                              f"{g.label}-first", special), "--model", "tiny")
            g.jobs["broken"] = g.submit(_write(tmp_path / f"{g.label}-b.jsonl", 30,
                                               f"{g.label}-broken"), "--model", "broken")
            g.jobs["later"] = g.submit(_write(tmp_path / f"{g.label}-l.jsonl", 20,
                                              f"{g.label}-later"),
                                       "--model", "broken", "--at", "2099-01-01T02:00")
            for slot in g.slots:
                g.start(slot)

        # Work that arrives while the workers run: more jobs, a cancel, a huge file.
        extra_errors: list[str] = []

        def arrivals(g: Group):
            try:
                first, more, cancel = sizes[g.label]
                if g.label == "sqlite":  # while the workers write, so they wait on it
                    big = _write_big(tmp_path / "big.jsonl", BIG_SUBMIT_LINES)
                    g.jobs["big"] = g.submit(big, "--model", "tiny", "--at", "2099-01-01T02:00")
                else:
                    time.sleep(3)
                g.jobs["more"] = g.submit(_write(tmp_path / f"{g.label}-2.jsonl", more,
                                                 f"{g.label}-more"), "--model", "tiny")
                g.jobs["cancel"] = g.submit(_write(tmp_path / f"{g.label}-c.jsonl", cancel,
                                                   f"{g.label}-cancel"), "--model", "tiny")
                time.sleep(2)
                result = g.cli("cancel", g.jobs["cancel"])
                if result.returncode:
                    extra_errors.append(f"cancel: {result.stderr}")
            except BaseException as exc:  # reported in the main thread
                extra_errors.append(repr(exc))

        threads = [threading.Thread(target=arrivals, args=(g,)) for g in groups]
        for t in threads:
            t.start()

        stores = {g.label: g.store() for g in groups}
        start = time.monotonic()
        next_kill = {g.label: start + rng.uniform(*KILL_EVERY) for g in groups}
        finished: set[str] = set()
        while len(finished) < len(groups):
            assert time.monotonic() - start < DEADLINE_SECONDS, (
                f"not finished in {DEADLINE_SECONDS} s (seed {seed}): "
                + str({g.label: _unfinished(g, stores[g.label]) for g in groups}))
            time.sleep(0.25)
            for g in groups:
                store = stores[g.label]
                for slot in g.slots:
                    code = slot.proc.poll()
                    if code is not None:  # died by itself: the killer request, or a bug
                        slot.died_by_itself.append(code)
                        g.start(slot)
                now = time.monotonic()
                if g.kills_left and now > next_kill[g.label]:
                    slot = rng.choice(g.slots)
                    if slot.proc.poll() is None and _safe_to_kill(store, slot):
                        os.killpg(slot.proc.pid, signal.SIGKILL)
                        slot.proc.wait()
                        slot.killed_by_test += 1
                        g.kills_left -= 1
                        g.start(slot)
                    next_kill[g.label] = now + rng.uniform(*KILL_EVERY)
                if (not any(t.is_alive() for t in threads) and not g.kills_left
                        and _unfinished(g, store) == 0):
                    finished.add(g.label)
        for t in threads:
            t.join()
        assert not extra_errors, extra_errors

        report = {}
        for g in groups:
            store = stores[g.label]
            for slot in g.slots:  # a clean stop, and each says what it put back
                slot.proc.send_signal(signal.SIGTERM)
            for slot in g.slots:
                assert slot.proc.wait(timeout=60) == 0, (seed, slot.name)
            report[g.label] = _check(g, store, seed)
        print(f"\nmany workers (seed {seed}): {json.dumps(report, indent=1)}")


def _check(g: Group, store: Store, seed: int) -> dict:
    """Every promise of the night, for one group of workers."""
    rows = {role: list(store.iter_requests(job)) for role, job in g.jobs.items()}
    where = f"{g.label}, seed {seed}"
    for role, job in g.jobs.items():  # the kept counts are the rows'
        assert store.job(job).counts == dict(Counter(r.status for r in rows[role])), where

    first = {r.custom_id: r for r in rows["first"]}
    killer, raisers = first[f"{g.label}-first-7"], [first[f"{g.label}-first-{i}"]
                                                     for i in (20, 21)]
    assert killer.status == FAILED and killer.lost == MAX_ATTEMPTS, (where, killer)
    assert killer.error.startswith(f"the worker died {MAX_ATTEMPTS} times while running it")
    for r in raisers:
        assert r.status == FAILED and "poisoned request" in r.error, (where, r.error)
    healthy = [r for r in rows["first"] + rows["more"]
               if r not in raisers and r is not killer]
    assert {r.status for r in healthy} == {DONE}, (where, Counter(r.status for r in healthy))
    assert all(r.response is not None and r.completion_tokens for r in healthy)
    assert {r.status for r in rows["cancel"]} <= {DONE, CANCELLED}, where
    assert {r.status for r in rows["broken"]} == {FAILED}, where
    assert all("could not load model broken" in r.error for r in rows["broken"])
    assert {r.status for r in rows["later"]} == {QUEUED}, where
    if "big" in rows:
        assert store.job(g.jobs["big"]).counts == {QUEUED: BIG_SUBMIT_LINES}, where
    # Exactly one stored result each: the job totals count each result once.
    for role in ("first", "more"):
        job = store.job(g.jobs[role])
        done = [r for r in rows[role] if r.status == DONE]
        assert job.completion_tokens == sum(r.completion_tokens for r in done), where

    # Workers: none died but by a kill; each ran a fair share.
    by_slot: Counter = Counter()
    for r in rows["first"] + rows["more"] + rows["cancel"]:
        if r.status == DONE:
            pid = int(r.worker_id.split(":")[1])
            by_slot[next(s.name for s in g.slots if pid in s.pids)] += 1
    deaths = {s.name: s.died_by_itself for s in g.slots}
    assert all(code == -signal.SIGKILL for codes in deaths.values() for code in codes), deaths
    assert sum(len(c) for c in deaths.values()) >= MAX_ATTEMPTS, deaths  # the killer's
    # Claims were taken back only from dead workers: never more lost requests than the
    # deaths could hold (a batch each). A live worker starved of heartbeats by the big
    # submit would have lost its whole batch without dying.
    deaths_total = sum(len(c) for c in deaths.values()) + sum(s.killed_by_test for s in g.slots)
    assert sum(1 for r in healthy if r.lost) <= deaths_total * 8, (where, deaths_total)
    total = sum(by_slot.values())
    fair = total / len(g.slots)
    assert all(by_slot[s.name] >= 0.25 * fair for s in g.slots), (where, by_slot)
    return {"requests": sum(len(r) for r in rows.values()), "done": total,
            "done_by_worker": dict(by_slot), "killed_by_test": sum(s.killed_by_test
                                                                    for s in g.slots),
            "killed_by_the_killer_request": sum(len(c) for c in deaths.values()),
            "attempts_max": max(r.attempts for r in healthy)}
