"""Hostile input through `nightshift submit`, end to end: the command either stores the
whole file as one job or rejects it with ``FILE:LINE: reason`` messages, never a
traceback, and never stores part of a file.

tests/test_formats.py checks the parser alone; here the same attacks go through the
command line, the store and the queue."""

from __future__ import annotations

import json
import re
from collections import Counter

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nightshift.jobs.schema import jobs, requests
from nightshift.jobs.store import Store
from nightshift.jobs.vocabulary import DONE, FAILED
from sqlalchemy import func, select

from tests.test_formats import json_values, shaped_values, valid_lines

EXAMPLES = Counter()  # Hypothesis examples run, by test, for the report
HYPOTHESIS = settings(max_examples=250, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if EXAMPLES:
        print(f"\nhostile input: {sum(EXAMPLES.values())} Hypothesis examples "
              f"through submit ({dict(EXAMPLES)}), none stored part of a file")


def stored() -> tuple[int, int]:
    store = Store()
    with store.read() as conn:
        counts = (conn.execute(select(func.count()).select_from(jobs)).scalar(),
                  conn.execute(select(func.count()).select_from(requests)).scalar())
    store.close()
    return counts


def expected_requests(data: bytes) -> int:
    """Non-blank lines (a CR before the newline and a BOM opening the file dropped)."""
    lines = data.split(b"\n")
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]
    return sum(1 for line in lines if line.strip())


def submit_bytes(invoke, path, data: bytes, *args) -> tuple[str, object]:
    """Submit ``data`` from a file; check the all-or-nothing contract; returns
    ("accepted", job id) or ("rejected", the messages)."""
    before = stored()
    path.write_bytes(data)
    result = invoke("submit", path, "--model", "tiny", "-q", *args, expect=None)
    after = stored()
    source = re.escape(str(path))
    if result.exit_code == 0:
        job_id = result.stdout.strip()
        n = expected_requests(data)
        assert after == (before[0] + 1, before[1] + n)
        assert Store().job(job_id).total == n
        return "accepted", job_id
    assert result.exit_code == 1, result.output
    assert after == before, "a rejected file stored something"
    messages = result.stderr.splitlines()
    allowed = re.compile(rf"^({source}:(\d+): \S.*|{source}: no requests \(.*\)"
                         r"|unknown model '.*': .*"  # --model, not a line
                         rf"|\.\.\. and \d+ more bad lines|Error: {source}: nothing was queued.*)$")
    n_lines = data.count(b"\n") + 1
    for message in messages:
        match = allowed.match(message)
        assert match, f"not a FILE:LINE message: {message!r}"
        if match.group(2):
            assert 1 <= int(match.group(2)) <= n_lines
    assert messages[-1].startswith("Error: ")
    return "rejected", messages


# --- properties -------------------------------------------------------------------------


@HYPOTHESIS
@given(data=st.binary(max_size=3000))
def test_arbitrary_bytes(invoke, tiny_model, tmp_path, data):
    EXAMPLES["bytes"] += 1
    submit_bytes(invoke, tmp_path / "in.jsonl", data)


@HYPOTHESIS
@given(values=st.lists(json_values | shaped_values, min_size=1, max_size=6),
       ending=st.sampled_from([b"\n", b"\r\n"]))
def test_arbitrary_json(invoke, tiny_model, tmp_path, values, ending):
    EXAMPLES["json"] += 1
    submit_bytes(invoke, tmp_path / "in.jsonl", ending.join(orjson.dumps(v) for v in values))


@st.composite
def mutated_files(draw) -> bytes:
    """A valid file, then damaged anywhere: bytes flipped, inserted (newlines, CRs,
    BOMs and quotes among them), deleted, lines repeated, the end cut off."""
    lines = [orjson.dumps(line) for line, _ in draw(st.lists(valid_lines(), min_size=1,
                                                               max_size=6))]
    data = b"\n".join(lines) + b"\n"
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "repeat", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip":
            data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1:]
        elif kind == "insert":
            piece = draw(st.sampled_from([b"\n", b"\r", b"\xef\xbb\xbf", b'"', b"{", b"\xff",
                                          b"\x00", b" "]) | st.binary(min_size=1, max_size=4))
            data = data[:at] + piece + data[at:]
        elif kind == "delete":
            data = data[:at] + data[at + draw(st.integers(1, 8)):]
        elif kind == "repeat":
            line = draw(st.sampled_from(lines))
            data = data + line + b"\n"
        else:
            data = data[:at]
    return data


@HYPOTHESIS
@given(data=mutated_files())
def test_mutated_valid_files(invoke, tiny_model, tmp_path, data):
    EXAMPLES["mutated"] += 1
    submit_bytes(invoke, tmp_path / "in.jsonl", data)


@HYPOTHESIS
@given(lines=st.lists(valid_lines(), min_size=1, max_size=6))
def test_valid_files_are_stored_whole(invoke, tiny_model, tmp_path, lines):
    EXAMPLES["valid"] += 1
    for line, _ in lines:  # one job runs one model
        if isinstance(line.get("body"), dict):
            line["body"].pop("model", None)
    data = b"".join(orjson.dumps(line) + b"\n" for line, _ in lines)
    ids = [line.get("custom_id") for line, _ in lines if line.get("custom_id") is not None]
    outcome, value = submit_bytes(invoke, tmp_path / "in.jsonl", data)
    if len(ids) == len(set(ids)):
        assert outcome == "accepted", value
    else:
        assert outcome == "rejected" and any("duplicate custom_id" in m for m in value)


# --- named cases --------------------------------------------------------------------------


def rejected(invoke, tmp_path, data: bytes, *args) -> list[str]:
    outcome, messages = submit_bytes(invoke, tmp_path / "in.jsonl", data, *args)
    assert outcome == "rejected"
    return messages


def accepted(invoke, tmp_path, data: bytes, *args) -> list:
    outcome, job_id = submit_bytes(invoke, tmp_path / "in.jsonl", data, *args)
    assert outcome == "accepted"
    return list(Store().iter_requests(job_id))


def test_empty_file(invoke, tiny_model, tmp_path):
    assert "no requests (the file is empty or blank)" in rejected(invoke, tmp_path, b"")[0]


def test_blank_lines_only(invoke, tiny_model, tmp_path):
    messages = rejected(invoke, tmp_path, b"\n  \n\t\r\n\n")
    assert "no requests" in messages[0]


def test_bom(invoke, tiny_model, tmp_path):
    [row] = accepted(invoke, tmp_path, b'\xef\xbb\xbf{"prompt": "hi"}\n')
    assert json.loads(row.body) == [{"role": "user", "content": "hi"}]


def test_crlf_endings(invoke, tiny_model, tmp_path):
    rows = accepted(invoke, tmp_path, b'{"prompt": "a"}\r\n\r\n{"prompt": "b", "raw": true}\r\n')
    assert [json.loads(r.body) for r in rows] == [[{"role": "user", "content": "a"}], "b"]
    assert [r.line_no for r in rows] == [1, 3]


def test_invalid_utf8(invoke, tiny_model, tmp_path):
    messages = rejected(invoke, tmp_path, b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    assert messages[0].endswith(":2: not valid UTF-8 at byte 16")


@pytest.mark.slow
def test_a_50_mb_single_line(invoke, tiny_model, tmp_path):
    prompt = "x" * (50 * 1024 * 1024)
    [row] = accepted(invoke, tmp_path, orjson.dumps({"prompt": prompt, "raw": True}))
    assert len(json.loads(row.body)) == len(prompt)
    # The same line, broken: rejected by its line number, nothing stored.
    broken = b'{"prompt": "' + b"x" * (50 * 1024 * 1024)
    assert ":1: not valid JSON" in rejected(invoke, tmp_path, broken)[0]


def test_deeply_nested_json(invoke, tiny_model, tmp_path):
    deep = b'{"prompt": "hi", "metadata": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}\n"
    assert "nested too deeply" in rejected(invoke, tmp_path, deep)[0]
    arrays = b"[" * 100_000 + b"]" * 100_000 + b"\n"
    assert "nested too deeply" in rejected(invoke, tmp_path, arrays)[0]


def test_duplicate_custom_id(invoke, tiny_model, tmp_path):
    data = b'{"custom_id": "a", "prompt": "x"}\n{"custom_id": "a", "prompt": "y"}\n'
    message = rejected(invoke, tmp_path, data)[0]
    assert ":2: duplicate custom_id" in message and "line 1" in message


def test_unknown_fields(invoke, tiny_model, tmp_path):
    messages = rejected(invoke, tmp_path, b'{"prompt": "x", "temprature": 1}\n'
                        b'{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",'
                        b' "body": {"messages": [{"role": "user", "content": "x"}],'
                        b' "tools": []}}\n')
    assert "unknown field 'temprature'" in messages[0]
    assert "body.tools is not supported" in messages[1]


@pytest.mark.parametrize("line, reason", [
    ('{"prompt": 5}', '"prompt" must be a string'.replace('"prompt"', "prompt")),
    ('{"messages": "hi"}', "messages must be an array"),
    ('{"prompt": "x", "max_tokens": "10"}', "max_tokens must be an integer"),
    ('{"prompt": "x", "temperature": "hot"}', "temperature must be a number"),
    ('{"prompt": "x", "custom_id": 7}', "custom_id must be a string"),
    ('{"prompt": "x", "metadata": [1]}', "metadata must be an object"),
    ('{"prompt": "x", "stop": [1]}', "stop must hold non-empty strings"),
    ('[{"prompt": "x"}]', "expected a JSON object, got array"),
    ('"just a string"', "expected a JSON object, got string"),
])
def test_wrong_types(invoke, tiny_model, tmp_path, line, reason):
    message = rejected(invoke, tmp_path, b'{"prompt": "fine"}\n' + line.encode() + b"\n")[0]
    assert ":2: " in message and reason in message


@pytest.mark.parametrize("setting", [
    '"max_tokens": -1', '"max_tokens": 0', '"max_tokens": 1000000000000',
    '"max_tokens": 1e400', '"max_tokens": 3.5', '"max_tokens": true',
    '"temperature": -0.5', '"temperature": 1e308', '"temperature": 100',
    '"top_p": 0', '"seed": -3',
])
def test_negative_or_absurd_settings(invoke, tiny_model, tmp_path, setting):
    message = rejected(invoke, tmp_path, b'{"prompt": "x", %s}\n' % setting.encode())[0]
    assert ":1: " in message


@pytest.mark.parametrize("flag", [("--max-tokens", "-5"), ("--max-tokens", "99999999999"),
                                  ("--temperature", "-1"), ("--temperature", "nan"),
                                  ("--temperature", "inf"), ("--max-tokens", "ten")])
def test_absurd_settings_on_the_command_line(invoke, tiny_model, tmp_path, flag):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"prompt": "x"}\n')
    result = invoke("submit", path, "--model", "tiny", *flag, expect=None)
    assert result.exit_code in (1, 2) and "Error" in result.output, result.output
    assert stored() == (0, 0)


def test_unknown_model(invoke, tiny_model, tmp_path):
    line = b'{"prompt": "x"}\n'
    messages = rejected(invoke, tmp_path, line, "--model", "no-such-model")
    assert any("unknown model 'no-such-model'" in m for m in messages)
    path = tmp_path / "named.jsonl"
    path.write_bytes(b'{"custom_id": "a", "url": "/v1/chat/completions", "body": {"model": '
                     b'"no-such-model", "messages": [{"role": "user", "content": "x"}]}}\n')
    result = invoke("submit", path, expect=1)
    assert "unknown model 'no-such-model' named by body.model on" in result.output
    assert stored() == (0, 0)


@pytest.mark.slow
def test_a_prompt_longer_than_the_context_window_fails_alone(invoke, tiny_model, tmp_path):
    """The tiny model's window is 2048 tokens. The long request fails at run time with a
    clear error; the rest of the job runs."""
    import random

    from tests.chaos import run_cli

    rng = random.Random(0)
    long = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(20000))
    rows = [{"custom_id": "before", "prompt": "Hello", "max_tokens": 8},
            {"custom_id": "long", "prompt": long, "raw": True, "max_tokens": 8},
            {"custom_id": "after", "prompt": "Goodbye", "max_tokens": 8}]
    job_id = accepted(invoke, tmp_path, b"".join(orjson.dumps(r) + b"\n" for r in rows))[0].job_id
    result = run_cli("worker", "--drain", "--model", "tiny", "--batch-size", "4", timeout=300)
    assert result.returncode == 0, result.stderr
    by_id = {r.custom_id: r for r in Store().iter_requests(job_id)}
    assert by_id["before"].status == by_id["after"].status == DONE
    assert by_id["long"].status == FAILED
    assert "model's context window is 2048: shorten it" in by_id["long"].error
