"""Structured output: OpenAI's ``response_format``, checked at submit, as a grammar.

A request's ``response_format`` is stored as a canonical spec, a JSON string:
``{"type": "json_schema", "schema": {...}}`` or ``{"type": "json_object"}``. At submit
the schema is compiled once by llguidance (the worker's constrained-decoding library,
see worker/constrain.py), so a schema the library cannot honour is an error on its
line, never ignored at run time. Compiled results are cached by schema: a file of
100,000 lines with one schema compiles it once.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import orjson

JSON_OBJECT = '{"type":"json_object"}'
# OpenAI's rule for json_schema.name.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SCHEMA_FIELDS = ("name", "schema", "strict", "description")


class FormatError(ValueError):
    """A ``response_format`` that cannot be honoured; the message says why."""


def from_openai(value: Any, name: str) -> str | None:
    """The canonical spec of an OpenAI ``response_format`` object (None for text).

    Raises:
        FormatError: a shape OpenAI does not define, or a schema llguidance refuses.
    """
    if type(value) is not dict or type(value.get("type")) is not str:
        raise FormatError(f'{name} must be an object with a "type", got {_show(value)}')
    kind = value["type"]
    extra = set(value) - {"type", "json_schema"}
    if extra:
        raise FormatError(f"{name} has unknown fields: {', '.join(sorted(extra))}")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT
    if kind != "json_schema":
        raise FormatError(f'{name}.type must be "text", "json_object" or "json_schema", '
                          f"got {_show(kind)}")
    spec = value.get("json_schema")
    if type(spec) is not dict:
        raise FormatError(f"{name}.json_schema must be an object with name and schema")
    unknown = set(spec) - set(_SCHEMA_FIELDS)
    if unknown:
        raise FormatError(f"{name}.json_schema has unknown fields: {', '.join(sorted(unknown))}")
    if type(spec.get("name")) is not str or not _NAME.fullmatch(spec["name"]):
        raise FormatError(f"{name}.json_schema.name must be 1 to 64 letters, digits, _ or -, "
                          f"got {_show(spec.get('name'))}")
    if "strict" in spec and spec["strict"] is not None and type(spec["strict"]) is not bool:
        raise FormatError(f"{name}.json_schema.strict must be true or false")
    if "schema" not in spec:
        raise FormatError(f"{name}.json_schema.schema is missing (the JSON Schema to follow)")
    return from_schema(spec["schema"], f"{name}.json_schema.schema")


def from_schema(schema: Any, name: str) -> str:
    """The canonical spec of a bare JSON Schema (``submit --schema FILE``).

    Raises:
        FormatError: not an object, or a schema llguidance refuses.
    """
    if type(schema) is not dict:
        raise FormatError(f"{name} must be a JSON Schema object, got {_show(schema)}")
    # Keys keep their order: the answer's properties come in the schema's order.
    spec = orjson.dumps({"type": "json_schema", "schema": schema}).decode()
    error = _refusal(spec)
    if error:
        raise FormatError(f"{name} cannot be followed: {error}")
    return spec


def check(spec: Any, name: str) -> str:
    """A stored canonical spec, checked again (job defaults, or a spec read back).

    Raises:
        FormatError: not a canonical spec, or one llguidance refuses.
    """
    if type(spec) is not str:
        raise FormatError(f"{name} must be a response format spec, got {_show(spec)}")
    try:
        data = orjson.loads(spec)
    except orjson.JSONDecodeError:
        raise FormatError(f"{name} is not JSON") from None
    if data == {"type": "json_object"}:
        return JSON_OBJECT
    if type(data) is not dict or data.get("type") != "json_schema" or "schema" not in data:
        raise FormatError(f"{name} must be a json_object or json_schema spec")
    return from_schema(data["schema"], name)


# JSON as json.dumps writes it: no whitespace but one space after "," and ":". llguidance
# allows any run of whitespace by default, and a model may then fill its budget with it.
# A schema's own "x-guidance" settings win.
JSON_LAYOUT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


@functools.lru_cache(maxsize=256)
def grammar(spec: str) -> str:
    """The llguidance grammar of a canonical spec."""
    from llguidance import LLMatcher

    data = orjson.loads(spec)
    schema = {"type": "object"} if data["type"] == "json_object" else data["schema"]
    return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)


@functools.lru_cache(maxsize=256)
def _refusal(spec: str) -> str:
    """Why llguidance cannot compile this spec's grammar, or "" when it can."""
    from llguidance import LLMatcher

    try:
        compiled = grammar(spec)
    except ValueError as exc:
        return str(exc)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(compiled)
    return " ".join(messages[0].split()) if is_error else ""  # one line, for FILE:LINE


def _show(value: Any) -> str:
    text = orjson.dumps(value).decode() if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
