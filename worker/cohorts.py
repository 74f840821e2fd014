"""Prompts admitted together start decoding together.

mlx-lm's BatchGenerator prefills the prompts it admits in one step side by side, a
chunk a step, and moves each to decoding the step after its last chunk: with prompts
of 36-344 tokens in 64-token chunks, one admission graduates over six steps. Each
graduation is a copy and two gathers of the prompt batch's KV cache, a forward pass of
the graduates alone for their first token (the model's weights read once more, however
few the rows), a pad and concatenate of the decode batch's cache, and from then on a
decode step beside every prefill step that follows. In one process's share of the
benchmark's job that was 5 graduations and 69 decode steps where one graduation and 64
do the same work.

Here a prompt that is done before the others admitted with it waits, its cache set
aside (``held``), until the last of them is done; then all of them start decoding in
one step. The prefill is unchanged: each prompt still starts at once (starting the long
ones first instead makes every short prompt's attention span the long ones' padding,
measured 1.4x slower prefill). A request admitted alone, as when a finished one's slot
is refilled, graduates alone, as before.
"""

from __future__ import annotations

import copy
from itertools import count

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, PromptProcessingBatch
from mlx_lm.models.cache import BatchKVCache


def _prefilled(entry) -> bool:
    """Whether a ``_currently_processing`` entry (segments left, tokens done, tokens in
    all, and here the admission it came in) has only the one token that decoding starts
    from left: mlx-lm's own test for moving it to decoding."""
    segments = entry[0]
    return len(segments) == 1 and len(segments[0]) == 1


def join_caches(caches: list) -> object:
    """One layer's cache holding the rows of several, each right-justified to the
    longest, in one copy (mlx-lm's ``extend`` pads and concatenates two at a time: a
    copy of everything per part, each into fresh memory). Other kinds of cache are
    extended as mlx-lm does."""
    if not all(type(c) is BatchKVCache and c.keys is not None for c in caches):
        for c in caches[1:]:
            caches[0].extend(c)
        return caches[0]
    end = max(c._idx for c in caches)
    first = caches[0]
    rows = sum(c.keys.shape[0] for c in caches)
    size = max(c.keys.shape[2] for c in caches)  # room already grown, as extend keeps
    keys = mx.zeros((rows, first.keys.shape[1], size, first.keys.shape[3]), first.keys.dtype)
    values = mx.zeros((rows, first.values.shape[1], size, first.values.shape[3]),
                      first.values.dtype)
    row, lefts = 0, []
    for c in caches:
        n, shift = c.keys.shape[0], end - c._idx
        keys[row:row + n, :, shift:end] = c.keys[..., :c._idx, :]
        values[row:row + n, :, shift:end] = c.values[..., :c._idx, :]
        lefts.append(c.left_padding + shift)
        row += n
    joined = BatchKVCache([0] * rows)
    joined.keys, joined.values, joined._idx = keys, values, end
    joined.offset = mx.concatenate([c.offset for c in caches])
    joined.left_padding = mx.concatenate(lefts)
    return joined


class MovingPromptBatch(PromptProcessingBatch):
    """A prompt batch that hands over its caches, uncopied, when all of it leaves, and
    takes in several others with one copy."""

    def split(self, indices: list[int]):
        if len(indices) < len(self.uids):
            return super().split(indices)
        moved = copy.copy(self)
        self.prompt_cache = []  # a new list: filter clears it in place
        self.filter([])
        return moved

    def absorb(self, parts: list[PromptProcessingBatch]) -> None:
        """Append the rows of ``parts`` (which are consumed)."""
        layers = zip(*(b.prompt_cache for b in (self, *parts) if b.prompt_cache))
        caches = [join_caches(list(layer)) for layer in layers]
        for part in parts:
            part.prompt_cache = []  # extend: the lists only; the caches are joined above
            self.extend(part)
        self.prompt_cache = caches


class CohortBatchGenerator(BatchGenerator):
    """mlx-lm's BatchGenerator whose admissions move to decoding whole. A prompt set
    aside can be removed; its cache is not among those ``extract_cache`` finds (the
    engine takes none)."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self._prompt_batch = MovingPromptBatch.empty(self.model, self.sampler,
                                                     self.prefill_step_size)
        # Prompts done before the rest of their admission: (part of the prompt batch,
        # its rows' ``_currently_processing`` entries), one admission each.
        self._held: list[tuple[PromptProcessingBatch, list]] = []
        self._admissions = count()

    def _make_batch(self, n: int):
        batch = super()._make_batch(n)
        admission = next(self._admissions)
        for entry in self._currently_processing[-n:]:
            entry.append(admission)
        return batch

    def _next(self):
        self._hold_or_release()
        return super()._next()

    def _hold_or_release(self) -> None:
        """Set aside the prompts that are done while others of their admission are not;
        put back those whose admission is all done, to graduate in this step."""
        processing = self._currently_processing
        busy = {e[3] for e in processing if not _prefilled(e)}
        for admission in sorted({e[3] for e in processing if _prefilled(e)} & busy):
            rows = [i for i, e in enumerate(self._currently_processing)
                    if e[3] == admission and _prefilled(e)]
            entries = [self._currently_processing[i] for i in rows]
            self._held.append((self._prompt_batch.split(rows), entries))
            held = {id(e) for e in entries}
            self._currently_processing = [e for e in self._currently_processing
                                          if id(e) not in held]
        back = [(part, entries) for part, entries in self._held if entries[0][3] not in busy]
        if back:
            self._held = [h for h in self._held if h[1][0][3] in busy]
            self._prompt_batch.absorb([part for part, _ in back])
            self._currently_processing += [e for _, entries in back for e in entries]

    def remove(self, uids, return_prompt_caches=False):
        gone = set(uids)
        held = []
        for part, entries in self._held:
            keep = [i for i, u in enumerate(part.uids) if u not in gone]
            if keep:
                if len(keep) < len(part.uids):
                    part.filter(keep)
                held.append((part, [entries[i] for i in keep]))
        self._held = held
        return super().remove(uids, return_prompt_caches)
