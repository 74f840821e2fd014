"""Security: the queue never runs code it reads, a model folder's code runs only with
--trust-remote-code, export never overwrites a file unasked, and nothing a user
submits becomes SQL."""

from __future__ import annotations

import json
import os
import pickle
import signal
from contextlib import contextmanager

import pytest
import sqlalchemy
from nightshift.jobs.schema import jobs, requests
from nightshift.jobs.store import Store
from nightshift.jobs.vocabulary import DONE
from nightshift.worker.queue import Queue
from sqlalchemy import event, func, select

from tests.chaos import install_model, run_cli, start_worker, submit, write_prompts
from tests.workers import wait_for


class _Exploit:
    """Unpickling this runs a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@contextmanager
def _queue_url(kind: str):
    if kind == "sqlite":
        yield None
        return
    from tests.backends import redis_queue

    with redis_queue() as url:
        os.environ["NIGHTSHIFT_QUEUE_URL"] = url
        try:
            yield url
        finally:
            del os.environ["NIGHTSHIFT_QUEUE_URL"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_pickle_in_the_queue_is_refused_not_run(kind, tiny_model, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker))
    pickle.loads(payload)  # the payload is live: unpickled, it runs
    assert marker.exists()
    marker.unlink()
    with _queue_url(kind):
        write_prompts(tmp_path / "p.jsonl", 3)
        job = submit(tmp_path / "p.jsonl", "--model", "tiny")
        queue = Queue()
        # Raw bytes straight into the queue's storage, as anyone who can write to a
        # shared queue could; ahead of the real task.
        queue.huey.storage.enqueue(payload, 100)
        queue.huey.storage.enqueue(json.dumps({"name": "os.system", "args": ["touch x"]})
                                   .encode(), 99)
        log = tmp_path / "worker.log"
        proc = start_worker("--model", "tiny", "--batch-size", "4", log_path=log)
        try:
            store = Store()
            wait_for(lambda: store.job(job).counts == {DONE: 3}, timeout=120)
            wait_for(lambda: queue.pending() == 0, timeout=30)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    assert not marker.exists(), "the worker unpickled a queue message"
    text = log.read_text()
    assert text.count("Error reading from queue") == 2, text
    assert "refused a queue message" in text
    assert proc.returncode == 0


_EVIL = """
import pathlib
pathlib.Path({marker!r}).touch()
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _evil_model(home, tiny_llama_dir, marker, where: str) -> str:
    """A model folder that runs its own code: by its tokenizer (``auto_map``) or by
    its architecture (mlx-lm's ``model_file``)."""
    name = install_model(home, tiny_llama_dir, f"evil-{where}")
    folder = home / "models" / name
    (folder / "evil.py").write_text(_EVIL.format(marker=str(marker)))
    if where == "tokenizer":
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    else:
        config = json.loads((folder / "config.json").read_text())
        config["model_file"] = "evil.py"
        (folder / "config.json").write_text(json.dumps(config))
    return name


@pytest.mark.slow
@pytest.mark.parametrize("where", ["tokenizer", "architecture"])
def test_model_code_runs_only_with_trust_remote_code(where, home, tiny_llama_dir, tmp_path):
    marker = tmp_path / "ran"
    name = _evil_model(home, tiny_llama_dir, marker, where)
    hf = {"HF_HOME": tmp_path / "hf", "HF_HUB_OFFLINE": "1"}
    plain = run_cli("worker", "--drain", "--model", name, "--batch-size", "2", timeout=300,
                    **hf)
    assert not marker.exists(), plain.stderr
    assert "Traceback" not in plain.stderr
    if where == "architecture":  # refused, saying how to allow it
        assert plain.returncode == 1 and "trust_remote_code" in plain.stderr, plain.stderr
    else:  # the library's own tokenizer class is used instead
        assert plain.returncode == 0, plain.stderr
    # The same folder with the flag does run its code: the test would see it.
    run_cli("worker", "--drain", "--model", name, "--batch-size", "2", "--trust-remote-code",
            timeout=300, **hf)
    assert marker.exists()


def test_export_never_overwrites_without_force(invoke, tiny_model, tmp_path):
    write_prompts(tmp_path / "p.jsonl", 2)
    job = invoke("submit", tmp_path / "p.jsonl", "--model", "tiny", "-q").output.split()[0]
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    link = tmp_path / "link.jsonl"
    link.symlink_to(precious)
    for target in (precious, link):
        result = invoke("export", job, "-o", target, expect=1)
        assert "exists: pass --force" in result.output
        assert precious.read_text() == "keep me"
    # --force replaces the link itself, never writing through it.
    invoke("export", job, "-o", link, "--force")
    assert precious.read_text() == "keep me" and not link.is_symlink()
    assert len(link.read_text().splitlines()) == 2
    assert not list(tmp_path.glob(".*.part"))  # no temporary file left behind


HOSTILE = ["x'); DROP TABLE requests; -- INJ3CT", "\" OR 1=1 -- INJ3CT",
           "INJ3CT' UNION SELECT id, body FROM requests --", "INJ3CT\\'; DELETE FROM jobs; --"]


def test_nothing_submitted_becomes_sql(invoke, tiny_model, tmp_path):
    """Every statement nightshift sends is captured: the user's text is never in one,
    only in the parameters; and it comes back verbatim."""
    statements: list[str] = []

    def capture(_conn, _cursor, statement, _params, _context, _many):
        statements.append(statement)

    event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", capture)
    try:
        path = tmp_path / "in.jsonl"
        rows = [{"custom_id": h, "prompt": h, "metadata": {h: h}, "stop": [h]} for h in HOSTILE]
        rows.append({"custom_id": "batch", "url": "/v1/chat/completions",
                     "body": {"messages": [{"role": "user", "content": HOSTILE[0]}],
                              "user": HOSTILE[1]}})
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        job = json.loads(invoke("submit", path, "--model", "tiny", "--name", HOSTILE[0],
                                "--system", HOSTILE[1], "--json").output)["id"]
        invoke("status", "--json")
        invoke("status", job, "--json")
        exported = [json.loads(x) for x in invoke("export", job).output.splitlines()]
        invoke("export", job, "--format", "csv")
        for hostile_id in HOSTILE:  # as job ids too
            for command in ("status", "export", "cancel", "retry"):
                result = invoke(command, hostile_id, expect=1)
                assert "no job" in result.output and "Traceback" not in result.output
        invoke("cancel", job)
        invoke("retry", job)
    finally:
        event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", capture)
    assert statements and not [s for s in statements if "INJ3CT" in s]
    assert [r["custom_id"] for r in exported] == HOSTILE + ["batch"]
    assert all(r["nightshift"]["metadata"] == {h: h} for r, h in zip(exported, HOSTILE))
    store = Store()
    assert store.job(job).name == HOSTILE[0]
    with store.read() as conn:  # nothing dropped or deleted
        assert conn.execute(select(func.count()).select_from(jobs)).scalar() == 1
        assert conn.execute(select(func.count()).select_from(requests)).scalar() == 5
    bodies = [json.loads(r.body) for r in store.iter_requests(job)]
    assert bodies[0] == [{"role": "user", "content": HOSTILE[0]}]
