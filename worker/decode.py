"""The decode step, without a log-softmax over the vocabulary for requests that need none.

mlx-lm's ``GenerationBatch._step`` normalizes every row of the logits
(``logits - logsumexp(logits)``) before sampling, every step. On CPU that is one
scalar ``exp`` per vocabulary entry per sequence: about 28 ms a step at batch 64 over
SmolLM2's 49,152 tokens, more than the lm_head matmul (ENGINE-NOTES). Greedy decoding
needs only the argmax of the logits; a seeded sampler gets its own row normalized, as
before, so its draws do not change.

``use_logits_step`` puts this step into a BatchGenerator. It replaces the generator's
one long-lived generation batch (mlx-lm 0.32.2 creates it in ``__init__`` and only
ever extends it); the first token of each newly admitted request is still sampled
by mlx-lm's own step, on a batch of the admitted requests only.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch


def normalized(logits: mx.array) -> mx.array:
    """Log-probabilities of logits rows (what mlx-lm's samplers take)."""
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def sample(logits: mx.array, samplers: list | None) -> mx.array:
    """The next token of each row: argmax where the sampler is None (greedy), else the
    row's sampler on the row's log-probabilities."""
    if not samplers or all(s is None for s in samplers):
        return mx.argmax(logits, axis=-1)
    greedy = mx.argmax(logits, axis=-1)
    return mx.concatenate([
        greedy[e:e + 1] if s is None else s(normalized(logits[e:e + 1]))
        for e, s in enumerate(samplers)
    ], axis=0)


class LogitsGenerationBatch(GenerationBatch):
    """mlx-lm's GenerationBatch, sampling on logits (see the module docstring).

    Responses carry ``logprobs=None``. Logits processors are not supported (the
    engine gives none).
    """

    def _step(self):
        if any(self.logits_processors):
            raise NotImplementedError("logits processors are not supported by this step")
        # As mlx-lm's step: compute the next tokens asynchronously, then return the
        # current ones (evaluated meanwhile) and record them as in the KV cache.
        self._current_tokens = self._next_tokens
        inputs = self._current_tokens
        logits = self.model(inputs[:, None], cache=self.prompt_cache)[:, -1, :]
        self._next_tokens = sample(logits, self.samplers)
        self._next_logprobs = [None] * len(self.uids)
        mx.async_eval(self._next_tokens)
        mx.eval(inputs)
        inputs = inputs.tolist()
        for tokens, token in zip(self.tokens, inputs):
            tokens.append(token)
        return inputs, [None] * len(inputs)


def use_logits_step(generator: BatchGenerator) -> None:
    """Make ``generator`` decode with ``LogitsGenerationBatch`` (before any insert)."""
    current = generator._generation_batch
    if len(current):
        raise RuntimeError("use_logits_step must be called before requests are inserted")
    generator._generation_batch = LogitsGenerationBatch.empty(current.model,
                                                              current.fallback_sampler)
