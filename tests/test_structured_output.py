"""Structured output end to end on the default model (issue 11): a job of extraction
prompts, half held to a schema by their own lines and half by `submit --schema`, mixed
with plain and log-probability lines, through a real worker; every constrained answer
parses and validates. A schema the library cannot follow is refused at submit."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.workers import run_worker

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "age": {"type": "integer", "minimum": 0, "maximum": 130},
                         "city": {"type": "string", "maxLength": 40}}}
SENTIMENT = {"type": "object", "additionalProperties": False, "required": ["sentiment"],
             "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                            "confidence": {"type": "number", "minimum": 0, "maximum": 1}}}
PEOPLE = [("Maria", 34, "Lyon"), ("Kenji", 51, "Osaka"), ("Amara", 27, "Lagos"),
          ("Tomasz", 63, "Krakow"), ("Lucia", 19, "Valencia"), ("Omar", 45, "Cairo"),
          ("Ingrid", 38, "Bergen"), ("Ravi", 29, "Pune"), ("Chloe", 72, "Quebec"),
          ("Diego", 41, "Lima"), ("Hana", 23, "Brno"), ("Samuel", 56, "Accra"),
          ("Yuki", 31, "Sapporo")]
REVIEWS = ["The soup was cold and the waiter ignored us.", "Best concert I have seen in years!",
           "The train arrived on time.", "I regret buying this phone.",
           "What a lovely, quiet hotel.", "The package came with a broken lid.",
           "It is a chair. It has four legs.", "Absolutely delightful service, thank you!",
           "The film was far too long and dull.", "Our guide was friendly and funny.",
           "The store opens at nine.", "Terrible battery life, avoid.",
           "The garden looks wonderful in spring."]


def person_prompt(name, age, city, style):
    return [f"{name} is {age} years old and lives in {city}. Extract the person as JSON.",
            f"Extract name, age and city as JSON: {name}, aged {age}, from {city}.",
            f"Meet {name} from {city}; {name} turned {age} this year. Give name, age and city."
            ][style]


@pytest.mark.slow
def test_every_constrained_answer_validates(invoke, smollm2, tmp_path):
    per_line, job_wide = [], []
    schema_rf = {"type": "json_schema", "json_schema": {"name": "person", "strict": True,
                                                        "schema": PERSON}}
    for i, (name, age, city) in enumerate(PEOPLE * 2):
        per_line.append({"custom_id": f"p{i}", "prompt": person_prompt(name, age, city, i % 3),
                         "response_format": schema_rf})
    for i, review in enumerate(REVIEWS * 2):
        per_line.append({"custom_id": f"s{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"messages": [{"role": "user", "content":
                                                f"Classify the sentiment: {review}"}],
                                  "response_format": {"type": "json_schema", "json_schema": {
                                      "name": "sentiment", "schema": SENTIMENT}}}})
    # Unconstrained neighbours in the same batch: plain, and with log-probabilities.
    per_line += [{"custom_id": "plain", "prompt": "What is the capital of France?"},
                 {"custom_id": "lp", "prompt": "Say hello.", "logprobs": True, "top_logprobs": 1},
                 {"custom_id": "obj", "prompt": "Describe a cat as a JSON object.",
                  "response_format": {"type": "json_object"}, "max_tokens": 200}]
    for name, age, city in PEOPLE:
        job_wide.append({"prompt": person_prompt(name, age, city, 0)})
    lines = tmp_path / "lines.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in per_line))
    wide = tmp_path / "wide.jsonl"
    wide.write_text("".join(json.dumps(r) + "\n" for r in job_wide))
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(PERSON))
    a = json.loads(invoke("submit", lines, "--json", "--max-tokens", "96").output)["id"]
    b = json.loads(invoke("submit", wide, "--json", "--max-tokens", "96",
                          "--schema", schema_file).output)["id"]

    ran = run_worker("--drain", log_path=tmp_path / "worker.log")
    assert ran.returncode == 0, ran.stderr

    constrained = 0
    for job in (a, b):
        for line in invoke("export", job).output.splitlines():
            record = json.loads(line)
            cid = record["custom_id"]
            choice = record["response"]["body"]["choices"][0]
            text = choice["message"]["content"]
            if cid in ("plain", "lp"):
                assert choice["finish_reason"] in ("stop", "length")
                assert (choice["logprobs"] is not None) == (cid == "lp")
                continue
            assert choice["finish_reason"] == "stop", (cid, text)
            answer = json.loads(text)
            if cid == "obj":
                assert isinstance(answer, dict)
                continue
            jsonschema.validate(answer, SENTIMENT if cid and cid[0] == "s" else PERSON)
            constrained += 1
    assert constrained >= 50


def test_a_schema_the_library_cannot_follow_is_refused_at_submit(invoke, tmp_path):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"code": {"type": "string", "pattern": "(?=a)b"}}}}}
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "ok"}) + "\n"
                 + json.dumps({"prompt": "x", "response_format": bad}) + "\n")
    result = invoke("submit", f, expect=1)
    assert f"{f}:2: response_format.json_schema.schema cannot be followed" in result.output
    assert "nothing was queued" in result.output
    schema = tmp_path / "bad.json"
    schema.write_text(json.dumps({"type": "strin"}))
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "ok"}) + "\n")
    result = invoke("submit", plain, "--schema", schema, expect=2)
    assert "cannot be followed: Invalid type: strin" in result.output


@pytest.mark.slow
def test_a_mixed_job_on_tiny_models_through_the_worker(invoke, tiny_model, home, tmp_path):
    """Issue 11's mixed job through a real worker: schemas, plain lines, log-probabilities
    and n=3 on a tiny model, and the same lines on a tiny reasoning model, whose template
    opens a thinking section (a random model never closes it: all is reasoning)."""
    from tests.tiny_models import build_tiny_llama

    build_tiny_llama(home / "models" / "tiny-think", thinking=True)
    score = {"type": "integer", "minimum": 0, "maximum": 9}
    label = {"type": "object", "properties": {"label": {"enum": ["spam", "ham"]}, "score": score},
             "required": ["label", "score"], "additionalProperties": False}
    schema = {"type": "json_schema", "json_schema": {"name": "label", "schema": label}}
    rows = [{"custom_id": "schema", "prompt": "Label this.", "response_format": schema},
            {"custom_id": "plain", "prompt": "Hello"},
            {"custom_id": "lp", "prompt": "Hello", "logprobs": True, "top_logprobs": 2},
            {"custom_id": "n3", "prompt": "Hello", "n": 3, "temperature": 1.0, "seed": 1},
            {"custom_id": "all", "prompt": "Label this.", "response_format": schema, "n": 2,
             "logprobs": True, "temperature": 0.7, "seed": 2}]
    f = tmp_path / "mixed.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    jobs = {m: json.loads(invoke("submit", f, "--json", "--model", m, "--max-tokens", "40")
                          .output)["id"] for m in (tiny_model, "tiny-think")}
    ran = run_worker("--drain", log_path=tmp_path / "worker.log")
    assert ran.returncode == 0, ran.stderr
    for model, job in jobs.items():
        out = {r["custom_id"]: r["response"]["body"]["choices"] for r in
               map(json.loads, invoke("export", job).output.splitlines())}
        assert [len(out[c]) for c in ("schema", "plain", "lp", "n3", "all")] == [1, 1, 1, 3, 2]
        # (the reasoning model's answers are empty, and so are their log-probabilities)
        assert out["lp"][0]["logprobs"] is not None and out["plain"][0]["logprobs"] is None
        assert all(c["logprobs"] is not None for c in out["all"])
        for choice in out["schema"] + out["all"]:
            if model == tiny_model:
                jsonschema.validate(json.loads(choice["message"]["content"]), label)
            else:  # still thinking when max_tokens ran out: no answer, and said so
                assert choice["message"]["content"] == "" and choice["finish_reason"] == "length"
                assert choice["message"]["reasoning_content"]
        thinks = model != tiny_model
        assert all(("reasoning_content" in c["message"]) == thinks
                   for choices in out.values() for c in choices)
