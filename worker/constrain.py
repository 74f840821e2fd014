"""Constrained decoding: a request's answer follows its grammar, token by token.

llguidance (Microsoft's grammar engine, also behind llama.cpp's, vLLM's and SGLang's
structured output) computes which tokens may come next for a JSON Schema, in Rust, in
tens of microseconds a token; it has no dependencies and needs no PyTorch (xgrammar,
the other candidate, requires PyTorch and Triton: gigabytes on a CPU machine).

One ``Constraint`` per request: a matcher of the request's own grammar, made by copying
a compiled one kept per schema (``Grammars``). The decode step (worker/decode.py) asks
it to mask the row's logits and tells it every token the row is given, so the rows of
one batch never share a state, whoever joins or leaves.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import mlx.core as mx
import numpy as np
from nightshift.jobs import response_format

log = logging.getLogger("nightshift.engine")

MAX_COMPILED = 256  # schemas kept compiled, least recently used dropped first


class Grammars:
    """Compiled grammars of one tokenizer, one per response format spec."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the width of the model's logits
        self._llg = None
        self._compiled: OrderedDict[str, object] = OrderedDict()

    def constraint(self, spec: str, gate=None) -> Constraint:
        """A fresh constraint for a request with this spec (``gate``: a reasoning model's
        ThinkingGate, which keeps the grammar off the thinking).

        Raises:
            ValueError: the grammar cannot be built for this tokenizer.
        """
        from llguidance import LLMatcher

        compiled = self._compiled.get(spec)
        if compiled is None:
            compiled = LLMatcher(self._tokenizer(), response_format.grammar(spec), log_level=0)
            if compiled.is_error():
                raise ValueError(f"response_format cannot be followed: {compiled.get_error()}")
            self._compiled[spec] = compiled
            if len(self._compiled) > MAX_COMPILED:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(spec)
        return Constraint(compiled.deep_copy(), self.vocab_size, self.tokenizer.eos_token_ids,
                          gate)

    def _tokenizer(self):
        if self._llg is None:
            from llguidance.hf import from_tokenizer

            self._llg = from_tokenizer(self.tokenizer._tokenizer, n_vocab=self.vocab_size,
                                       eos_token=sorted(self.tokenizer.eos_token_ids))
        return self._llg


class Constraint:
    """One request's grammar state."""

    def __init__(self, matcher, vocab_size: int, eos: set[int], gate=None):
        self.matcher = matcher
        self.gate = gate
        self.vocab_size = vocab_size
        self.eos = sorted(eos)
        self._bits = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)

    def mask(self, logits: mx.array) -> mx.array:
        """``logits`` (one row) with every token the grammar forbids next at -inf."""
        from llguidance.numpy import fill_next_token_bitmask

        if self.gate is not None and self.gate.inside:  # thinking: free
            return logits
        if self.matcher.is_error():  # cannot happen with its own masks; end the answer
            allowed = np.zeros(logits.shape[-1], dtype=np.bool_)
            allowed[self.eos] = True
        else:
            fill_next_token_bitmask(self.matcher, self._bits, 0)
            allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
            allowed = allowed[: logits.shape[-1]].astype(np.bool_)
            opener = self.gate.open_allowed if self.gate is not None else None
            if opener is not None:  # a reasoning model may open its thinking first
                allowed[opener] = True
        allowed = mx.array(allowed)
        return mx.where(allowed, logits, mx.array(-mx.inf, logits.dtype))

    def consume(self, token: int) -> None:
        """The token the row was given."""
        if self.gate is not None and not self.gate.consume(token):
            return
        if not self.matcher.consume_token(token) and not self.matcher.is_stopped():
            log.warning("a constrained answer left its grammar: %s", self.matcher.get_error())
