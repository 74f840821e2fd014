"""Several samples of one prompt (issue 11, ``n``): the prompt computed once, each sample
with its own seed derived from the request's, distinct with temperature and reproducible
with a seed, in a batch shared with other requests."""

from __future__ import annotations

import json

import jsonschema
import mlx_lm
import pytest
from nightshift.jobs import response_format
from nightshift.jobs.vocabulary import Claimed
from nightshift.worker.engine import Engine

from tests.tiny_models import run_engine

PROMPTS = ["The night shift starts", "What is the capital of France?", "Count from one to",
           "Tests find mistakes"]
FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                         "n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["ok", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return mlx_lm.load(str(tiny_llama_dir))


def claimed(i, **params):
    params.setdefault("max_tokens", 12)
    return Claimed(i, "job", i, "completion", PROMPTS[i], params, None)


def texts(result):
    return [c["text"] for c in result.choices]


def test_samples_are_distinct_reproducible_and_share_one_prefill(tiny):
    model, tok = tiny
    sampled = {"temperature": 1.0, "seed": 11}
    batch = [claimed(0, n=4, **sampled), claimed(1), claimed(2, n=2), claimed(3, **sampled)]
    engine = Engine(model, tok, batch_size=3, prefill_batch_size=2)  # 7 sequences, 3 slots
    first = run_engine(engine, batch)
    again = run_engine(Engine(model, tok, batch_size=3, prefill_batch_size=2), batch)
    assert len(first[0].choices) == 4 and len(set(texts(first[0]))) > 1
    assert texts(first[0]) == texts(again[0])  # a seed reproduces every sample
    assert first[1].choices is None and first[3].choices is None
    assert texts(first[2])[0] == texts(first[2])[1]  # greedy samples agree
    # The first sample is what the request gives with n=1 and the same seed.
    alone = run_engine(Engine(model, tok, batch_size=3), [claimed(0, **sampled)])[0]
    assert texts(first[0])[0] == alone.response == first[0].response
    assert first[0].completion_tokens == sum(c["completion_tokens"] for c in first[0].choices)
    # Prompts computed: each once, plus one token per sample of an n > 1 request.
    lengths = [len(tok.encode(p)) for p in PROMPTS]
    assert engine.prompt_tokens_computed == (lengths[0] - 1 + 4) + lengths[1] + (
        lengths[2] - 1 + 2) + lengths[3]


def test_each_sample_has_its_own_grammar_and_logprobs(tiny):
    model, tok = tiny
    spec = response_format.from_schema(FLAG, "schema")
    r = run_engine(Engine(model, tok, batch_size=4),
            [claimed(0, n=3, temperature=1.0, seed=2, logprobs=1, response_format=spec,
                     max_tokens=30)])[0]
    assert len(r.choices) == 3
    for c in r.choices:
        jsonschema.validate(json.loads(c["text"]), FLAG)
        assert b"".join(bytes(e["bytes"]) for e in c["logprobs"]).decode() == c["text"]


def test_a_cancelled_request_takes_all_its_samples(tiny):
    model, tok = tiny
    engine = Engine(model, tok, batch_size=8)
    engine.add([claimed(0, n=3, temperature=1.0, max_tokens=50), claimed(1, max_tokens=50)])
    engine.step()
    assert [c.id for c in engine.held()] == [0, 1]
    assert [c.id for c in engine.remove({0})] == [0]
    assert [c.id for c in engine.held()] == [1] and engine.choices == {}


def test_samples_do_not_count_a_shared_prefix_they_computed_again(tiny):
    """n samples prefill their whole prompt once (not from a shared prefix's cache), so
    none of it is reported as cached."""
    from nightshift.worker.prefix import PrefixCache

    model, tok = tiny
    system = "The quick brown fox jumps over the lazy dog. " * 8
    batch = [Claimed(i, "job", i, "completion", system + p, {"max_tokens": 4, **extra}, None)
             for i, (p, extra) in enumerate([(PROMPTS[0], {}), (PROMPTS[1], {"n": 2})])]
    results = run_engine(Engine(model, tok, batch_size=4,
                                prefix_cache=PrefixCache(model, min_tokens=16)), batch)
    assert results[0].cached_tokens > 40 and results[1].cached_tokens == 0
