"""submit --notify (issue 13): a command run once when a job ends, with the job in its
environment, by whichever process sees the end first; a failing command is logged,
never fatal."""

from __future__ import annotations

import io
import json
import time

import pytest
from nightshift.jobs import notify
from nightshift.jobs.submit import JobOptions, submit
from nightshift.jobs.vocabulary import Chunk, Result

from tests.workers import run_worker


def make_job(store, n=3, **kw):
    data = "".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(n)).encode()
    return submit(store, io.BytesIO(data), "in.jsonl", JobOptions(model="m", **kw),
                  lambda m: m)[0]


def test_an_ended_job_is_handed_out_once(store):
    job = make_job(store, notify="true")
    quiet = make_job(store)  # no command: never handed out
    assert store.claim_notifications() == []  # still queued
    store.register_worker("w", "host", 1, None)
    claimed = store.claim(Chunk(job, 0, 3, "m"), "w", 10)
    now = time.time()
    store.finish([Result(c.id, job, now, now, response="a", finish_reason="stop")
                  for c in claimed[:2]], "w")
    assert store.claim_notifications() == []  # one still running
    store.finish([Result(claimed[2].id, job, now, now, error="boom")], "w")
    store.cancel(quiet)
    (summary, command), = store.claim_notifications()
    assert (summary.id, summary.state, command) == (job, "done", "true")
    assert summary.counts == {"done": 2, "failed": 1}
    assert store.claim_notifications() == []  # once
    # A retry makes it run again when the job ends again.
    store.retry(job)
    assert store.claim_notifications() == []
    store.cancel(job)
    assert [s.id for s, _ in store.claim_notifications()] == [job]


def test_cancel_runs_the_command_with_the_job_in_its_environment(invoke, tiny_model, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"prompt": "ho"}\n')
    seen = tmp_path / "seen.txt"
    command = (f'echo "$NIGHTSHIFT_JOB_ID $NIGHTSHIFT_JOB_STATE $NIGHTSHIFT_JOB_TOTAL '
               f'$NIGHTSHIFT_JOB_CANCELLED $NIGHTSHIFT_JOB_NAME" > {seen}')
    job = json.loads(invoke("submit", prompts, "--json", "--name", "nightly", "--model",
                            tiny_model, "--notify", command).output)["id"]
    invoke("cancel", job)
    assert seen.read_text().split() == [job, "cancelled", "2", "2", "nightly"]


def test_a_failing_or_missing_command_is_logged(caplog, home):
    from nightshift.jobs.store import Store

    store = Store()
    failing, missing = make_job(store, notify="echo no >&2; exit 3"), make_job(
        store, notify="/nonexistent/command")
    store.cancel(failing)
    store.cancel(missing)
    with caplog.at_level("INFO", logger="nightshift.notify"):
        assert notify.sweep(store) == 2
        notify.wait()
    messages = {r.getMessage().split(":")[0]: r.getMessage() for r in caplog.records}
    assert messages[f"job {failing}"] == f"job {failing}: --notify command exited with 3: no"
    assert messages[f"job {missing}"].startswith(
        f"job {missing}: --notify command exited with 127")


@pytest.mark.slow
def test_the_worker_runs_it_when_the_last_result_is_stored(invoke, tiny_model, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"prompt": "ho"}\n')
    seen = tmp_path / "seen.txt"
    job = json.loads(invoke("submit", prompts, "--json", "--model", tiny_model, "--max-tokens",
                            "4", "--notify", f'echo "$NIGHTSHIFT_JOB_STATE $NIGHTSHIFT_JOB_DONE" '
                            f'>> {seen}').output)["id"]
    ran = run_worker("--drain", log_path=tmp_path / "worker.log")
    assert ran.returncode == 0, ran.stderr
    assert seen.read_text() == "done 2\n"  # once
    assert f"job {job}: --notify command ran" in ran.stderr
