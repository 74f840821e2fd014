"""The decode step, without a log-softmax over the vocabulary for requests that need none.

mlx-lm's ``GenerationBatch._step`` normalizes every row of the logits
(``logits - logsumexp(logits)``) before sampling, every step. On CPU that is one
scalar ``exp`` per vocabulary entry per sequence: about 28 ms a step at batch 64 over
SmolLM2's 49,152 tokens, more than the lm_head matmul (ENGINE-NOTES). Greedy decoding
needs only the argmax of the logits; a seeded sampler gets its own row normalized, as
before, so its draws do not change.

A request that asks for log-probabilities, or whose answer must follow a grammar, gets a
``RowSampler``. Log-probabilities: its row alone is normalized, and its responses carry
that row (the model's log-probabilities over the vocabulary); every other response
carries ``logprobs=None``. Its tokens are the ones it would get without asking (a greedy
row still takes the argmax of its logits). A constraint (worker/constrain.py) masks the
row's logits to the tokens its grammar allows next, and learns each token the row is
given; the row's log-probabilities stay the model's own.

A finished row leaves the batch lazily. mlx-lm's ``filter`` copies every layer's KV cache
of the rows that stay, at every step where one finishes: in one process's share of the
benchmark's job, 19 such copies took 2.2 s of 30 (``extend`` 1.2 s more). Here a
finished row rides along, its token ignored, until a quarter of the batch has finished,
the batch admits new rows (``extend`` copies the caches anyway), or requests wait for
room; its compute costs less than the copy saves.

``use_logits_step`` puts this step into a BatchGenerator. It replaces the generator's
one long-lived generation batch (mlx-lm 0.32.2 creates it in ``__init__`` and only
ever extends it); the first token of each newly admitted request is still sampled
by mlx-lm's own step, on a batch of the admitted requests only.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch
from mlx_lm.sample_utils import greedy_sampler


def normalized(logits: mx.array) -> mx.array:
    """Log-probabilities of logits rows (what mlx-lm's samplers take)."""
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


class RowSampler:
    """The sampler of a request that asks for log-probabilities or follows a grammar.

    ``inner``: a seeded sampler, or None for greedy. mlx-lm calls this on a new row's
    log-probabilities for its first token; ``sample`` draws every later token.
    """

    def __init__(self, inner=None, *, logprobs: bool = False, constraint=None):
        self.inner = inner
        self.logprobs = logprobs
        self.constraint = constraint

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.constraint is not None:
            logprobs = normalized(self.constraint.mask(logprobs))
        return (self.inner or greedy_sampler)(logprobs)


def wants_logprobs(sampler) -> bool:
    return getattr(sampler, "logprobs", False)


def constraint_of(sampler):
    return getattr(sampler, "constraint", None)


def _inner(sampler):
    """The sampler that draws a row's token; None for greedy. BatchGenerator.insert
    puts mlx-lm's ``greedy_sampler`` where a request gave none."""
    if isinstance(sampler, RowSampler):
        sampler = sampler.inner
    return None if sampler is greedy_sampler else sampler


def sample(logits: mx.array, samplers: list | None) -> tuple[mx.array, list]:
    """The next token of each row, and each row's log-probabilities where its sampler
    wants them (else None).

    A greedy row (sampler None, mlx-lm's ``greedy_sampler``, or a ``RowSampler`` of
    either) takes the argmax of its logits, unnormalized; any other row's sampler draws
    from the row's log-probabilities. A constrained row's logits are masked first.
    """
    greedy = mx.argmax(logits, axis=-1)
    plain = [_inner(s) is None and not isinstance(s, RowSampler) for s in samplers or ()]
    if all(plain):
        return greedy, [None] * len(logits)
    tokens, logprobs = [], []
    for e, s in enumerate(samplers):
        if plain[e]:
            tokens.append(greedy[e:e + 1])
            logprobs.append(None)
            continue
        row, inner, constraint = logits[e:e + 1], _inner(s), constraint_of(s)
        own = normalized(row) if wants_logprobs(s) or (inner and not constraint) else None
        if constraint is None:
            tokens.append(greedy[e:e + 1] if inner is None else inner(own))
        else:
            allowed = constraint.mask(row)
            tokens.append(mx.argmax(allowed, axis=-1) if inner is None
                          else inner(normalized(allowed)))
        logprobs.append(own[0] if wants_logprobs(s) else None)
    return mx.concatenate(tokens, axis=0), logprobs


class LogitsGenerationBatch(GenerationBatch):
    """mlx-lm's GenerationBatch, sampling on logits, its finished rows removed lazily
    (see the module docstring).

    Responses carry ``logprobs=None`` except for rows whose sampler wants them, and a
    finished row's response no ``prompt_cache`` (the engine takes none). Logits
    processors are not supported (the engine gives none).
    """

    def __init__(self, *args, **kwargs):
        self.finished: set[int] = set()  # uids of rows that ride along until removed
        self.waiting = lambda: False  # whether requests wait for room (use_logits_step)
        super().__init__(*args, **kwargs)

    def next(self):
        """mlx-lm's ``next`` but for the rows that finished (see the class docstring)."""
        if not self.uids:
            return []
        tokens, logprobs = self._step()
        responses, done = [], []
        for i, uid in enumerate(self.uids):
            if uid in self.finished:
                continue
            self._num_tokens[i] += 1
            reason = "length" if self._num_tokens[i] >= self.max_tokens[i] else None
            if self._matchers[i].advance(tokens[i]):
                reason = "stop"
            if reason is not None:
                done.append(i)
            responses.append(self.Response(uid=uid, token=tokens[i], logprobs=logprobs[i],
                                           finish_reason=reason, prompt_cache=None,
                                           all_tokens=self.tokens[i] if reason else None))
        self._finish(done)  # also where none did: requests may wait for room now
        return responses

    def filter(self, keep: list[int]):
        """Rows not in ``keep`` finish (BatchGenerator.remove); they leave as any do."""
        kept = set(keep)
        self._finish([i for i in range(len(self.uids)) if i not in kept])

    def extend(self, batch):
        self._remove_finished()
        super().extend(batch)

    def _finish(self, rows: list[int]) -> None:
        for i in rows:
            self.finished.add(self.uids[i])
            if self.samplers:
                self.samplers[i] = None  # greedy: no grammar or draw for a row that is done
        if self.finished and (4 * len(self.finished) >= len(self.uids)
                              or len(self.finished) == len(self.uids) or self.waiting()):
            self._remove_finished()

    def _remove_finished(self) -> None:
        if self.finished:
            keep = [i for i, uid in enumerate(self.uids) if uid not in self.finished]
            self.finished.clear()
            super().filter(keep)

    def _step(self):
        if any(self.logits_processors):
            raise NotImplementedError("logits processors are not supported by this step")
        # As mlx-lm's step: compute the next tokens asynchronously, then return the
        # current ones (evaluated meanwhile) and record them as in the KV cache.
        self._current_tokens = self._next_tokens
        # A newly joined row's first log-probabilities come from mlx-lm's step (every
        # row's); only the rows that asked keep them.
        current = [lp if wants_logprobs(s) else None
                   for lp, s in zip(self._next_logprobs, self.samplers)]
        inputs = self._current_tokens
        logits = self.model(inputs[:, None], cache=self.prompt_cache)[:, -1, :]
        constrained = [(e, c) for e, c in enumerate(map(constraint_of, self.samplers)) if c]
        given = None
        if constrained:  # each grammar learns its row's token before it masks the next
            given = inputs.tolist()
            for e, c in constrained:
                c.consume(given[e])
        self._next_tokens, self._next_logprobs = sample(logits, self.samplers)
        mx.async_eval(self._next_tokens, [lp for lp in self._next_logprobs if lp is not None])
        mx.eval(inputs, [lp for lp in current if lp is not None])
        inputs = given if given is not None else inputs.tolist()
        for tokens, token in zip(self.tokens, inputs):
            tokens.append(token)
        return inputs, current


def use_logits_step(generator: BatchGenerator) -> None:
    """Make ``generator`` decode with ``LogitsGenerationBatch`` (before any insert)."""
    current = generator._generation_batch
    if len(current):
        raise RuntimeError("use_logits_step must be called before requests are inserted")
    batch = LogitsGenerationBatch.empty(current.model, current.fallback_sampler)
    # Finished rows leave at once where requests wait for room in the batch.
    batch.waiting = lambda: bool(generator._unprocessed_sequences)
    generator._generation_batch = batch
