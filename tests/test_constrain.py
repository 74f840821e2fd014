"""Constrained decoding (issue 11): each request's answer follows its own schema, in a
batch it shares with unconstrained requests and others of other schemas, whoever joins
or leaves."""

from __future__ import annotations

import json

import jsonschema
import mlx_lm
import pytest
from nightshift.jobs import response_format
from nightshift.jobs.vocabulary import Claimed
from nightshift.worker.engine import Engine

from tests.tiny_models import run_engine

FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
        "additionalProperties": False}
LABEL = {"type": "object", "properties": {"label": {"enum": ["spam", "ham", "eggs"]},
                                          "n": {"type": "integer", "minimum": 0, "maximum": 99}},
         "required": ["label", "n"], "additionalProperties": False}
ITEMS = {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3,
                                                    "items": {"type": "integer", "maximum": 9}}},
         "required": ["items"], "additionalProperties": False}
SCHEMAS = [FLAG, None, LABEL, ITEMS, None, LABEL, FLAG, None, ITEMS]
PROMPTS = ["The night shift starts", "What is the capital of France?", "Count from one to",
           "Tests find mistakes", "The sea is wide and", "Hello, world!", "One, two,",
           "Name a colour", "A list of numbers:"]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return mlx_lm.load(str(tiny_llama_dir))


def claimed(i, schema=None, **params):
    params.setdefault("max_tokens", 40)
    if schema is not None:
        params["response_format"] = response_format.from_schema(schema, "schema")
    return Claimed(i, "job", i, "completion", PROMPTS[i], params, None)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "seed": 3}],
                         ids=["greedy", "seeded"])
def test_each_row_follows_its_own_schema_and_the_others_are_untouched(tiny, sampling):
    model, tok = tiny
    # Batches of 3 over 9 prompts: requests join and leave while others decode.
    mixed = run_engine(Engine(model, tok, batch_size=3, prefill_batch_size=2),
                [claimed(i, s, **sampling) for i, s in enumerate(SCHEMAS)])
    free = run_engine(Engine(model, tok, batch_size=3, prefill_batch_size=2),
               [claimed(i, **sampling) for i in range(len(SCHEMAS))])
    for i, schema in enumerate(SCHEMAS):
        r = mixed[i]
        if schema is None:
            assert r.response == free[i].response, i  # a neighbour's grammar is not its own
            continue
        # A random model, held to the grammar, ends its object well within 40 tokens.
        assert r.finish_reason == "stop", (i, r.response)
        jsonschema.validate(json.loads(r.response), schema)


def test_json_object_and_a_cut_answer(tiny):
    model, tok = tiny
    spec = response_format.from_openai({"type": "json_object"}, "response_format")
    results = run_engine(Engine(model, tok, batch_size=2),
                  [Claimed(0, "job", 0, "completion", PROMPTS[0],
                           {"max_tokens": 40, "response_format": spec}, None),
                   claimed(1, ITEMS, max_tokens=3)])
    assert isinstance(json.loads(results[0].response), dict)
    cut = results[1]  # three tokens cannot close the object: "length", and not valid JSON
    assert cut.finish_reason == "length" and '{"items'.startswith(cut.response)
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.response)


def test_logprobs_of_a_constrained_answer_are_the_models(tiny):
    model, tok = tiny
    r = run_engine(Engine(model, tok, batch_size=2), [claimed(0, LABEL, logprobs=2)])[0]
    jsonschema.validate(json.loads(r.response), LABEL)
    text = b"".join(bytes(e["bytes"]) for e in r.logprobs).decode()
    assert text == r.response
    # The model's own distribution: the grammar's token need not be the model's best.
    assert all(e["logprob"] <= e["top_logprobs"][0]["logprob"] for e in r.logprobs)
