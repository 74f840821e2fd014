"""Log-probabilities (issue 11): computed only for the requests that ask, in a batch they
share with others, with values as mlx-lm computes them and OpenAI's shapes on export."""

from __future__ import annotations

import math

import mlx_lm
import pytest
from nightshift.jobs.export import completion_logprobs
from nightshift.jobs.vocabulary import Claimed
from nightshift.worker import decode
from nightshift.worker.engine import Engine

from tests.tiny_models import run_engine

PROMPTS = ["The night shift starts", "What is the capital of France?", "Count from one to",
           "Tests find mistakes", "The sea is wide and", "Hello, world!", "One, two,"]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return mlx_lm.load(str(tiny_llama_dir))


def claimed(i, text, **params):
    params.setdefault("max_tokens", 12)
    return Claimed(i, "job", i, "completion", text, params, None)


# Which requests ask, and how: greedy and seeded, with and without alternatives.
ASKS = {1: {"logprobs": 0}, 2: {"logprobs": 3}, 4: {"logprobs": 5, "temperature": 0.9, "seed": 7},
        6: {"logprobs": 20}}


def test_only_the_requests_that_ask_get_logprobs_and_nobody_elses_tokens_change(tiny):
    model, tok = tiny
    params = {i: {"temperature": 0.9, "seed": 7} if i == 4 else {} for i in range(len(PROMPTS))}
    # A batch of 3 over 7 prompts: requests join and leave while others decode.
    plain = run_engine(Engine(model, tok, batch_size=3, prefill_batch_size=2),
                [claimed(i, p, **params[i]) for i, p in enumerate(PROMPTS)])
    asked = run_engine(Engine(model, tok, batch_size=3, prefill_batch_size=2),
                [claimed(i, p, **{**params[i], **ASKS.get(i, {})}) for i, p in enumerate(PROMPTS)])
    for i in range(len(PROMPTS)):
        assert asked[i].response == plain[i].response, i
        assert plain[i].logprobs is None
        if i not in ASKS:
            assert asked[i].logprobs is None
            continue
        content, k = asked[i].logprobs, ASKS[i]["logprobs"]
        # (a random model writes broken UTF-8: the text has U+FFFD where bytes are)
        text = b"".join(bytes(e["bytes"]) for e in content).decode("utf-8", "replace")
        assert text == asked[i].response
        assert len(content) in (asked[i].completion_tokens, asked[i].completion_tokens - 1)
        for e in content:
            assert e["logprob"] <= 0 and len(e["top_logprobs"]) == k
            values = [t["logprob"] for t in e["top_logprobs"]]
            assert values == sorted(values, reverse=True)
            assert all(v >= e["logprob"] - 1e-6 for v in values[:1])  # the best is best
            if k and "temperature" not in ASKS[i]:  # greedy: the chosen token is the best
                assert e["top_logprobs"][0]["token"] == e["token"]
                assert e["top_logprobs"][0]["logprob"] == e["logprob"]


def test_values_are_mlx_lms(tiny):
    """The chosen tokens' log-probabilities, batched, against mlx-lm's own single-
    sequence generation (its responses carry the whole vocabulary's)."""
    model, tok = tiny
    results = run_engine(Engine(model, tok, batch_size=3, prefill_batch_size=2),
                  [claimed(i, p, logprobs=0) for i, p in enumerate(PROMPTS)])
    for i, p in enumerate(PROMPTS):
        theirs = list(mlx_lm.stream_generate(model, tok, tok.encode(p), max_tokens=12))
        ours = results[i].logprobs
        for e, r in zip(ours, theirs):
            assert math.isclose(e["logprob"], r.logprobs[r.token].item(), rel_tol=1e-3,
                                abs_tol=1e-4)


def test_greedy_rows_are_never_normalized(tiny, monkeypatch):
    """The point of the logits step: the vocabulary's log-softmax only for the rows that
    need it (sampling or log-probabilities)."""
    model, tok = tiny
    normalized = decode.normalized
    rows = []

    def counting(logits):
        rows.append(len(logits))
        return normalized(logits)

    monkeypatch.setattr(decode, "normalized", counting)
    run_engine(Engine(model, tok, batch_size=3, prefill_batch_size=2),
        [claimed(i, p) for i, p in enumerate(PROMPTS)])
    assert rows == []
    results = run_engine(Engine(model, tok, batch_size=3, prefill_batch_size=2),
                  [claimed(i, p, **ASKS.get(i, {})) for i, p in enumerate(PROMPTS)])
    # The first token is mlx-lm's; the step samples one token ahead of what it returns,
    # so each asking request is normalized once per token after its first, plus one.
    assert set(rows) == {1} and len(rows) == sum(results[i].completion_tokens for i in ASKS)


def test_a_stop_text_cuts_the_logprobs_with_the_answer(tiny):
    model, tok = tiny
    free = run_engine(Engine(model, tok, batch_size=2), [claimed(0, PROMPTS[1], logprobs=1)])[0]
    stop = free.response[len(free.response) // 2:][:3]
    cut = run_engine(Engine(model, tok, batch_size=2),
              [claimed(0, PROMPTS[1], logprobs=1, stop=[stop])])[0]
    assert cut.response == free.response[:free.response.find(stop)]
    kept = cut.logprobs
    assert len(kept) < len(free.logprobs) and kept == free.logprobs[:len(kept)]
    assert b"".join(bytes(e["bytes"]) for e in kept).decode("utf-8", "replace").startswith(
        cut.response)


def test_completions_shape():
    content = [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                                 {"token": "Ho", "logprob": -1.5, "bytes": [72, 111]}]},
               {"token": " there", "logprob": -0.25, "bytes": list(b" there"), "top_logprobs": []}]
    assert completion_logprobs(content) == {
        "tokens": ["Hi", " there"], "token_logprobs": [-0.5, -0.25],
        "top_logprobs": [{"Hi": -0.5, "Ho": -1.5}, {}], "text_offset": [0, 2]}
