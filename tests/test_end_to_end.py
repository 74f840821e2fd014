"""The whole product on the real default model: submit, a real `nightshift worker --drain`
process, status, export, cancel and retry."""

from __future__ import annotations

import json

import pytest

from tests.workers import run_worker

pytestmark = pytest.mark.slow


def submit(invoke, path, *args):
    return json.loads(invoke("submit", path, "--json", *args).output)["id"]


def test_submit_run_export_cancel_retry(invoke, smollm2, tmp_path):
    questions = tmp_path / "q.jsonl"
    rows = [
        {"custom_id": "paris", "prompt": "What is the capital of France?", "metadata": {"k": 1}},
        {"custom_id": "colors", "prompt": "Name three primary colors.", "max_tokens": 24},
        {"custom_id": "raw", "prompt": "The capital of Italy is", "raw": True, "max_tokens": 8},
        {"custom_id": "stop", "prompt": "Count from 1 to 10, separated by commas.",
         "stop": ["5"], "max_tokens": 40},
        # Longer than the context the first worker run allows: fails alone.
        {"custom_id": "long", "prompt": "Please summarise: " + "lorem ipsum " * 100},
        # Log-probabilities, in the chat shape and in the completions one.
        {"custom_id": "lp", "prompt": "What is 2+2?", "logprobs": True, "top_logprobs": 2,
         "max_tokens": 8},
        {"custom_id": "lp-raw", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "The capital of Italy is", "logprobs": 1, "max_tokens": 6}},
        # Three samples of one prompt.
        {"custom_id": "n3", "prompt": "Name a fruit.", "n": 3, "temperature": 1.0, "seed": 5,
         "max_tokens": 8},
    ]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = submit(invoke, questions, "--max-tokens", "32")
    cancelled = submit(invoke, questions, "--name", "not wanted")
    invoke("cancel", cancelled)

    first = run_worker("--drain", "--max-context", "128", log_path=tmp_path / "worker.log")
    assert first.returncode == 0, first.stderr
    assert "ready" in first.stderr

    status = json.loads(invoke("status", job, "--json").output)
    assert status["counts"]["done"] == 7 and status["counts"]["failed"] == 1
    assert status["completion_tokens"] > 0 and status["tokens_per_second"] > 0
    assert status["peak_memory_bytes"] > 0 and status["ttft_p50"] > 0

    records = [json.loads(x) for x in invoke("export", job).output.splitlines()]
    assert [r["custom_id"] for r in records] == [r["custom_id"] for r in rows]
    by_id = {r["custom_id"]: r for r in records}
    answer = by_id["paris"]["response"]["body"]["choices"][0]["message"]["content"]
    assert "Paris" in answer
    assert by_id["paris"]["nightshift"]["metadata"] == {"k": 1}
    assert by_id["raw"]["response"]["body"]["object"] == "text_completion"
    stopped = by_id["stop"]["response"]["body"]["choices"][0]
    assert "5" not in stopped["message"]["content"] and stopped["finish_reason"] == "stop"
    assert "context window is 128" in by_id["long"]["error"]["message"]
    for r in records[:4]:  # only the requests that asked get log-probabilities
        assert r["response"]["body"]["choices"][0]["logprobs"] is None
    chat = by_id["lp"]["response"]["body"]["choices"][0]
    content = chat["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == chat["message"]["content"]
    assert all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in content)
    assert all(e["top_logprobs"][0]["token"] == e["token"] for e in content)  # greedy
    raw = by_id["lp-raw"]["response"]["body"]["choices"][0]
    assert "".join(raw["logprobs"]["tokens"]) == raw["text"]
    assert all(len(top) == 1 for top in raw["logprobs"]["top_logprobs"])
    assert by_id["lp-raw"]["response"]["body"]["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 0}
    samples = by_id["n3"]["response"]["body"]["choices"]
    assert [c["index"] for c in samples] == [0, 1, 2]
    assert all(c["message"]["content"] and c["finish_reason"] for c in samples)
    for r in records[:4]:
        t = r["nightshift"]
        usage = r["response"]["body"]["usage"]
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
        assert t["queued_at"] <= t["started_at"] < t["first_token_at"] <= t["finished_at"]
        assert t["generation_tps"] is None or t["generation_tps"] > 0

    # The cancelled job's requests never ran.
    gone = [json.loads(x) for x in invoke("export", cancelled).output.splitlines()]
    assert {r["nightshift"]["status"] for r in gone} == {"cancelled"}
    assert all(r["nightshift"]["started_at"] is None for r in gone)

    # Retry runs only the failed request, now with the model's full context.
    assert json.loads(invoke("retry", job, "--json").output)["requeued"] == 1
    second = run_worker("--drain", log_path=tmp_path / "worker.log")
    assert second.returncode == 0, second.stderr
    status = json.loads(invoke("status", job, "--json").output)
    assert status["counts"]["done"] == 8 and status["state"] == "done"
    again = [json.loads(x) for x in invoke("export", job).output.splitlines()]
    assert again[4]["response"]["body"]["choices"][0]["message"]["content"]
    assert [r["response"] for r in again[:4]] == [r["response"] for r in records[:4]]
