"""Tests for nightshift.jobs.formats: the accepted line shapes, every error with its line,
and properties."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tracemalloc

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nightshift.jobs.formats import (
    MAX_TOKENS_LIMIT,
    SEED_LIMIT,
    LineError,
    OversizedLine,
    ParamError,
    Params,
    RequestSpec,
    iter_lines,
    iter_requests,
    parse_line,
    validate_params,
)

SOURCE = "batch.jsonl"


def read(data: bytes | str, **kwargs) -> list[RequestSpec | LineError]:
    if isinstance(data, str):
        data = data.encode()
    return list(iter_requests(io.BytesIO(data), SOURCE, **kwargs))


def one(line: dict | bytes | str, **kwargs) -> RequestSpec:
    if isinstance(line, dict):
        line = orjson.dumps(line)
    if isinstance(line, str):
        line = line.encode()
    return parse_line(line, 1, SOURCE, **kwargs)


def error_of(line: dict | bytes | str, **kwargs) -> str:
    with pytest.raises(LineError) as info:
        one(line, **kwargs)
    return info.value.reason


# --- accepted shapes -----------------------------------------------------------------------


def test_prompt_line_is_a_user_chat_turn():
    spec = one({"prompt": "What is 2+2?"})
    assert spec == RequestSpec(
        line_no=1, custom_id=None, kind="chat",
        messages=[{"role": "user", "content": "What is 2+2?"}], prompt=None,
        params=Params(), metadata=None, model=None,
    )


def test_raw_prompt_is_a_completion():
    spec = one({"prompt": "Once upon a time", "raw": True})
    assert (spec.kind, spec.prompt, spec.messages) == ("completion", "Once upon a time", None)


def test_raw_default_and_its_override():
    assert one({"prompt": "x"}, raw_default=True).kind == "completion"
    assert one({"prompt": "x", "raw": False}, raw_default=True).kind == "chat"
    assert one({"prompt": "x", "raw": None}, raw_default=True).kind == "completion"
    # raw_default does not turn a chat into a completion
    assert one({"messages": [{"role": "user", "content": "x"}]}, raw_default=True).kind == "chat"


def test_plain_line_with_every_optional_field():
    spec = one({
        "custom_id": "q-1", "prompt": "hi", "metadata": {"topic": "math", "n": [1]},
        "max_tokens": 64, "temperature": 1, "top_p": 0.9, "seed": 7, "stop": "\n\n",
    })
    assert spec.custom_id == "q-1"
    assert spec.metadata == {"topic": "math", "n": [1]}
    assert spec.params == Params(max_tokens=64, temperature=1.0, top_p=0.9, seed=7, stop=("\n\n",))
    assert isinstance(spec.params.temperature, float)


def test_null_optional_fields_are_not_given():
    spec = one({"prompt": "hi", "custom_id": None, "metadata": None, "temperature": None,
                "stop": None})
    assert (spec.custom_id, spec.metadata, spec.params) == (None, None, Params())


def test_messages_line_normalises_roles_and_parts():
    spec = one({"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be "},
                                          {"type": "text", "text": "brief."}]},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": ""},
        {"role": "system", "content": "extra"},
    ]})
    assert spec.kind == "chat"
    assert spec.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": ""},
        {"role": "system", "content": "extra"},
    ]


# As the OpenAI Batch API guide writes them.
OPENAI_CHAT = (
    '{"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": '
    '{"model": "gpt-3.5-turbo-0125", "messages": [{"role": "system", "content": "You are a '
    'helpful assistant."},{"role": "user", "content": "Hello world!"}],"max_tokens": 1000}}'
)
OPENAI_COMPLETION = (
    '{"custom_id": "request-2", "method": "POST", "url": "/v1/completions", "body": '
    '{"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test", "max_tokens": 7, '
    '"temperature": 0}}'
)


def test_openai_batch_chat_line():
    spec = one(OPENAI_CHAT)
    assert spec == RequestSpec(
        line_no=1, custom_id="request-1", kind="chat",
        messages=[{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Hello world!"}],
        prompt=None, params=Params(max_tokens=1000), metadata=None, model="gpt-3.5-turbo-0125",
    )


def test_openai_batch_completion_line():
    spec = one(OPENAI_COMPLETION)
    assert (spec.kind, spec.prompt, spec.messages) == ("completion", "Say this is a test", None)
    assert spec.params == Params(max_tokens=7, temperature=0.0)
    assert spec.model == "gpt-3.5-turbo-instruct"


def test_openai_body_settings_and_noop_fields():
    spec = one({
        "custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
        "body": {
            "messages": [{"role": "user", "content": "x"}],
            "max_completion_tokens": 50, "temperature": 0.5, "top_p": 1, "seed": 0,
            "stop": ["END", "\n"], "n": 1, "stream": False, "logprobs": None,
            "presence_penalty": 0, "frequency_penalty": 0.0, "user": "u-1",
            "response_format": {"type": "text"}, "metadata": {"k": "v"},
        },
    })
    assert spec.params == Params(max_tokens=50, temperature=0.5, top_p=1.0, seed=0,
                                 stop=("END", "\n"), n=1)
    assert spec.metadata == {"k": "v"}
    assert spec.model is None


@pytest.mark.parametrize("line, expected", [
    ({"prompt": "x", "logprobs": True}, 0),
    ({"prompt": "x", "logprobs": True, "top_logprobs": 20}, 20),
    ({"prompt": "x", "logprobs": False}, None),
    ({"url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}],
                                              "logprobs": True, "top_logprobs": 3}}, 3),
    ({"url": "/v1/completions", "body": {"prompt": "x", "logprobs": 2}}, 2),
    ({"url": "/v1/completions", "body": {"prompt": "x", "logprobs": 0}}, 0),
], ids=["plain", "plain-top", "plain-false", "chat", "completions", "completions-0"])
def test_logprobs_as_each_shape_asks(line, expected):
    """Chat asks with logprobs: true and top_logprobs (OpenAI's chat API), completions with a
    count in logprobs (its legacy API); both become one setting: the alternatives wanted."""
    assert one(line).params.logprobs == expected


SCHEMA = {"type": "object", "properties": {"label": {"enum": ["spam", "ham"]}},
          "required": ["label"], "additionalProperties": False}


@pytest.mark.parametrize("line", [
    {"prompt": "x", "response_format": {"type": "json_schema",
                                        "json_schema": {"name": "label", "schema": SCHEMA}}},
    {"url": "/v1/chat/completions", "body": {
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "label", "strict": True, "schema": SCHEMA}}}},
], ids=["plain", "chat"])
def test_a_schema_is_kept_as_a_canonical_spec(line):
    spec = one(line).params.response_format
    assert json.loads(spec) == {"type": "json_schema", "schema": SCHEMA}


def test_json_object_and_text():
    assert one({"prompt": "x", "response_format": {"type": "json_object"}}).params == Params(
        response_format='{"type":"json_object"}')
    assert one({"prompt": "x", "response_format": {"type": "text"}}).params == Params()


def test_openai_top_level_metadata_wins_over_body_metadata():
    spec = one({"url": "/v1/completions", "metadata": {"a": 1},
                "body": {"prompt": "x", "metadata": {"b": 2}}})
    assert spec.metadata == {"a": 1}


def test_openai_line_without_method_is_post():
    assert one({"url": "/v1/completions", "body": {"prompt": "x"}}).kind == "completion"


def test_crlf_bom_and_blank_lines():
    data = b'\xef\xbb\xbf{"prompt": "a"}\r\n\r\n   \n\t\n{"prompt": "b"}\r\n{"prompt": "c"}'
    specs = read(data)
    assert [(s.line_no, s.messages[0]["content"]) for s in specs] == [(1, "a"), (5, "b"), (6, "c")]


# --- errors, each with its line number -----------------------------------------------------


BAD_LINES = [
    # (line, reason - or a part of it)
    ('{"prompt": "x"', "not valid JSON: unexpected end of data at column 15"),
    ("{'prompt': 'x'}", "not valid JSON: "),
    ('{"prompt": "x"} trailing', "not valid JSON: unexpected content after document"),
    ('{"prompt": NaN}', "not valid JSON"),
    ('{"prompt": "x", "temperature": Infinity}', "not valid JSON"),
    ('{"prompt": "x", "temperature": 1e400}', "not valid JSON: number too large"),
    (b'{"prompt": "caf\xe9"}', "not valid UTF-8 at byte 16"),
    (b'{"prompt": "\xed\xa0\x80"}', "not valid UTF-8 at byte 13"),
    (b'\xef\xbb\xbf{"prompt": "x"}', "BOM"),  # only line 1 may open with a BOM
    ("[" * 3000 + "]" * 3000, "not valid JSON: nested too deeply"),
    ('{"prompt": ' + "[" * 100_000, "not valid JSON: nested too deeply"),
    ('["prompt"]', "expected a JSON object, got array"),
    ('"prompt"', "expected a JSON object, got string"),
    ("null", "expected a JSON object, got null"),
    ("{}", "unknown line shape: expected \"prompt\", \"messages\" or an OpenAI batch request"),
    ('{"text": "x", "id": 1}', "fields found: text, id"),
    ('{"prompt": ""}', "empty prompt: prompt is blank"),
    ('{"prompt": " \\n\\t "}', "empty prompt: prompt is blank"),
    ('{"prompt": 5}', "prompt must be a string, got integer"),
    ('{"prompt": null}', "prompt must be a string, got null"),
    ('{"prompt": "x", "messages": []}', 'give "prompt" or "messages", not both'),
    ('{"prompt": "x", "model": "m"}', "unknown field 'model' (accepted: prompt, messages, "
     "custom_id, metadata, raw, max_tokens, temperature, top_p, seed, stop, n, logprobs, "
     "top_logprobs, response_format)"),
    ('{"prompt": "x", "logprobs": 3}', "logprobs must be true or false, got 3 (the number of "
     "alternatives goes in top_logprobs)"),
    ('{"prompt": "x", "top_logprobs": 3}', "top_logprobs needs logprobs: true"),
    ('{"prompt": "x", "logprobs": true, "top_logprobs": 21}',
     "top_logprobs must be an integer from 0 to 20, got 21"),
    ('{"prompt": "x", "raw": "yes"}', "raw must be true or false, got string"),
    ('{"messages": [{"role": "user", "content": "x"}], "raw": true}', '"raw": true applies to'),
    ('{"prompt": "x", "custom_id": ""}', "custom_id must not be empty"),
    ('{"prompt": "x", "custom_id": 12}', 'custom_id must be a string (write "12", not 12)'),
    ('{"prompt": "x", "custom_id": "' + "c" * 257 + '"}', "custom_id is 257 characters long"),
    ('{"prompt": "x", "metadata": [1]}', "metadata must be an object, got array"),
    ('{"prompt": "x", "max_tokens": 0}', "max_tokens must be an integer from 1 to 131072, got 0"),
    ('{"prompt": "x", "max_tokens": 131073}', "max_tokens must be an integer from 1 to 131072"),
    ('{"prompt": "x", "max_tokens": 10.0}', "max_tokens must be an integer from 1 to 131072"),
    ('{"prompt": "x", "max_tokens": true}', "max_tokens must be an integer from 1 to 131072, "
     "got true"),
    ('{"prompt": "x", "max_tokens": "10"}', 'got "10"'),
    ('{"prompt": "x", "temperature": 2.5}', "temperature must be a number from 0 to 2, got 2.5"),
    ('{"prompt": "x", "temperature": -0.1}', "temperature must be a number from 0 to 2"),
    ('{"prompt": "x", "temperature": false}', "temperature must be a number from 0 to 2"),
    ('{"prompt": "x", "top_p": 0}', "top_p must be a number greater than 0 and at most 1, got 0"),
    ('{"prompt": "x", "top_p": 1.01}', "top_p must be a number greater than 0 and at most 1"),
    ('{"prompt": "x", "seed": -1}', "seed must be an integer from 0 to 9223372036854775807"),
    ('{"prompt": "x", "seed": 9223372036854775808}', "seed must be an integer from 0 to"),
    ('{"prompt": "x", "seed": 1.5}', "seed must be an integer"),
    ('{"prompt": "x", "stop": ""}', "stop must hold non-empty strings"),
    ('{"prompt": "x", "stop": ["a", 1]}', "stop must hold non-empty strings, got 1"),
    ('{"prompt": "x", "stop": 3}', "stop must be a string or an array of strings, got integer"),
    ('{"prompt": "x", "stop": [' + ",".join(['"s"'] * 17) + "]}",
     "stop must hold at most 16 strings, got 17"),
    ('{"messages": []}', "empty prompt: messages is an empty array"),
    ('{"messages": "hi"}', "messages must be an array of messages, got string"),
    ('{"messages": ["hi"]}', "messages[0] must be an object, got string"),
    ('{"messages": [{"role": "user", "content": " "}]}', "empty prompt: every content in "
     "messages is blank"),
    ('{"messages": [{"role": "tool", "content": "x"}]}',
     'messages[0].role must be one of system, user, assistant, developer; got "tool"'),
    ('{"messages": [{"content": "x"}]}', "messages[0] has no role"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "user"}]}',
     "messages[1] has no content"),
    ('{"messages": [{"role": "user", "content": null}]}',
     "messages[0].content must be a string or an array of text parts, got null"),
    ('{"messages": [{"role": "user", "content": "x", "name": "bob"}]}',
     "messages[0].name is not supported"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
     'messages[0].content[0] has type "image_url"; only text parts are supported'),
    ('{"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}',
     "messages[0].content[0].text must be a string, got integer"),
    # OpenAI batch lines
    ('{"url": "/v1/embeddings", "body": {"input": "x"}}',
     'unsupported url "/v1/embeddings" (use /v1/chat/completions or /v1/completions)'),
    ('{"method": "POST", "body": {"prompt": "x"}}', "missing url (use /v1/chat/completions"),
    ('{"method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}}',
     'method must be "POST", got "GET"'),
    ('{"url": "/v1/completions"}', "missing body"),
    ('{"url": "/v1/completions", "body": "x"}', "body must be an object, got string"),
    ('{"url": "/v1/completions", "body": {"prompt": "x"}, "temperature": 1}',
     "unknown field 'temperature' in an OpenAI batch line (accepted: custom_id, method, url, "
     "body, metadata; settings go in body)"),
    ('{"url": "/v1/chat/completions", "body": {"model": "m"}}', "missing body.messages"),
    ('{"url": "/v1/completions", "body": {}}', "missing body.prompt"),
    ('{"url": "/v1/chat/completions", "body": {"prompt": "x"}}',
     "body.prompt belongs to /v1/completions"),
    ('{"url": "/v1/completions", "body": {"messages": []}}',
     "body.messages belongs to /v1/chat/completions"),
    ('{"url": "/v1/completions", "body": {"prompt": ["a", "b"]}}',
     "body.prompt must be a string (lists of prompts"),
    ('{"url": "/v1/completions", "body": {"prompt": ""}}', "empty prompt: body.prompt is blank"),
    ('{"url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}], '
     '"tools": []}}', "body.tools is not supported by nightshift"),
    ('{"url": "/v1/completions", "body": {"prompt": "x", "n": 0}}',
     "body.n must be an integer from 1 to 32, got 0"),
    ('{"prompt": "x", "n": 33}', "n must be an integer from 1 to 32, got 33"),
    ('{"url": "/v1/completions", "body": {"prompt": "x", "stream": true}}', "body.stream = true"),
    ('{"url": "/v1/completions", "body": {"prompt": "x", "logprobs": true}}',
     "body.logprobs must be an integer from 0 to 20, got true"),
    ('{"url": "/v1/completions", "body": {"prompt": "x", "top_logprobs": 2}}',
     "body.top_logprobs belongs to /v1/chat/completions"),
    ('{"url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}], '
     '"logprobs": 2}}', "body.logprobs must be true or false"),
    ('{"url": "/v1/completions", "body": {"prompt": "x", "presence_penalty": 0.5}}',
     "body.presence_penalty = 0.5 is not supported by nightshift (only 0 is accepted)"),
    ('{"url": "/v1/completions", "body": {"prompt": "x", "frequency_penalty": false}}',
     "body.frequency_penalty = false"),
    ('{"url": "/v1/completions", "body": {"prompt": "x", "user": 1}}', "body.user = 1"),
    ('{"url": "/v1/completions", "body": {"prompt": "x", "response_format": '
     '{"type": "json"}}}', 'body.response_format.type must be "text", "json_object" or '
     '"json_schema", got "json"'),
    ('{"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "a", '
     '"schema": {"type": "strin"}}}}',
     "response_format.json_schema.schema cannot be followed: Invalid type: strin"),
    ('{"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "a", '
     '"schema": {"type": "string", "pattern": "(?<=a)b"}}}}', "look-around"),
    ('{"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}',
     "response_format.json_schema.name must be 1 to 64 letters"),
    ('{"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}',
     "response_format.json_schema.schema is missing"),
    ('{"url": "/v1/completions", "body": {"prompt": "x", "temperature": 3}}',
     "body.temperature must be a number from 0 to 2, got 3"),
    ('{"url": "/v1/completions", "body": {"prompt": "x", "max_completion_tokens": 0}}',
     "body.max_completion_tokens must be an integer from 1 to 131072"),
    ('{"url": "/v1/completions", "body": {"prompt": "x", "max_tokens": 5, '
     '"max_completion_tokens": 5}}', "give body.max_tokens or body.max_completion_tokens"),
    ('{"url": "/v1/completions", "body": {"prompt": "x", "model": 4}}',
     "body.model must be a string, got integer"),
    ('{"url": "/v1/completions", "body": {"prompt": "x", "metadata": 1}}',
     "body.metadata must be an object, got integer"),
    ('{"custom_id": 1, "url": "/v1/completions", "body": {"prompt": "x"}}',
     "custom_id must be a string"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES)
def test_bad_line_is_reported_with_its_line_number(line, reason):
    if isinstance(line, str):
        line = line.encode()
    data = b'{"prompt": "ok"}\n\n' + line + b'\n{"prompt": "after"}\n'
    items = read(data)
    assert [type(i) for i in items] == [RequestSpec, LineError, RequestSpec]
    error = items[1]
    assert error.line_no == 3 and error.source == SOURCE
    assert reason in error.reason
    assert str(error) == f"{SOURCE}:3: {error.reason}"
    assert items[2].line_no == 4


def test_parse_line_raises_line_error():
    with pytest.raises(LineError) as info:
        parse_line(b"[]", 42, "f.jsonl")
    assert str(info.value) == "f.jsonl:42: expected a JSON object, got array"
    assert (info.value.source, info.value.line_no) == ("f.jsonl", 42)


def test_duplicate_custom_id():
    items = read(
        '{"custom_id": "a", "prompt": "1"}\n'
        '{"custom_id": "b", "prompt": "2"}\n'
        "\n"
        '{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "3"}}\n'
        '{"prompt": "4"}\n{"prompt": "5"}\n'
    )
    assert [i.line_no for i in items] == [1, 2, 4, 5, 6]
    assert isinstance(items[2], LineError)
    assert str(items[2]) == f"{SOURCE}:4: duplicate custom_id 'a' (first on line 1)"


def test_a_bad_line_does_not_claim_its_custom_id():
    items = read('{"custom_id": "a", "prompt": ""}\n{"custom_id": "a", "prompt": "x"}\n')
    assert isinstance(items[0], LineError) and isinstance(items[1], RequestSpec)


def test_line_numbers_across_a_mixed_file():
    data = "\n".join([
        '{"prompt": "a"}', "", "not json", '{"prompt": "b"}', "  ", "[1]", OPENAI_CHAT,
        '{"prompt": "c", "top_p": 2}', OPENAI_COMPLETION,
    ])
    got = [(i.line_no, type(i).__name__) for i in read(data)]
    assert got == [(1, "RequestSpec"), (3, "LineError"), (4, "RequestSpec"), (6, "LineError"),
                   (7, "RequestSpec"), (8, "LineError"), (9, "RequestSpec")]


# --- iter_lines and big input --------------------------------------------------------------


def test_iter_lines_endings_and_bom():
    data = b'\xef\xbb\xbfa\r\nb\n\nc\r\n\xef\xbb\xbfd'
    assert list(iter_lines(io.BytesIO(data))) == [
        (1, b"a"), (2, b"b"), (3, b""), (4, b"c"), (5, b"\xef\xbb\xbfd")
    ]


def test_iter_lines_from_a_real_file(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}\n')
    with open(path, "rb", buffering=0) as raw_file:  # unbuffered: wrapped, not read bytewise
        assert [n for n, _ in iter_lines(raw_file)] == [1, 2]


def test_oversized_line_is_skipped_and_reported():
    long_line = b'{"prompt": "' + b"x" * 5000 + b'"}'
    data = b'{"prompt": "a"}\n' + long_line + b'\n{"prompt": "b"}\n'
    items = list(iter_requests(io.BytesIO(data), SOURCE, max_line_bytes=1000))
    assert [type(i) for i in items] == [RequestSpec, LineError, RequestSpec]
    assert items[1].line_no == 2
    assert items[1].reason == f"line is {len(long_line) + 1} bytes long; at most 1000 are allowed"
    assert items[2].line_no == 3


def test_line_at_the_limit_is_accepted():
    line = b'{"prompt": "' + b"x" * 86 + b'"}'
    assert len(line) == 100
    for ending in (b"\n", b"\r\n", b""):
        lines = list(iter_lines(io.BytesIO(line + ending), max_line_bytes=100))
        assert lines == [(1, line)] and type(lines[0][1]) is bytes
    lines = list(iter_lines(io.BytesIO(line + b" \n"), max_line_bytes=100))
    assert type(lines[0][1]) is OversizedLine


def test_fifty_megabyte_line_parses():
    prompt = "word " * 10_000_000
    data = orjson.dumps({"prompt": prompt}) + b"\n" + b'{"prompt": "next"}\n'
    items = read(data)
    assert [type(i) for i in items] == [RequestSpec, RequestSpec]
    assert items[0].messages[0]["content"] == prompt


def test_fifty_megabyte_nesting_fails_cleanly():
    items = read(b"[" * 50_000_000 + b"\n" + b'{"prompt": "next"}')
    assert isinstance(items[0], LineError) and "nested too deeply" in items[0].reason
    assert isinstance(items[1], RequestSpec)


def test_memory_does_not_grow_with_the_file():
    def peak(lines: int) -> int:
        data = b'{"prompt": "short question"}\n' * lines
        stream = io.BytesIO(data)
        tracemalloc.start()
        try:
            for _ in iter_requests(stream, SOURCE):
                pass
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(2_000), peak(100_000)
    assert large < 200_000 and large < small * 2 + 50_000


def test_formats_does_not_import_mlx():
    code = ("import sys, nightshift.jobs.formats; "
            "assert not [m for m in sys.modules if m.startswith('mlx')]")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- Params --------------------------------------------------------------------------------


def test_merged_over_lets_given_fields_win():
    base = Params(max_tokens=256, temperature=0.0, top_p=1.0, seed=1, stop=("a",))
    line = Params(temperature=0.7, stop=())
    assert line.merged_over(base) == Params(max_tokens=256, temperature=0.7, top_p=1.0, seed=1,
                                            stop=())
    assert Params().merged_over(base) == base
    assert base.merged_over(Params()) == base
    assert Params(seed=0).merged_over(Params(seed=5)).seed == 0  # 0 is given, not "unset"


def test_params_json_round_trip():
    p = Params(max_tokens=5, top_p=0.5, stop=("x", "y"))
    assert p.to_json() == {"max_tokens": 5, "top_p": 0.5, "stop": ["x", "y"]}
    assert Params.from_json(p.to_json()) == p
    assert Params().to_json() == {}
    assert Params.from_json({}) == Params()


def test_validate_params():
    validate_params(Params(max_tokens=MAX_TOKENS_LIMIT, temperature=2, top_p=1, seed=SEED_LIMIT,
                           stop=("a",)), "job defaults")
    validate_params(Params(), "job defaults")
    with pytest.raises(ParamError, match=r"^--temperature: temperature must be a number from 0 "
                                         r"to 2, got 3$"):
        validate_params(Params(temperature=3), "--temperature")
    with pytest.raises(ValueError, match="top_p must be a number greater than 0"):
        validate_params(Params(top_p=float("nan")), "defaults")
    with pytest.raises(ValueError, match="seed must be an integer"):
        validate_params(Params(seed=10**400), "defaults")
    with pytest.raises(ValueError, match="stop must hold non-empty strings"):
        validate_params(Params(stop=("",)), "defaults")
    with pytest.raises(ValueError, match="max_tokens"):
        validate_params(Params(max_tokens=True), "defaults")


def test_line_error_pickles():
    import pickle

    error = pickle.loads(pickle.dumps(LineError("f", 3, "why")))
    assert (str(error), error.line_no) == ("f:3: why", 3)


# --- properties ----------------------------------------------------------------------------


def assert_only_items(data: bytes, **kwargs) -> list:
    items = list(iter_requests(io.BytesIO(data), SOURCE, **kwargs))
    for item in items:
        assert type(item) in (RequestSpec, LineError)
        if isinstance(item, LineError):
            assert str(item).startswith(f"{SOURCE}:{item.line_no}: ") and item.reason
    return items


@given(st.binary(max_size=2000), st.booleans())
def test_arbitrary_bytes_never_raise(data, raw_default):
    assert_only_items(data, raw_default=raw_default)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=30,
)
keys = st.sampled_from([
    "prompt", "messages", "custom_id", "metadata", "raw", "max_tokens", "temperature", "top_p",
    "seed", "stop", "method", "url", "body", "model", "role", "content", "type", "text", "n",
    "stream", "max_completion_tokens",
]) | st.text(max_size=8)
shaped_values = st.recursive(
    json_values | st.sampled_from(["/v1/chat/completions", "/v1/completions", "POST", "user",
                                   "developer", "text"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=40,
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(json_values | shaped_values, max_size=5))
def test_arbitrary_json_values_never_raise(values):
    assert_only_items(b"\n".join(orjson.dumps(v) for v in values))


text = st.text(max_size=30)
prompt_text = st.text(min_size=1, max_size=40).filter(lambda s: not s.isspace())
custom_ids = st.none() | st.text(min_size=1, max_size=256)
metadata = st.none() | st.dictionaries(st.text(max_size=5), json_values, max_size=3)
params = st.builds(
    Params,
    max_tokens=st.none() | st.integers(1, MAX_TOKENS_LIMIT),
    temperature=st.none() | st.floats(0, 2),
    top_p=st.none() | st.floats(0, 1, exclude_min=True),
    seed=st.none() | st.integers(0, SEED_LIMIT),
    stop=st.none() | st.lists(st.text(min_size=1, max_size=5), max_size=16).map(tuple),
)
roles = st.sampled_from(["system", "user", "assistant", "developer"])
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": text}), min_size=1,
                    max_size=4).filter(
    lambda ms: any(m["content"] and not m["content"].isspace() for m in ms))


@st.composite
def valid_lines(draw) -> tuple[dict, RequestSpec]:
    """A valid line of any shape, and the spec it must parse to."""
    custom_id, meta, p = draw(custom_ids), draw(metadata), draw(params)
    shape = draw(st.sampled_from(["prompt", "raw", "messages", "batch-chat", "batch-completion"]))
    spec = RequestSpec(0, custom_id, "chat", None, None, p, meta, None)
    if shape.startswith("batch"):
        body = p.to_json()
        line = {"custom_id": custom_id, "method": "POST", "body": body}
        spec.model = body["model"] = draw(st.none() | text)
        if meta is not None:
            body["metadata"] = meta
        if shape == "batch-chat":
            line["url"] = "/v1/chat/completions"
            body["messages"] = draw(messages)
        else:
            line["url"] = "/v1/completions"
            body["prompt"] = draw(prompt_text)
            spec.kind, spec.prompt = "completion", body["prompt"]
    else:
        line = {"custom_id": custom_id, "metadata": meta, **p.to_json()}
        if shape == "messages":
            line["messages"] = draw(messages)
        else:
            line["prompt"] = draw(prompt_text)
            if shape == "raw":
                line["raw"] = True
                spec.kind, spec.prompt = "completion", line["prompt"]
            else:
                spec.messages = [{"role": "user", "content": line["prompt"]}]
    if "messages" in line or "messages" in line.get("body", {}):
        given_messages = line.get("messages") or line["body"]["messages"]
        spec.messages = [
            {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
            for m in given_messages
        ]
    return line, spec


@given(st.lists(valid_lines(), max_size=8), st.sampled_from([b"\n", b"\r\n"]))
def test_valid_requests_round_trip(lines, ending):
    data = ending.join(orjson.dumps(line) for line, _ in lines)
    items = assert_only_items(data)
    seen: set[str] = set()
    for number, ((_, spec), item) in enumerate(zip(lines, items), start=1):
        spec.line_no = number
        if spec.custom_id is not None and spec.custom_id in seen:
            assert isinstance(item, LineError) and "duplicate custom_id" in item.reason
            continue
        if spec.custom_id is not None:
            seen.add(spec.custom_id)
        assert item == spec
    assert len(items) == len(lines)


@st.composite
def mutated_lines(draw) -> bytes:
    line = orjson.dumps(draw(valid_lines())[0])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(line) - 1, 0)))
        byte = bytes([draw(st.integers(0, 255))])
        if kind == "flip":
            line = line[:at] + byte + line[at + 1:]
        elif kind == "insert":
            line = line[:at] + byte + line[at:]
        elif kind == "delete":
            line = line[:at] + line[at + 1:]
        else:
            line = line[:at]
    return line


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutated_lines(), min_size=1, max_size=5), st.booleans())
def test_mutated_valid_lines_never_raise(lines, raw_default):
    assert_only_items(b"\n".join(lines), raw_default=raw_default)
