"""Reasoning models (issue 11): the thinking comes back apart from the answer, a schema
holds the answer and never the thinking, and max_tokens counts both. On a tiny random
model whose chat template opens a <think> section, as DeepSeek-R1's does."""

from __future__ import annotations

import json

import jsonschema
import mlx.core as mx
import mlx_lm
import pytest
from nightshift.jobs import response_format
from nightshift.jobs.vocabulary import Claimed
from nightshift.worker.engine import Engine
from nightshift.worker.reasoning import Thinking

from tests.tiny_models import CHATML_TEMPLATE, build_tiny_llama, run_engine

LABEL = {"type": "object", "properties": {"label": {"enum": ["spam", "ham"]}},
         "required": ["label"], "additionalProperties": False}


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    return mlx_lm.load(str(build_tiny_llama(tmp_path_factory.mktemp("think") / "m",
                                            thinking=True)))


class Forced:
    """The model, except that its generated tokens number k are ``forced[k]`` (a random
    model would think forever)."""

    def __init__(self, model, forced: dict[int, int]):
        self.model, self.forced, self.calls = model, forced, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, inputs, cache=None):
        logits = self.model(inputs, cache=cache)
        if inputs.shape[1] == 1:
            self.calls += 1
            if self.calls in self.forced:
                logits = logits + 1e4 * (mx.arange(logits.shape[-1]) == self.forced[self.calls])
        return logits


def chat(i, text, **params):
    params.setdefault("max_tokens", 24)
    return Claimed(i, "job", i, "chat", [{"role": "user", "content": text}], params, None)


def one(model, tok, request):
    return run_engine(Engine(model, tok, batch_size=2), [request])[request.id]


def test_the_thinking_comes_apart_from_the_answer(thinker):
    model, tok = thinker
    thinking = Thinking.of(tok)
    assert thinking is not None
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                     add_generation_prompt=True)
    assert thinking.opened_by(prompt)
    r = one(Forced(model, {5: tok.think_end_id}), tok, chat(0, "hi", logprobs=0))
    assert r.reasoning and "</think>" not in r.reasoning and "</think>" not in r.response
    assert r.completion_tokens == 24 and r.finish_reason == "length"  # both count
    # Log-probabilities are the answer's only.
    text = b"".join(bytes(e["bytes"]) for e in r.logprobs).decode("utf-8", "replace")
    assert text == r.response


def test_a_schema_holds_the_answer_not_the_thinking(thinker):
    model, tok = thinker
    spec = response_format.from_schema(LABEL, "schema")
    r = one(Forced(model, {6: tok.think_end_id}), tok,
            chat(0, "hi", response_format=spec, max_tokens=40))
    assert r.reasoning  # free text, not JSON
    assert r.finish_reason == "stop"
    jsonschema.validate(json.loads(r.response), LABEL)


def test_a_model_that_opens_its_own_thinking(thinker, monkeypatch):
    """As Qwen3: the template leaves it to the model's first token. Under a schema the
    first token may open the thinking; the grammar starts after it ends."""
    model, tok = thinker
    monkeypatch.setattr(tok._tokenizer, "chat_template", CHATML_TEMPLATE)
    spec = response_format.from_schema(LABEL, "schema")
    r = one(Forced(model, {1: tok.think_start_id, 5: tok.think_end_id}), tok,
            chat(0, "hi", response_format=spec, max_tokens=40))
    assert r.reasoning and r.finish_reason == "stop"
    jsonschema.validate(json.loads(r.response), LABEL)
    brace = tok.encode("{", add_special_tokens=False)[0]
    plain = one(Forced(model, {1: brace}), tok, chat(0, "hi", response_format=spec,
                                                     max_tokens=40))
    assert plain.reasoning is None  # it did not open one: all answer
    jsonschema.validate(json.loads(plain.response), LABEL)


def test_thinking_cut_by_max_tokens_leaves_an_empty_answer(thinker):
    model, tok = thinker
    r = one(model, tok, chat(0, "hi", max_tokens=10))
    assert r.response == "" and r.reasoning and r.finish_reason == "length"


def test_a_raw_completion_is_not_split(thinker):
    model, tok = thinker
    r = one(model, tok, Claimed(0, "job", 0, "completion", "<think>\nhi", {"max_tokens": 8},
                                None))
    assert r.reasoning is None and r.response
