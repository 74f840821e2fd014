"""The engine's decode step (worker/decode.py) against mlx-lm's own: the same tokens,
greedy and seeded, with no log-softmax over the vocabulary for greedy rows."""

from __future__ import annotations

import mlx_lm
import pytest
from mlx_lm.generate import BatchGenerator
from nightshift.worker.decode import use_logits_step
from nightshift.worker.engine import seeded_sampler

PROMPTS = ["The night shift starts", "What is the capital of France?", "Count from one to",
           "Tests find mistakes", "The sea is wide and", "Hello, world!", "One, two,"]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return mlx_lm.load(str(tiny_llama_dir))


def generate(model, tok, *, logits_step: bool, seeds: list) -> tuple[dict, list]:
    """Every prompt through a BatchGenerator of 3 (so requests join and leave the batch);
    seeds[i] None is greedy. Returns the tokens per prompt and the responses' logprobs."""
    gen = BatchGenerator(model, max_tokens=20, completion_batch_size=3, prefill_batch_size=2)
    if logits_step:
        use_logits_step(gen)
    samplers = [None if s is None else seeded_sampler(0.9, 0.95, s) for s in seeds]
    uids = gen.insert([tok.encode(p) for p in PROMPTS], samplers=samplers)
    out, logprobs = {u: [] for u in uids}, []
    while responses := gen.next_generated():
        for r in responses:
            out[r.uid].append(r.token)
            logprobs.append(r.logprobs)
    gen.close()
    return [out[u] for u in uids], logprobs


@pytest.mark.parametrize("seeds", [[None] * 7, [None, 1, None, 2, 3, None, 4], list(range(7))],
                         ids=["greedy", "mixed", "seeded"])
def test_the_logits_step_gives_mlx_lms_tokens(tiny, seeds):
    model, tok = tiny
    ours, our_logprobs = generate(model, tok, logits_step=True, seeds=seeds)
    theirs, _ = generate(model, tok, logits_step=False, seeds=seeds)
    assert ours == theirs
    assert all(len(t) == 20 for t in ours)
    assert all(lp is None for lp in our_logprobs)  # none were computed for the answers


def test_only_an_empty_generator_takes_the_step(tiny):
    model, tok = tiny
    gen = BatchGenerator(model, max_tokens=4)
    gen.insert([tok.encode("Hello")])
    gen.next()
    gen.next()
    with pytest.raises(RuntimeError, match="before requests are inserted"):
        use_logits_step(gen)
    gen.close()


def test_finished_rows_ride_along_until_a_quarter_of_the_batch_is_done(tiny):
    """Rows that finish at different steps: the same tokens as mlx-lm's, and the cache
    copied only once a quarter of the rows (2 of 8) have finished, or at once where
    requests wait for room."""
    model, tok = tiny
    budgets = [3, 6, 9, 12, 20, 20, 20, 20]

    def run(logits_step: bool, late: bool = False):
        gen = BatchGenerator(model, max_tokens=20, completion_batch_size=8,
                             prefill_batch_size=8)
        if logits_step:
            use_logits_step(gen)
        uids = gen.insert([tok.encode(p) for p in PROMPTS[:7] + ["Hi"]], max_tokens=budgets)
        out, rows = {u: [] for u in uids}, []
        while responses := gen.next_generated():
            for r in responses:
                out.setdefault(r.uid, []).append(r.token)
            rows.append(len(gen._generation_batch.uids))
            if late and len(rows) == 4:  # a request now waits for room: no riding along
                gen.insert([tok.encode("Late")], max_tokens=[2])
        gen.close()
        return [out[u] for u in uids], rows

    ours, rows = run(True)
    theirs, their_rows = run(False)
    assert ours == theirs
    assert [len(t) for t in ours] == budgets
    assert their_rows[:12] == [8, 8, 7, 7, 7, 6, 6, 6, 5, 5, 5, 4]
    # The first finished row (after 3 tokens) rides along; the second (6) takes both out.
    assert rows[:12] == [8, 8, 8, 8, 8, 6, 6, 6, 6, 6, 6, 4]
    _, late_rows = run(True, late=True)
    assert late_rows[4] == 7  # the 6-token row left at once, the late request joined
