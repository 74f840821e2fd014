"""`nightshift worker --processes N`: several worker processes under one command.

Real processes on a tiny model: the processes share one job and run each request once;
one that a request kills is started again while the other goes on; a Ctrl-C to the
command reaches each process once (a finish-then-stop, not a put-back-now), and none
is left running.
"""

from __future__ import annotations

import signal
import sqlite3
import time

import pytest
from nightshift.jobs.store import Store
from nightshift.jobs.vocabulary import DONE, FAILED

from tests.chaos import start_worker, submit, write_prompts
from tests.probed_worker import KILLER_ENV
from tests.workers import wait_for

pytestmark = pytest.mark.slow

ARGS = ("--model", "tiny", "--batch-size", "4", "--grace", "5", "--processes", "2")


def rows(home, sql: str) -> list[tuple]:
    with sqlite3.connect(home / "nightshift.db") as db:
        return db.execute(sql).fetchall()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_two_processes_share_a_job_and_run_each_request_once(tiny_model, home, tmp_path):
    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, 160)
    job = submit(prompts, "--model", "tiny")
    log = tmp_path / "worker.log"
    proc = start_worker(*ARGS, "--drain", log_path=log)
    assert proc.wait(timeout=600) == 0, log.read_text()
    text = log.read_text()
    assert store_counts(job) == {DONE: 160}, text
    workers = rows(home, "select id, pid, state, compute from workers")
    assert len(workers) == 2 and len({w[1] for w in workers}) == 2, workers
    assert all(w[2] == "stopped" and "openblas x1" in w[3] for w in workers), workers
    served = dict(rows(home, "select worker_id, count(*) from requests group by worker_id"))
    assert set(served) == {w[0] for w in workers}, (served, text)  # both took a share
    assert max(a for (a,) in rows(home, "select attempts from requests")) == 1
    assert "[1/2]" in text and "[2/2]" in text


def test_a_process_killed_by_a_request_starts_again_and_the_others_go_on(
        tiny_model, home, tmp_path):
    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, 60)
    killer = tmp_path / "k.jsonl"
    killer.write_text('{"custom_id": "killer", "prompt": "boom", "temperature": 1.0, '
                      '"seed": 4242, "max_tokens": 8}\n')
    job = submit(prompts, "--model", "tiny")
    bad = submit(killer, "--model", "tiny")
    log = tmp_path / "worker.log"
    proc = start_worker(*ARGS, "--drain", "--max-attempts", "2", log_path=log,
                        **{KILLER_ENV: 4242})
    assert proc.wait(timeout=600) == 0, log.read_text()
    text = log.read_text()
    assert text.count("was killed by SIGKILL") == 2, text
    assert store_counts(job) == {DONE: 60}, text
    assert store_counts(bad) == {FAILED: 1}, text
    assert rows(home, "select lost from requests where custom_id = 'killer'") == [(2,)]


def test_ctrl_c_reaches_each_process_once_and_none_is_left(tiny_model, home, tmp_path):
    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, 400)
    submit(prompts, "--model", "tiny")
    log = tmp_path / "worker.log"
    proc = start_worker(*ARGS, log_path=log)
    try:
        wait_for(lambda: log.read_text().count(" ready: ") == 2 or proc.poll() is not None,
                 timeout=300)
        time.sleep(0.5)
        pids = [pid for (pid,) in rows(home, "select pid from workers")]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert text.count("SIGINT: finishing in-flight requests") == 2, text
    assert "putting in-flight requests back" not in text, text  # no signal came twice
    assert len(pids) == 2 and not any(alive(p) for p in pids), pids


def store_counts(job_id: str) -> dict:
    return Store().job(job_id).counts
