"""Reasoning models: the thinking section of an answer, told apart from the answer.

mlx-lm knows a tokenizer's thinking markers (``<think>``/``</think>`` and others). A
chat template may open the section itself (the generation prompt ends inside it, as
DeepSeek-R1's does), or the model opens it with its first token (as Qwen3 does). The
answer's ``content`` is what follows the end marker; the rest is ``reasoning_content``,
as OpenAI's reasoning models return them; ``max_tokens`` counts both.
"""

from __future__ import annotations


class Thinking:
    """A tokenizer's thinking markers, as token sequences."""

    def __init__(self, start: tuple[int, ...], end: tuple[int, ...]):
        self.start = start
        self.end = end

    @classmethod
    def of(cls, tokenizer) -> Thinking | None:
        """The markers of ``tokenizer``, or None for a model that does not think."""
        if not getattr(tokenizer, "has_thinking", False):
            return None
        return cls(tuple(tokenizer.think_start_tokens), tuple(tokenizer.think_end_tokens))

    def opened_by(self, prompt: list[int]) -> bool:
        """Whether the prompt ends inside a thinking section its template opened."""
        start, end = _rfind(prompt, self.start), _rfind(prompt, self.end)
        return start >= 0 and end < start and len(prompt) - start - len(self.start) <= 2

    def split(self, tokens: list[int], opened: bool) -> tuple[int, int] | None:
        """Where the answer's thinking is in ``tokens``: (its first token, the first token
        after the end marker); None when the answer does not think. Thinking that never
        ends (cut by ``max_tokens``) runs to the end."""
        begin = 0
        if not opened:
            if tuple(tokens[: len(self.start)]) != self.start:
                return None
            begin = len(self.start)
        stop = _find(tokens, self.end, begin)
        return (begin, len(tokens)) if stop < 0 else (begin, stop + len(self.end))


class ThinkingGate:
    """Holds a request's grammar back until its thinking ends: the grammar constrains
    the answer, never the thinking (worker/constrain.py asks it)."""

    def __init__(self, thinking: Thinking, opened: bool):
        self.thinking = thinking
        # Not opened by the template: the first token may open it (single-token markers).
        self.may_open = not opened and len(thinking.start) == 1
        self.inside = opened
        self._recent: list[int] = []
        self._first = True

    def consume(self, token: int) -> bool:
        """Whether the grammar should take this token (it follows the thinking)."""
        first, self._first = self._first, False
        if first and self.may_open and token == self.thinking.start[0]:
            self.inside = True
        if not self.inside:
            return True
        self._recent = (self._recent + [token])[-len(self.thinking.end):]
        if tuple(self._recent) == self.thinking.end:
            self.inside = False
        return False

    @property
    def open_allowed(self) -> int | None:
        """A token the mask must allow besides the grammar's: the start marker, first."""
        return self.thinking.start[0] if self._first and self.may_open else None


def _find(tokens: list[int], seq: tuple[int, ...], begin: int = 0) -> int:
    n = len(seq)
    for i in range(begin, len(tokens) - n + 1):
        if tuple(tokens[i:i + n]) == seq:
            return i
    return -1


def _rfind(tokens: list[int], seq: tuple[int, ...]) -> int:
    n = len(seq)
    for i in range(len(tokens) - n, -1, -1):
        if tuple(tokens[i:i + n]) == seq:
            return i
    return -1
