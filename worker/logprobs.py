"""Log-probabilities of an answer's tokens, in OpenAI's chat shape.

The decode step hands the engine the vocabulary's log-probabilities for the rows that
asked (worker/decode.py); here each becomes the chosen token's log-probability and
its ``k`` most likely alternatives, at once, so no vocabulary-sized row outlives its
step. ``entries`` then names the tokens as OpenAI does: ``token`` (the text),
``bytes`` (its UTF-8 bytes: a token may hold part of a character) and ``logprob``.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    SPMStreamingDetokenizer,
    _byte_decoder,
)

# (the token's log-probability, [(token id, log-probability), ...] most likely first)
Picked = tuple[float, list[tuple[int, float]]]


def pick(logprobs: mx.array, token: int, k: int) -> Picked:
    """``token``'s log-probability in a vocabulary row, and the row's ``k`` best."""
    if k == 0:
        return logprobs[token].item(), []
    best = mx.argpartition(-logprobs, k - 1)[:k]
    values = logprobs[best]
    order = mx.argsort(-values)
    ids, values = best[order].tolist(), values[order].tolist()
    return logprobs[token].item(), list(zip(ids, values))


def token_bytes(tokenizer) -> Callable[[int], bytes]:
    """A function from token id to the bytes it stands for in the answer's text."""
    detokenizer = tokenizer.detokenizer
    if isinstance(detokenizer, BPEStreamingDetokenizer):  # GPT-2 style byte-level BPE
        table, decode = detokenizer.tokenmap, _byte_decoder()

        def bpe(token: int) -> bytes:
            piece = table[token] if token < len(table) else ""
            return b"".join(bytes([decode[c]]) if c in decode else c.encode() for c in piece)
        return bpe
    if isinstance(detokenizer, SPMStreamingDetokenizer):  # sentencepiece: "\u2581" is a space
        table = detokenizer.tokenmap
        return lambda token: table[token].replace(SPMStreamingDetokenizer._sep, b" ")
    return lambda token: tokenizer.decode([token]).encode()


def _named(to_bytes: Callable[[int], bytes], token: int, logprob: float) -> dict:
    raw = to_bytes(token)
    # A token that ends inside a character has no text of its own: OpenAI writes its
    # bytes escaped, as here.
    return {"token": raw.decode("utf-8", "backslashreplace"), "logprob": logprob,
            "bytes": list(raw)}


def entries(to_bytes: Callable[[int], bytes], tokens: list[int], picked: list[Picked]) -> list:
    """OpenAI's ``choices[].logprobs.content``: one entry per token of the answer."""
    return [{**_named(to_bytes, token, logprob),
             "top_logprobs": [_named(to_bytes, t, lp) for t, lp in best]}
            for token, (logprob, best) in zip(tokens, picked)]


def tokens_within(to_bytes: Callable[[int], bytes], tokens: list[int], size: int) -> int:
    """How many of ``tokens`` start inside the first ``size`` bytes of their text (an
    answer cut before a stop text keeps those)."""
    offset = 0
    for n, token in enumerate(tokens):
        if offset >= size:
            return n
        offset += len(to_bytes(token))
    return len(tokens)
