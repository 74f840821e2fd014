"""The seed's architecture through the real worker: a tiny random nemotron-nas model
(real, linear and no-op attention; normal, linear and no-op FFN) served by
`nightshift worker --drain` with continuous batching, answering exactly as mlx-lm's
one-at-a-time greedy generation does on the unpatched model."""

from __future__ import annotations

import json
import shutil

import mlx_lm
import pytest
from nightshift.jobs.schema import workers
from nightshift.jobs.store import Store
from nightshift.worker import memory
from nightshift.worker.compat import nemotron_nas
from sqlalchemy import select

from tests.test_memory import TOLERANCE, peak_in_fresh_process
from tests.tiny_models import build_tiny_nemotron_nas, generate_single
from tests.workers import run_worker

TEXTS = [
    "Hi",
    "The sea is",
    "What is the capital of France?",
    "Count from one to ten: one, two, three",
    "Explain why the sky is blue. Sunlight is scattered by the air, and",
    "Write a short poem about the sea.",
    "Hello, world!",
]
# Different lengths, and a batch of 2 for 7 requests: slots free up at different
# steps and are refilled while the other request is mid-decode.
MAX_TOKENS = [16, 9, 16, 5, 12, 14, 7]
BATCH_SIZE = 2


def load(folder):
    config = json.loads((folder / "config.json").read_text())
    return mlx_lm.load(str(folder), **nemotron_nas.load_kwargs(config))


@pytest.fixture
def nemotron(home, tmp_path) -> str:
    """The tiny nemotron-nas model as "nemo", with an extra eos token it says mid-answer,
    so that some requests stop early and others run to their length."""
    folder = build_tiny_nemotron_nas(tmp_path / "nemo")
    model, tokenizer = load(folder)
    first, _ = generate_single(model, tokenizer, tokenizer.encode(TEXTS[0]), MAX_TOKENS[0])
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], first[5]]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copytree(folder, home / "models" / "nemo")
    return "nemo"


def test_batched_worker_equals_single_greedy(invoke, home, nemotron, tmp_path):
    reference, tokenizer = load(home / "models" / nemotron)  # unpatched: one sequence at a time
    assert nemotron_nas.needs_patch(reference)
    single = [generate_single(reference, tokenizer, tokenizer.encode(t), m)
              for t, m in zip(TEXTS, MAX_TOKENS)]
    assert {reason for _, reason in single} == {"stop", "length"}

    lines = [{"custom_id": f"r{i}", "prompt": t, "max_tokens": m}
             for i, (t, m) in enumerate(zip(TEXTS, MAX_TOKENS))]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    job = json.loads(invoke("submit", path, "--model", nemotron, "--raw", "--json").output)["id"]

    result = run_worker("--drain", "--batch-size", BATCH_SIZE, timeout=300,
                        log_path=tmp_path / "worker.log")
    assert result.returncode == 0, result.stderr
    assert f"ready: {nemotron}: loaded in" in result.stderr
    assert f"batch {BATCH_SIZE}" in result.stderr
    assert "memory: needs ~" in result.stderr  # the start-up line carries the estimate

    records = [json.loads(x) for x in invoke("export", job).output.splitlines()]
    assert [r["nightshift"]["status"] for r in records] == ["done"] * len(TEXTS)
    eos = set(tokenizer.eos_token_ids)
    for record, (tokens, reason) in zip(records, single):
        body = record["response"]["body"]
        text = tokens[:-1] if reason == "stop" and tokens[-1] in eos else tokens
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"] == tokenizer.decode(text), record["custom_id"]
        assert body["choices"][0]["finish_reason"] == reason
        assert body["usage"]["completion_tokens"] == len(tokens)

    # Batched for real: two sequences shared most decode steps (the engine's counters,
    # left in the worker's row), and requests overlapped, never more than two at once.
    with Store().read() as conn:
        [row] = conn.execute(select(workers)).all()
    assert row.sequences_decoded == sum(len(t) for t, _ in single)
    assert row.sequences_decoded / row.decode_steps > 1.5
    spans = [(r["nightshift"]["started_at"], r["nightshift"]["finished_at"]) for r in records]
    assert max(sum(1 for s, f in spans if s <= t < f) for t, _ in spans) == BATCH_SIZE


@pytest.mark.parametrize("batch,context", [(8, 1024), (16, 512)])
def test_memory_estimate_within_15_percent(tmp_path, batch, context):
    """tests/test_memory.py checks the tiny Llama and the default model; this is the
    architecture whose KV cache differs per layer (real attention layers only)."""
    folder = build_tiny_nemotron_nas(tmp_path / "nemo")
    peak = peak_in_fresh_process(folder, batch, context)
    estimate = memory.estimate(folder, batch_size=batch, context_tokens=context, device="cpu")
    assert abs(estimate.total / peak - 1) < TOLERANCE, (estimate.total, peak)
