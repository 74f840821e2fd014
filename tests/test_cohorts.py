"""Prompts admitted together start decoding together (worker/cohorts.py): mlx-lm's
tokens, one graduation per admission, held prompts removable, caches joined in one copy
as mlx-lm's ``extend`` would join them."""

from __future__ import annotations

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import BatchKVCache
from nightshift.worker.cohorts import CohortBatchGenerator, join_caches
from nightshift.worker.decode import use_logits_step

# Prompts of 2 to 27 tokens: in 4-token chunks they are done over several steps.
PROMPTS = ["Hi", "The night shift starts at ten and ends when the work is done",
           "What is the capital of France?", "Count from one to ten, slowly, and then back "
           "down to one again, please, with a pause", "Tests find mistakes", "One, two,"]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return mlx_lm.load(str(tiny_llama_dir))


def run(model, tok, generator_class, *, late: list[str] = (), each_step=None):
    """Greedy tokens of PROMPTS (and of ``late``, inserted at the second step), and the
    step at which each request gave its first token; ``each_step(gen, uids)`` is called
    before every step."""
    gen = generator_class(model, max_tokens=6, completion_batch_size=8, prefill_batch_size=8,
                          prefill_step_size=4)
    use_logits_step(gen)
    uids = gen.insert([tok.encode(p) for p in PROMPTS])
    out, first = {}, {}
    for step in range(1, 200):
        if step == 2 and late:
            uids += gen.insert([tok.encode(p) for p in late])
        if each_step:
            each_step(gen, uids)
        _, responses = gen.next()
        for r in responses:
            first.setdefault(r.uid, step)
            out.setdefault(r.uid, []).append(r.token)
    gen.close()
    return [out.get(u) for u in uids], [first.get(u) for u in uids]


def test_an_admission_starts_decoding_in_one_step_with_mlx_lms_tokens(tiny):
    model, tok = tiny
    ours, our_first = run(model, tok, CohortBatchGenerator)
    theirs, their_first = run(model, tok, BatchGenerator)
    assert ours == theirs
    assert all(len(t) == 6 for t in ours)
    assert len(set(their_first)) > 2  # mlx-lm: graduations over several steps
    assert set(our_first) == {max(their_first)}  # here: one, when the longest is done


def test_a_later_admission_graduates_on_its_own(tiny):
    model, tok = tiny
    late = ["Late, short", "Short"]  # done while the first admission still prefills
    ours, our_first = run(model, tok, CohortBatchGenerator, late=late)
    theirs, their_first = run(model, tok, BatchGenerator, late=late)
    assert ours == theirs
    first, second = set(our_first[:len(PROMPTS)]), set(our_first[len(PROMPTS):])
    assert first == {max(their_first[:len(PROMPTS)])}
    assert second == {max(their_first[len(PROMPTS):])}
    assert max(second) < min(first)  # not held for the first admission


def test_a_held_prompt_can_be_removed(tiny):
    """The short prompts are held while the long ones prefill; the first one held is
    removed: it gives no tokens, and the others give theirs."""
    model, tok = tiny
    removed = []

    def remove_a_held_one(gen, uids):
        if gen._held and not removed:
            removed.append(gen._held[0][0].uids[0])
            gen.remove(removed)

    ours, _ = run(model, tok, CohortBatchGenerator, each_step=remove_a_held_one)
    theirs, _ = run(model, tok, BatchGenerator)
    gone = removed[0]
    assert ours[gone] is None
    assert [t for i, t in enumerate(ours) if i != gone] == [
        t for i, t in enumerate(theirs) if i != gone]


def _cache(rows: int, idx: int, left: list[int], size: int) -> BatchKVCache:
    cache = BatchKVCache(left)
    cache.keys = mx.random.normal((rows, 2, size, 4))
    cache.values = mx.random.normal((rows, 2, size, 4))
    cache._idx = idx
    cache.offset = mx.array([idx - pad for pad in left])
    return cache


def test_joined_caches_hold_what_mlx_lms_extend_gives():
    parts = [(3, 10, [0, 4, 7], 256), (2, 30, [5, 0], 256), (1, 3, [1], 256)]
    mx.random.seed(0)
    ours = [_cache(*p) for p in parts]
    mx.random.seed(0)
    theirs = [_cache(*p) for p in parts]
    joined = join_caches(ours)
    for c in theirs[1:]:
        theirs[0].extend(c)
    extended = theirs[0]
    assert joined._idx == extended._idx == 30
    assert joined.left_padding.tolist() == extended.left_padding.tolist()
    assert joined.offset.tolist() == extended.offset.tolist()
    for row, pad in enumerate(joined.left_padding.tolist()):  # the rows' own positions
        k, _ = joined.keys_and_values()
        e, _ = extended.keys_and_values()
        assert mx.array_equal(k[row, :, pad:], e[row, :, pad:])
    assert joined.keys.shape[2] >= joined._idx
