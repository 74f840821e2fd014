"""Reading submitted JSONL request files: streaming, one request per line, every line checked.

Three line shapes are accepted, each a JSON object on one line:

* ``{"prompt": "..."}`` - a chat turn from the user (or raw text with ``"raw": true``);
* ``{"messages": [{"role": ..., "content": ...}, ...]}`` - a whole chat;
* an OpenAI Batch API line: ``{"custom_id", "method": "POST", "url", "body"}``.

Plain lines may also carry ``custom_id``, ``metadata``, ``raw``, the generation
settings ``max_tokens``, ``temperature``, ``top_p``, ``seed`` and ``stop``,
``logprobs`` / ``top_logprobs`` as a chat completions body has them, and
``response_format`` (see jobs/response_format.py). A JSON ``null``
for an optional field means "not given".

A bad line never stops the reading: :func:`iter_requests` yields a :class:`LineError`
for it and goes on, so a submit can report every problem of a file at once.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, BinaryIO

import orjson
from nightshift.jobs import response_format
from nightshift.jobs.errors import NightshiftError

# One line is held in memory whole; a longer one is skipped (without buffering it)
# and reported. Large enough for a 50 MB prompt.
MAX_LINE_BYTES = 64 * 1024 * 1024

MAX_TOKENS_LIMIT = 131072
SEED_LIMIT = 2**63 - 1
N_LIMIT = 32  # samples of one prompt (each takes a slot of the batch)
TOP_LOGPROBS_LIMIT = 20  # OpenAI's chat limit (its completions endpoint stops at 5)
MAX_STOP_SEQUENCES = 16
MAX_CUSTOM_ID_CHARS = 256

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"

_BOM = b"\xef\xbb\xbf"
_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "developer": "system"}
_SETTINGS = ("max_tokens", "temperature", "top_p", "seed", "stop", "n")
_LOGPROBS_FIELDS = ("logprobs", "top_logprobs")
_PLAIN_FIELDS = ("prompt", "messages", "custom_id", "metadata", "raw", *_SETTINGS,
                 *_LOGPROBS_FIELDS, "response_format")
_BATCH_FIELDS = ("custom_id", "method", "url", "body", "metadata")


class LineError(NightshiftError):
    """One bad line of a submitted file; ``str()`` is ``FILE:LINE: reason``."""

    def __init__(self, source: str, line_no: int, reason: str):
        super().__init__(source, line_no, reason)
        self.source = source
        self.line_no = line_no
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.source}:{self.line_no}: {self.reason}"


class ParamError(NightshiftError, ValueError):
    """A generation setting out of range (raised by :func:`validate_params`)."""


class OversizedLine(bytes):
    """What :func:`iter_lines` yields for a line over the limit: its first bytes, and its size."""

    size: int
    limit: int

    def __new__(cls, head: bytes, size: int, limit: int) -> OversizedLine:
        self = super().__new__(cls, head)
        self.size = size
        self.limit = limit
        return self


class _Reject(Exception):
    """Internal: why a line is refused; turned into a LineError with its place."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Params:
    """Generation settings. ``None`` means "not given here": the value is inherited."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    # Log-probabilities asked for: the number of most likely alternatives to give with
    # each token's own (0 for its own only); None when not asked.
    logprobs: int | None = None
    # The answer's format: a canonical spec (jobs/response_format.py); None for text.
    response_format: str | None = None
    n: int | None = None  # samples of the prompt, exported as choices[0..n-1]

    def merged_over(self, base: Params) -> Params:
        """These settings laid over ``base``: each field that is not None here wins."""
        if self == _NO_PARAMS:
            return base
        return Params(
            **{
                f.name: getattr(base, f.name) if getattr(self, f.name) is None
                else getattr(self, f.name)
                for f in fields(Params)
            }
        )

    def to_json(self) -> dict[str, Any]:
        """The given (non-None) fields as a JSON-ready dict; ``stop`` becomes a list."""
        out: dict[str, Any] = {}
        for f in fields(Params):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if f.name == "stop" else value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Params:
        """The inverse of :meth:`to_json`. Does not check ranges (see :func:`validate_params`).

        Raises:
            TypeError: for a key that is not a setting.
        """
        data = dict(data)
        if data.get("stop") is not None:
            data["stop"] = tuple(data["stop"])
        return cls(**data)


_NO_PARAMS = Params()


@dataclass(slots=True)
class RequestSpec:
    """One request read from a file, checked and normalised."""

    line_no: int  # 1-based physical line in the file (a table's row: jobs/tables.py)
    custom_id: str | None
    kind: str  # "chat" or "completion" (raw text, no chat template)
    messages: list[dict[str, str]] | None  # [{"role", "content": str}] for chat
    prompt: str | None  # for completion
    params: Params  # the overrides given on this line only
    metadata: dict[str, Any] | None
    model: str | None  # body.model of an OpenAI batch line, if given
    # A table row's columns, as the JSON object requests.input_row keeps (jobs/tables.py).
    row: str | None = None


# --- value checks: each returns the normalised value or raises _Reject -------------------


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _show(value: Any) -> str:
    """A short JSON rendering of a value for an error message."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    return type(value) is int or (type(value) is float and math.isfinite(value))


def _check_max_tokens(value: Any, name: str) -> int:
    if type(value) is not int or not 1 <= value <= MAX_TOKENS_LIMIT:
        raise _Reject(f"{name} must be an integer from 1 to {MAX_TOKENS_LIMIT}, got {_show(value)}")
    return value


def _check_temperature(value: Any, name: str) -> float:
    if not _is_number(value) or not 0 <= value <= 2:
        raise _Reject(f"{name} must be a number from 0 to 2, got {_show(value)}")
    return float(value)


def _check_top_p(value: Any, name: str) -> float:
    if not _is_number(value) or not 0 < value <= 1:
        raise _Reject(f"{name} must be a number greater than 0 and at most 1, got {_show(value)}")
    return float(value)


def _check_seed(value: Any, name: str) -> int:
    if type(value) is not int or not 0 <= value <= SEED_LIMIT:
        raise _Reject(f"{name} must be an integer from 0 to {SEED_LIMIT}, got {_show(value)}")
    return value


def _check_stop(value: Any, name: str) -> tuple[str, ...]:
    if type(value) is str:
        value = (value,)
    elif type(value) is list or type(value) is tuple:
        if len(value) > MAX_STOP_SEQUENCES:
            raise _Reject(
                f"{name} must hold at most {MAX_STOP_SEQUENCES} strings, got {len(value)}"
            )
    else:
        raise _Reject(
            f"{name} must be a string or an array of strings, got {_type_name(value)}"
        )
    for item in value:
        if type(item) is not str or not item:
            raise _Reject(f"{name} must hold non-empty strings, got {_show(item)}")
    return tuple(value)


def _check_n(value: Any, name: str) -> int:
    if type(value) is not int or not 1 <= value <= N_LIMIT:
        raise _Reject(f"{name} must be an integer from 1 to {N_LIMIT}, got {_show(value)}")
    return value


def _check_logprobs_count(value: Any, name: str) -> int:
    if type(value) is not int or not 0 <= value <= TOP_LOGPROBS_LIMIT:
        raise _Reject(f"{name} must be an integer from 0 to {TOP_LOGPROBS_LIMIT}, got "
                      f"{_show(value)}")
    return value


def _chat_logprobs(logprobs: Any, top: Any, prefix: str) -> int | None:
    """The ``logprobs`` setting from a chat body's ``logprobs`` (true or false) and
    ``top_logprobs`` (0 to 20, only with logprobs true), as OpenAI defines them."""
    if logprobs is not None and type(logprobs) is not bool:
        raise _Reject(f"{prefix}logprobs must be true or false, got {_show(logprobs)}"
                      f" (the number of alternatives goes in {prefix}top_logprobs)")
    if top is not None:
        if logprobs is not True:
            raise _Reject(f"{prefix}top_logprobs needs {prefix}logprobs: true")
        return _check_logprobs_count(top, f"{prefix}top_logprobs")
    return 0 if logprobs else None


def _check_response_format(value: Any, name: str) -> str:
    try:
        return response_format.check(value, name)
    except response_format.FormatError as exc:
        raise _Reject(str(exc)) from None


def _openai_response_format(value: Any, name: str) -> str | None:
    try:
        return response_format.from_openai(value, name)
    except response_format.FormatError as exc:
        raise _Reject(str(exc)) from None


_CHECKS = {
    "max_tokens": _check_max_tokens,
    "temperature": _check_temperature,
    "top_p": _check_top_p,
    "seed": _check_seed,
    "stop": _check_stop,
    "logprobs": _check_logprobs_count,
    "response_format": _check_response_format,
    "n": _check_n,
}


def validate_params(p: Params, where: str) -> None:
    """Check every given setting of ``p`` against its allowed range.

    Args:
        p: the settings (from a file line, CLI flags or job defaults).
        where: what to name in the message, e.g. ``"--temperature"`` or ``"job defaults"``.

    Raises:
        ParamError: (a ValueError) ``"{where}: temperature must be a number from 0 to 2, got 3"``.
    """
    for name, check in _CHECKS.items():
        value = getattr(p, name)
        if value is not None:
            try:
                check(value, name)
            except _Reject as e:
                raise ParamError(f"{where}: {e.reason}") from None


def _check_custom_id(value: Any) -> str | None:
    if value is None:
        return None
    if type(value) is not str:
        hint = f' (write "{value}", not {value})' if type(value) is int else ""
        raise _Reject(f"custom_id must be a string{hint}, got {_type_name(value)}")
    if not value:
        raise _Reject("custom_id must not be empty")
    if len(value) > MAX_CUSTOM_ID_CHARS:
        raise _Reject(
            f"custom_id is {len(value)} characters long; at most {MAX_CUSTOM_ID_CHARS} are allowed"
        )
    return value


def _check_metadata(value: Any, name: str) -> dict[str, Any] | None:
    if value is not None and type(value) is not dict:
        raise _Reject(f"{name} must be an object, got {_type_name(value)}")
    return value


def _check_prompt(value: Any, name: str) -> str:
    if type(value) is not str:
        raise _Reject(f"{name} must be a string, got {_type_name(value)}")
    if not value or value.isspace():
        raise _Reject(f"empty prompt: {name} is blank")
    return value


def _check_content(value: Any, name: str) -> str:
    if type(value) is str:
        return value
    if type(value) is not list:
        raise _Reject(
            f"{name} must be a string or an array of text parts, got {_type_name(value)}"
        )
    texts = []
    for j, part in enumerate(value):
        where = f"{name}[{j}]"
        if type(part) is not dict:
            raise _Reject(f"{where} must be an object, got {_type_name(part)}")
        if part.get("type") != "text":
            raise _Reject(
                f"{where} has type {_show(part.get('type'))}; only text parts are supported"
            )
        for key in part:
            if key != "type" and key != "text":
                raise _Reject(f"{where}.{key} is not supported (text parts take type and text)")
        text = part.get("text")
        if type(text) is not str:
            raise _Reject(f"{where}.text must be a string, got {_type_name(text)}")
        texts.append(text)
    # Joined without a separator, as mlx-lm's server does.
    return "".join(texts)


def _check_messages(value: Any, name: str) -> list[dict[str, str]]:
    if type(value) is not list:
        raise _Reject(f"{name} must be an array of messages, got {_type_name(value)}")
    if not value:
        raise _Reject(f"empty prompt: {name} is an empty array")
    out = []
    has_text = False
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if type(message) is not dict:
            raise _Reject(f"{where} must be an object, got {_type_name(message)}")
        for key in message:
            if key != "role" and key != "content":
                raise _Reject(f"{where}.{key} is not supported (messages take role and content)")
        if "role" not in message:
            raise _Reject(f"{where} has no role")
        role = message["role"]
        if type(role) is not str or role not in _ROLES:
            raise _Reject(
                f"{where}.role must be one of system, user, assistant, developer;"
                f" got {_show(role)}"
            )
        if "content" not in message:
            raise _Reject(f"{where} has no content")
        content = _check_content(message["content"], f"{where}.content")
        if content and not content.isspace():
            has_text = True
        out.append({"role": _ROLES[role], "content": content})
    if not has_text:
        raise _Reject(f"empty prompt: every content in {name} is blank")
    return out


# --- line shapes -------------------------------------------------------------------------


def _json_reason(raw: bytes, error: orjson.JSONDecodeError) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not valid UTF-8 at byte {e.start + 1}"
    if error.msg == "depth limit exceeded":
        return "not valid JSON: nested too deeply (at most 1024 levels)"
    if error.msg == "number is infinity when parsed as double":
        return f"not valid JSON: number too large at column {error.colno}"
    return f"not valid JSON: {error.msg} at column {error.colno}"


def _parse(raw: bytes, line_no: int, raw_default: bool) -> RequestSpec:
    if type(raw) is OversizedLine:
        raise _Reject(f"line is {raw.size} bytes long; at most {raw.limit} are allowed")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise _Reject(_json_reason(raw, e)) from None
    if type(obj) is not dict:
        raise _Reject(f"expected a JSON object, got {_type_name(obj)}")
    if "prompt" in obj or "messages" in obj:
        return _parse_plain(obj, line_no, raw_default)
    if "body" in obj or "url" in obj or "method" in obj:
        return _parse_batch(obj, line_no)
    found = ", ".join(obj) if obj else "none"
    raise _Reject(
        'unknown line shape: expected "prompt", "messages" or an OpenAI batch request'
        f" (custom_id, method, url, body); fields found: {found}"
    )


def _parse_plain(obj: dict[str, Any], line_no: int, raw_default: bool) -> RequestSpec:
    custom_id = metadata = settings = None
    raw_flag = raw_default
    for key, value in obj.items():
        if key == "prompt" or key == "messages":
            continue
        if key == "custom_id":
            custom_id = _check_custom_id(value)
        elif key in _LOGPROBS_FIELDS:
            continue  # read together below
        elif key == "response_format":
            spec = None if value is None else _openai_response_format(value, key)
            if spec is not None:
                settings = {**(settings or {}), key: spec}
        elif key in _CHECKS:
            if value is not None:
                if settings is None:
                    settings = {}
                settings[key] = _CHECKS[key](value, key)
        elif key == "metadata":
            metadata = _check_metadata(value, "metadata")
        elif key == "raw":
            if value is not None:
                if type(value) is not bool:
                    raise _Reject(f"raw must be true or false, got {_type_name(value)}")
                raw_flag = value
        else:
            raise _Reject(f"unknown field {key!r} (accepted: {', '.join(_PLAIN_FIELDS)})")
    logprobs = _chat_logprobs(obj.get("logprobs"), obj.get("top_logprobs"), "")
    if logprobs is not None:
        settings = {**(settings or {}), "logprobs": logprobs}
    params = Params(**settings) if settings else _NO_PARAMS

    if "messages" in obj:
        if "prompt" in obj:
            raise _Reject('give "prompt" or "messages", not both')
        if obj.get("raw") is True:
            raise _Reject('"raw": true applies to prompt lines; a messages line is always chat')
        messages = _check_messages(obj["messages"], "messages")
        return RequestSpec(line_no, custom_id, "chat", messages, None, params, metadata, None)
    prompt = _check_prompt(obj["prompt"], "prompt")
    if raw_flag:
        return RequestSpec(line_no, custom_id, "completion", None, prompt, params, metadata, None)
    messages = [{"role": "user", "content": prompt}]
    return RequestSpec(line_no, custom_id, "chat", messages, None, params, metadata, None)


def _noop_ok(key: str, value: Any) -> str | None:
    """None when ``value`` is the no-op value of body field ``key``, else what is accepted."""
    if value is None:
        return None
    if key == "stream":
        return None if value is False else "only false"
    if key == "presence_penalty" or key == "frequency_penalty":
        return None if _is_number(value) and value == 0 else "only 0"
    # user
    return None if type(value) is str else "a string"


_NOOP_FIELDS = {"stream", "presence_penalty", "frequency_penalty", "user"}


def _body_logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """The ``logprobs`` setting of a batch line's body: a chat body's ``logprobs`` and
    ``top_logprobs``, or a completions body's ``logprobs`` (a count, as OpenAI's)."""
    if chat:
        return _chat_logprobs(body.get("logprobs"), body.get("top_logprobs"), "body.")
    if body.get("top_logprobs") is not None:
        raise _Reject(f"body.top_logprobs belongs to {CHAT_URL}; a {COMPLETIONS_URL} body "
                      "gives the number of alternatives as body.logprobs")
    value = body.get("logprobs")
    return None if value is None else _check_logprobs_count(value, "body.logprobs")


def _parse_batch(obj: dict[str, Any], line_no: int) -> RequestSpec:
    custom_id = metadata = None
    for key, value in obj.items():
        if key == "custom_id":
            custom_id = _check_custom_id(value)
        elif key == "metadata":
            metadata = _check_metadata(value, "metadata")
        elif key not in _BATCH_FIELDS:
            raise _Reject(
                f"unknown field {key!r} in an OpenAI batch line"
                f" (accepted: {', '.join(_BATCH_FIELDS)}; settings go in body)"
            )
    method = obj.get("method", "POST")
    if method != "POST":
        raise _Reject(f"method must be \"POST\", got {_show(method)}")
    if "url" not in obj:
        raise _Reject(f"missing url (use {CHAT_URL} or {COMPLETIONS_URL})")
    url = obj["url"]
    if url != CHAT_URL and url != COMPLETIONS_URL:
        raise _Reject(f"unsupported url {_show(url)} (use {CHAT_URL} or {COMPLETIONS_URL})")
    if "body" not in obj:
        raise _Reject("missing body")
    body = obj["body"]
    if type(body) is not dict:
        raise _Reject(f"body must be an object, got {_type_name(body)}")

    chat = url == CHAT_URL
    model = settings = body_metadata = None
    for key, value in body.items():
        if key == "messages":
            if not chat:
                raise _Reject(f"body.messages belongs to {CHAT_URL}; {COMPLETIONS_URL} takes"
                              " body.prompt")
        elif key == "prompt":
            if chat:
                raise _Reject(f"body.prompt belongs to {COMPLETIONS_URL}; {CHAT_URL} takes"
                              " body.messages")
        elif key == "model":
            if value is not None and type(value) is not str:
                raise _Reject(f"body.model must be a string, got {_type_name(value)}")
            model = value
        elif key in _LOGPROBS_FIELDS:
            continue  # read together below
        elif key == "response_format":
            spec = None if value is None else _openai_response_format(value, f"body.{key}")
            if spec is not None:
                settings = {**(settings or {}), key: spec}
        elif key in _CHECKS or key == "max_completion_tokens":
            if value is not None:
                name = "max_tokens" if key == "max_completion_tokens" else key
                if settings is None:
                    settings = {}
                if name in settings:
                    raise _Reject("give body.max_tokens or body.max_completion_tokens, not both")
                settings[name] = _CHECKS[name](value, f"body.{key}")
        elif key == "metadata":
            body_metadata = _check_metadata(value, "body.metadata")
        elif key in _NOOP_FIELDS:
            accepted = _noop_ok(key, value)
            if accepted is not None:
                raise _Reject(
                    f"body.{key} = {_show(value)} is not supported by nightshift"
                    f" ({accepted} is accepted)"
                )
        else:
            raise _Reject(f"body.{key} is not supported by nightshift")
    logprobs = _body_logprobs(body, chat)
    if logprobs is not None:
        settings = {**(settings or {}), "logprobs": logprobs}
    params = Params(**settings) if settings else _NO_PARAMS
    if metadata is None:
        metadata = body_metadata

    if chat:
        if "messages" not in body:
            raise _Reject(f"missing body.messages (a {CHAT_URL} body needs messages)")
        messages = _check_messages(body["messages"], "body.messages")
        return RequestSpec(line_no, custom_id, "chat", messages, None, params, metadata, model)
    if "prompt" not in body:
        raise _Reject(f"missing body.prompt (a {COMPLETIONS_URL} body needs a prompt)")
    prompt = body["prompt"]
    if type(prompt) is list:
        raise _Reject("body.prompt must be a string (lists of prompts or token ids are not"
                      " supported: write one line per prompt)")
    prompt = _check_prompt(prompt, "body.prompt")
    return RequestSpec(line_no, custom_id, "completion", None, prompt, params, metadata, model)


# --- public entry points -----------------------------------------------------------------


def iter_lines(
    stream: BinaryIO, *, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_no, raw)`` for each physical line of a binary stream, in constant memory.

    ``raw`` is without its ``\\n`` or ``\\r\\n`` ending; a UTF-8 BOM opening line 1 is
    dropped. A line longer than ``max_line_bytes`` is read past without being held and
    yielded as an :class:`OversizedLine` (its first bytes and its size), which
    :func:`parse_line` refuses.
    """
    if isinstance(stream, io.RawIOBase):
        stream = io.BufferedReader(stream)
    readline = stream.readline
    limit = max_line_bytes + 2  # room for "\r\n"
    line_no = 0
    while True:
        line = readline(limit)
        if not line:
            return
        line_no += 1
        if line[-1:] != b"\n" and len(line) == limit:
            size = len(line)
            head = line[:100]
            del line
            while True:
                chunk = readline(1 << 20)
                size += len(chunk)
                if not chunk or chunk[-1:] == b"\n":
                    break
            yield line_no, OversizedLine(head, size, max_line_bytes)
            continue
        if line[-1:] == b"\n":
            line = line[:-2] if line[-2:-1] == b"\r" else line[:-1]
        if line_no == 1 and line[:3] == _BOM:
            line = line[3:]
        if len(line) > max_line_bytes:
            yield line_no, OversizedLine(line[:100], len(line), max_line_bytes)
        else:
            yield line_no, line


def parse_line(raw: bytes, line_no: int, source: str, *, raw_default: bool = False) -> RequestSpec:
    """Parse and check one line (without its line ending).

    Args:
        raw: the line's bytes, as :func:`iter_lines` yields them.
        line_no: its 1-based line number, for the message and ``RequestSpec.line_no``.
        source: the file name to put in messages.
        raw_default: treat ``{"prompt": ...}`` lines without ``"raw"`` as raw completions.

    Returns:
        The request, normalised (``developer`` role -> ``system``, text parts joined).

    Raises:
        LineError: anything wrong with the line, with a specific reason.
    """
    try:
        return _parse(raw, line_no, raw_default)
    except _Reject as e:
        raise LineError(source, line_no, e.reason) from None


def iter_requests(
    stream: BinaryIO,
    source: str,
    *,
    raw_default: bool = False,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Iterator[RequestSpec | LineError]:
    """Yield a :class:`RequestSpec` per good line and a :class:`LineError` per bad one.

    Blank lines are skipped. A ``custom_id`` seen before in the file makes the line an
    error. Never raises for the file's content; memory is one line plus the seen ids.
    """
    seen: dict[str, int] = {}
    for line_no, raw in iter_lines(stream, max_line_bytes=max_line_bytes):
        if (not raw or raw.isspace()) and type(raw) is not OversizedLine:
            continue
        try:
            spec = _parse(raw, line_no, raw_default)
        except _Reject as e:
            yield LineError(source, line_no, e.reason)
            continue
        custom_id = spec.custom_id
        if custom_id is not None:
            first = seen.get(custom_id)
            if first is not None:
                yield LineError(
                    source, line_no, f"duplicate custom_id {custom_id!r} (first on line {first})"
                )
                continue
            seen[custom_id] = line_no
        yield spec
