"""`nightshift serve`: a real server process, driven by the official openai client
(unchanged but for base_url and api_key), over the store and queue the command line
uses, with a real worker running the batches."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.workers import start_worker, wait_for

KEY = "test-key-0123456789abcdef"
ENDED = ("completed", "failed", "cancelled", "expired")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None,
         headers: dict | None = None) -> tuple[int, bytes]:
    """A raw request: (status, body), whatever the status."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@contextmanager
def serving(*args, log_path: Path):
    """`nightshift serve ARGS` on a free port of 127.0.0.1; yields its /v1 URL."""
    port = free_port()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nightshift.cli", "serve", "--port", str(port), *args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    base = f"http://127.0.0.1:{port}/v1"
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited: {log_path.read_text()}")
            try:
                http("GET", base + "/files")
                return True
            except OSError:
                return False

        wait_for(up, timeout=60, interval=0.2)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log_path.read_text()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat_line(custom_id: str, content: str, model: str = "gpt-4o-mini", **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}],
                     **body}}


def poll(client: OpenAI, batch_id: str, until=lambda b: b.status in ENDED, timeout=120):
    """The batch, read every half second until ``until`` holds, as a client polls."""
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch) or time.monotonic() > deadline:
            return batch
        time.sleep(0.5)


def lines(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines()]


@pytest.mark.slow
def test_the_openai_client_runs_batches_with_a_real_worker(smollm2, invoke, tmp_path):
    invoke("models", "alias", "gpt-4o-mini", smollm2)
    # Contexts of 256 tokens: a longer prompt fails alone as it is admitted.
    worker = start_worker("--batch-size", "4", "--max-context", "256",
                          log_path=tmp_path / "worker.log")
    try:
        with serving("--api-key", KEY, log_path=tmp_path / "serve.log") as base:
            client = OpenAI(base_url=base, api_key=KEY)

            # The README's client code: upload, create, poll, download.
            requests = write_jsonl(tmp_path / "requests.jsonl", [
                chat_line("paris", "What is the capital of France?", max_tokens=8),
                chat_line("too-long", "Summarise: " + "lorem ipsum " * 200, max_tokens=8),
                chat_line("colors", "Name three colors.", max_tokens=8),
                chat_line("hi", "Say hello.", max_completion_tokens=8),
            ])
            batch_file = client.files.create(file=open(requests, "rb"), purpose="batch")
            assert (batch_file.status, batch_file.purpose, batch_file.filename,
                    batch_file.bytes) == ("processed", "batch", "requests.jsonl",
                                          requests.stat().st_size)
            batch = client.batches.create(input_file_id=batch_file.id,
                                          endpoint="/v1/chat/completions",
                                          completion_window="24h",
                                          metadata={"run": "nightly"})
            assert batch.status == "in_progress" and batch.model == smollm2
            while batch.status not in ("completed", "failed", "expired", "cancelled"):
                time.sleep(1)
                batch = client.batches.retrieve(batch.id)
            results = client.files.content(batch.output_file_id).text
            errors = client.files.content(batch.error_file_id).text

            assert batch.status == "completed", batch
            assert (batch.request_counts.total, batch.request_counts.completed,
                    batch.request_counts.failed) == (4, 3, 1)
            assert batch.metadata == {"run": "nightly"} and batch.errors is None
            assert batch.created_at <= batch.in_progress_at <= batch.completed_at
            assert batch.input_file_id == batch_file.id
            done = lines(results)
            assert [r["custom_id"] for r in done] == ["paris", "colors", "hi"]
            for r in done:  # OpenAI's batch output line
                assert r["id"].startswith("batch_req_") and r["error"] is None
                assert r["response"]["status_code"] == 200
                body = r["response"]["body"]
                assert body["object"] == "chat.completion" and body["model"] == smollm2
                assert body["choices"][0]["message"]["content"]
                assert body["usage"]["completion_tokens"] <= 8
            [failed] = lines(errors)
            assert failed["custom_id"] == "too-long" and failed["response"] is None
            assert failed["error"]["code"] == "request_failed"
            assert "context" in failed["error"]["message"]
            output_file = client.files.retrieve(batch.output_file_id)
            assert (output_file.purpose, output_file.bytes) == ("batch_output",
                                                                len(results.encode()))

            # The command line sees the same job: status lists it under the batch's id,
            # and export has every request.
            listed = json.loads(invoke("status", "--json").output)["jobs"]
            [job] = [j for j in listed if j["name"] == batch.id]
            assert job["counts"]["done"] == 3 and job["counts"]["failed"] == 1
            exported = lines(invoke("export", job["id"]).output)
            assert [r["custom_id"] for r in exported] == ["paris", "too-long", "colors", "hi"]
            assert [r["response"] for r in exported if r["response"]] == \
                [r["response"] for r in done]

            # A job submitted from the command line is a batch over HTTP.
            cli_file = write_jsonl(tmp_path / "cli.jsonl", [{"prompt": "Hi", "max_tokens": 4}])
            cli_job = json.loads(invoke("submit", cli_file, "--json").output)["id"]
            cli_batch = poll(client, f"batch_{cli_job}")
            assert cli_batch.status == "completed" and cli_batch.input_file_id is None
            assert cli_batch.metadata["nightshift_job"] == cli_job
            assert cli_batch.endpoint == "/v1/chat/completions"
            assert len(lines(client.files.content(cli_batch.output_file_id).text)) == 1

            # Cancelled once a first result is in: the queued requests are cancelled,
            # the running ones finish, and every finished result stays.
            many = write_jsonl(tmp_path / "many.jsonl", [
                chat_line(f"q{i}", f"Count from {i} to {i + 30}.", max_tokens=24)
                for i in range(48)])
            many_file = client.files.create(file=open(many, "rb"), purpose="batch")
            doomed = client.batches.create(input_file_id=many_file.id,
                                           endpoint="/v1/chat/completions",
                                           completion_window="24h")
            poll(client, doomed.id, until=lambda b: b.request_counts.completed > 0)
            cancelling = client.batches.cancel(doomed.id)
            assert cancelling.status in ("cancelling", "cancelled")
            assert cancelling.cancelling_at is not None
            doomed = poll(client, doomed.id)
            assert doomed.status == "cancelled" and doomed.cancelled_at is not None
            counts = doomed.request_counts
            kept = lines(client.files.content(doomed.output_file_id).text)
            dropped = lines(client.files.content(doomed.error_file_id).text)
            assert counts.total == 48 and counts.failed == 0
            assert 0 < counts.completed == len(kept) < 48
            assert len(kept) + len(dropped) == 48
            assert {r["error"]["code"] for r in dropped} == {"cancelled"}
            assert all(r["response"]["status_code"] == 200 for r in kept)
            with pytest.raises(openai.BadRequestError):  # ended: nothing to cancel
                client.batches.cancel(batch.id)

            # Cursor pages, newest first, one batch a page.
            ids = [b.id for b in client.batches.list(limit=1)]
            assert ids == [doomed.id, cli_batch.id, batch.id]
    finally:
        worker.send_signal(signal.SIGINT)
        worker.wait(60)


def test_bad_requests_get_openai_errors(home, invoke, tmp_path):
    log = tmp_path / "serve.log"
    with serving("--api-key", KEY, "--max-upload-mb", "1", log_path=log) as base:
        client = OpenAI(base_url=base, api_key=KEY, max_retries=0)

        def fails(status: int, call, param=None, code=None) -> dict:
            with pytest.raises(openai.APIStatusError) as caught:
                call()
            exc = caught.value
            assert exc.status_code == status, exc.body
            assert set(exc.body) == {"message", "type", "param", "code"}, exc.body
            assert exc.body["type"] == ("server_error" if status >= 500
                                        else "invalid_request_error")
            assert (exc.body["param"], exc.body["code"]) == (param, code), exc.body
            assert "Traceback" not in exc.body["message"]
            return exc.body

        # Keys: wrong, missing, or a request from a web page.
        wrong = OpenAI(base_url=base, api_key="not-the-key", max_retries=0)
        fails(401, wrong.files.list, code="invalid_api_key")
        status, body = http("GET", base + "/batches")
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        status, body = http("GET", base + "/batches", headers={
            "Authorization": f"Bearer {KEY}", "Origin": "https://example.com"})
        assert status == 403 and "web pages" in json.loads(body)["error"]["message"]

        # Unknown ids, and ids that are not ids.
        fails(404, lambda: client.files.retrieve("file-0123456789abcdef01234567"))
        fails(404, lambda: client.files.content("file-output-0123abcd"))
        fails(404, lambda: client.files.delete("file-nope"))
        fails(404, lambda: client.batches.retrieve("batch_0123456789abcdef"))
        fails(404, lambda: client.batches.cancel("batch_nope"))
        auth = {"Authorization": f"Bearer {KEY}"}
        for path in ("/files/..%2F..%2Fnightshift.db/content", "/files/../nightshift.db",
                     "/files/%2Fetc%2Fpasswd/content", "/nowhere"):
            status, body = http("GET", base + path, headers=auth)
            assert status == 404 and set(json.loads(body)["error"]) == {
                "message", "type", "param", "code"}, (path, body)
        status, body = http("PUT", base + "/files", headers=auth)
        assert status == 405 and json.loads(body)["error"]["type"] == "invalid_request_error"

        # Uploads: the wrong purpose, one over the limit (nothing of either is kept).
        good = write_jsonl(tmp_path / "good.jsonl", [chat_line("a", "Hi")])
        fails(400, lambda: client.files.create(file=open(good, "rb"), purpose="fine-tune"),
              param="purpose")
        huge = tmp_path / "huge.jsonl"
        huge.write_bytes(b'{"prompt": "' + b"x" * 1_100_000 + b'"}\n')
        message = fails(413, lambda: client.files.create(file=open(huge, "rb"),
                                                         purpose="batch"),
                        param="file", code="file_too_large")["message"]
        assert "1,000,000 bytes" in message
        assert not list((home / "files").iterdir())

        # Batch parameters.
        uploaded = client.files.create(file=open(good, "rb"), purpose="batch")

        def create(**changes):
            params = {"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions",
                      "completion_window": "24h", **changes}
            return lambda: client.batches.create(**params)

        fails(404, create(input_file_id="file-0123456789abcdef01234567"))
        fails(400, create(endpoint="/v1/embeddings"), param="endpoint")
        for window in ("soon", "0h", "24 hours", "1" * 20 + "h"):
            fails(400, create(completion_window=window), param="completion_window")
        fails(400, create(metadata={f"k{i}": "v" for i in range(17)}), param="metadata")
        status, body = http("POST", base + "/batches", b"{not json",
                            {**auth, "Content-Type": "application/json"})
        assert status == 400 and "not valid JSON" in json.loads(body)["error"]["message"]
        status, _ = http("POST", base + "/batches", b"input_file_id=x",
                         {**auth, "Content-Type": "application/x-www-form-urlencoded"})
        assert status == 400

        # A file with bad lines: accepted with status "error", and a batch made from it
        # fails with each line's reason, as `submit` prints them.
        bad = write_jsonl(tmp_path / "bad.jsonl", [
            "not json",
            chat_line("a", "Hi"),
            chat_line("a", "Hi"),
            chat_line("b", "Hi", temperature=7),
            {"prompt": "Hi", "tools": []},
            {"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {}},
        ])
        bad_file = client.files.create(file=open(bad, "rb"), purpose="batch")
        assert bad_file.status == "error" and "5 bad lines of 6" in bad_file.status_details
        failed = client.batches.create(input_file_id=bad_file.id,
                                       endpoint="/v1/chat/completions",
                                       completion_window="24h")
        assert failed.status == "failed" and failed.failed_at is not None
        assert failed.output_file_id is None and failed.error_file_id is None
        errors = [e.model_dump() for e in failed.errors.data]
        assert [(e["line"], e["code"], e["param"]) for e in errors] == [
            (1, "invalid_json_line", None),
            (3, "duplicate_custom_id", "custom_id"),
            (4, "invalid_request", "body.temperature"),
            (5, "invalid_request", "tools"),
            (6, "invalid_url", "url"),
            # and, found at once, that its lines' model is not here (see below)
            (2, "model_not_found", "body.model"),
        ]
        printed = invoke("submit", bad, expect=1).output
        for e in errors[:-1]:
            assert f"{bad}:{e['line']}: {e['message']}\n" in printed
        fails(400, lambda: client.batches.cancel(failed.id), param="batch_id",
              code="batch_not_cancellable")

        # Good lines that cannot run here: a model neither installed nor an alias, and
        # lines of another endpoint than the batch's.
        unknown = client.batches.create(input_file_id=uploaded.id,
                                        endpoint="/v1/chat/completions",
                                        completion_window="24h")
        [error] = unknown.errors.data
        assert (unknown.status, error.code, error.line, error.param) == (
            "failed", "model_not_found", 1, "body.model")
        assert "nightshift models alias gpt-4o-mini" in error.message
        other = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                      completion_window="24h")
        assert [e.code for e in other.errors.data] == ["mismatched_endpoint", "model_not_found"]

        # Files: cursor pages, content as uploaded, deletion.
        ids = [f.id for f in client.files.list(limit=1)]
        assert ids == [bad_file.id, uploaded.id]
        page = client.files.list(limit=1, order="asc")
        assert [f.id for f in page.data] == [uploaded.id] and page.has_more
        assert client.files.content(uploaded.id).content == good.read_bytes()
        assert client.files.delete(uploaded.id).deleted
        fails(404, lambda: client.files.retrieve(uploaded.id))
        # The batches made from it still show.
        assert client.batches.retrieve(unknown.id).input_file_id == uploaded.id
        assert [b.id for b in client.batches.list()] == [other.id, unknown.id, failed.id]


def test_a_batch_expires_at_its_completion_window(invoke, tiny_model, tmp_path):
    """A short completion_window (nightshift takes any duration, OpenAI only "24h"):
    the answers finished before it are in the output file, the rest are expired lines
    in the error file, and the worker stops on the ones it was running (each step of the
    tiny model is slowed to 50 ms, so a long answer would take a minute)."""
    from tests import chaos

    invoke("models", "alias", "gpt-4o-mini", tiny_model)
    worker = chaos.start_worker("--batch-size", "4", log_path=tmp_path / "worker.log",
                                NIGHTSHIFT_TEST_STEP_SECONDS="0.05")
    try:
        with serving("--api-key", KEY, log_path=tmp_path / "serve.log") as base:
            client = OpenAI(base_url=base, api_key=KEY)
            wait_for(lambda: any(w["state"] == "idle" for w in json.loads(
                invoke("status", "--json").output)["workers"]), timeout=120)
            requests = write_jsonl(tmp_path / "requests.jsonl", [
                chat_line("short-0", "Hi", max_tokens=1), chat_line("short-1", "Yo", max_tokens=1),
                *[chat_line(f"long-{i}", "Go on", max_tokens=1200) for i in range(5)]])
            uploaded = client.files.create(file=open(requests, "rb"), purpose="batch")
            batch = client.batches.create(input_file_id=uploaded.id,
                                          endpoint="/v1/chat/completions",
                                          completion_window="4s")
            assert batch.status == "in_progress" and batch.completion_window == "4s"
            assert batch.expires_at - batch.created_at in (3, 4, 5)
            batch = poll(client, batch.id, timeout=60)
            assert batch.status == "expired", batch
            assert batch.expired_at - batch.expires_at < 5  # running ones dropped at once
            assert (batch.request_counts.total, batch.request_counts.completed,
                    batch.request_counts.failed) == (7, 2, 0)
            kept = lines(client.files.content(batch.output_file_id).text)
            assert [r["custom_id"] for r in kept] == ["short-0", "short-1"]
            expired = lines(client.files.content(batch.error_file_id).text)
            assert [r["custom_id"] for r in expired] == [f"long-{i}" for i in range(5)]
            for r in expired:  # OpenAI's line for a request the window left unfinished
                assert r["id"].startswith("batch_req_") and r["response"] is None
                assert r["error"]["code"] == "batch_expired" and r["error"]["message"]
            assert worker.poll() is None  # one batch's deadline never stops a worker
    finally:
        worker.send_signal(signal.SIGINT)
        worker.wait(60)


def test_serve_refuses_other_machines_without_a_key(invoke, monkeypatch):
    monkeypatch.delenv("NIGHTSHIFT_API_KEY", raising=False)
    refused = invoke("serve", "--host", "0.0.0.0", expect=2)
    assert "--api-key" in refused.output
    short = invoke("serve", "--host", "192.0.2.1", "--api-key", "short", expect=2)
    assert "at least 16 characters" in short.output


def test_aliases_name_models_for_submit(invoke, home, tmp_path):
    model = home / "models" / "local-model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    invoke("models", "alias", "gpt-4o-mini", "local-model")
    invoke("models", "alias", "openai/gpt-4o", "gpt-4o-mini")  # an alias's model
    assert json.loads(invoke("models", "alias", "--json").output) == {
        "gpt-4o-mini": "local-model", "openai/gpt-4o": "local-model"}
    assert "an installed model's name" in invoke("models", "alias", "local-model",
                                                 "gpt-4o-mini", expect=1).output
    assert "not found" in invoke("models", "alias", "x", "no-such-model", expect=1).output

    requests = write_jsonl(tmp_path / "r.jsonl", [chat_line("a", "Hi", model="openai/gpt-4o")])
    job = json.loads(invoke("submit", requests, "--json").output)["id"]
    assert json.loads(invoke("status", job, "--json").output)["model"] == "local-model"

    invoke("models", "unalias", "gpt-4o-mini")
    assert json.loads(invoke("models", "alias", "--json").output) == {
        "openai/gpt-4o": "local-model"}
    invoke("models", "unalias", "gpt-4o-mini", expect=1)
    plain = write_jsonl(tmp_path / "p.jsonl", [chat_line("a", "Hi", model="gpt-4o-mini")])
    assert "unknown model 'gpt-4o-mini'" in invoke("submit", plain, expect=1).output


def test_a_stopped_servers_validating_batches_are_settled(store, tmp_path):
    """A server killed while it stored a batch's file leaves the batch ``validating``;
    the next one links it to its job, if that was stored, or fails it."""
    from nightshift.jobs import batches
    from nightshift.jobs.schema import batches as table
    from nightshift.jobs.submit import JobOptions, submit

    requests = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Hi"}])
    with open(requests, "rb") as f:
        job_id, _ = submit(store, f, "r.jsonl", JobOptions(name="batch_00000000000000aa"),
                           lambda name: name)
    with store.write() as conn:
        for batch_id in ("batch_00000000000000aa", "batch_00000000000000bb"):
            conn.execute(table.insert().values(
                id=batch_id, input_file_id="file-x", endpoint="/v1/chat/completions",
                completion_window="24h", created_at=time.time()))
    assert batches.get(store, "batch_00000000000000bb")["status"] == "validating"

    assert batches.recover(store) == 2
    stored = batches.get(store, "batch_00000000000000aa")
    assert stored["status"] == "in_progress" and stored["request_counts"]["total"] == 1
    assert batches.get(store, f"batch_{job_id}")["id"] == "batch_00000000000000aa"
    lost = batches.get(store, "batch_00000000000000bb")
    assert lost["status"] == "failed"
    assert lost["errors"]["data"][0]["code"] == "server_stopped"
    assert batches.recover(store) == 0
