"""The engine on a tiny random model: batching, stops, seeds, prefix reuse, and a request
that breaks its batch failing alone."""

from __future__ import annotations

import mlx.core as mx
import mlx_lm
import pytest
from nightshift.jobs.vocabulary import Claimed
from nightshift.worker.engine import Engine
from nightshift.worker.prefix import PrefixCache, common_prefix

from tests.tiny_models import generate_single, run_engine


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return mlx_lm.load(str(tiny_llama_dir))


def claimed(i, text, kind="completion", **params):
    params.setdefault("max_tokens", 12)
    return Claimed(i, "job", i, kind, text, params, None)


def fragile(model, tok, word="zebra"):
    """The real model, except that it raises on one token, as a bad request might."""
    poison = tok.encode(word)[0]

    class Fragile:
        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, inputs, cache=None):
            if (inputs == poison).any().item():
                raise RuntimeError("poisoned")
            return model(inputs, cache=cache)

    return Fragile()


PROMPTS = ["The night shift starts", "What is the capital of France?", "Count from one to",
           "Tests find mistakes", "The sea is wide and", "Hello, world!"]


def test_batched_greedy_equals_one_at_a_time(tiny):
    model, tok = tiny
    engine = Engine(model, tok, batch_size=3, prefill_batch_size=2)
    results = run_engine(engine, [claimed(i, p) for i, p in enumerate(PROMPTS)])
    for i, p in enumerate(PROMPTS):
        tokens = tok.encode(p)
        single, _ = generate_single(model, tok, tokens, 12)
        assert results[i].response == tok.decode(single), p
        assert results[i].completion_tokens == 12 and results[i].finish_reason == "length"
        r = results[i]
        assert r.started_at <= r.first_token_at <= r.finished_at
    assert 0 < engine.occupancy() <= 1


def test_chat_template_and_system_prompt(tiny):
    model, tok = tiny
    engine = Engine(model, tok, batch_size=2)
    c = Claimed(1, "job", 0, "chat", [{"role": "user", "content": "Hello"}], {}, "be brief")
    text = tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "Hello"}],
                                   add_generation_prompt=True, tokenize=False)
    assert engine.encode(c) == tok.encode(text, add_special_tokens=False)


def test_stop_text_is_cut_and_never_included(tiny):
    model, tok = tiny
    engine = Engine(model, tok, batch_size=2)
    free = run_engine(engine, [claimed(1, PROMPTS[0], max_tokens=20)])[1].response
    stop = free.strip()[2:4]  # text the model really produces, inside a token or across two
    assert stop
    r = run_engine(engine, [claimed(2, PROMPTS[0], max_tokens=20, stop=[stop])])[2]
    assert r.finish_reason == "stop" and stop not in r.response
    assert free.startswith(r.response)


def test_seed_reproduces_sampling_whatever_the_batch(tiny):
    model, tok = tiny
    engine = Engine(model, tok, batch_size=4)
    alone = run_engine(engine, [claimed(1, PROMPTS[1], temperature=1.0, seed=7)])[1].response
    crowd = run_engine(engine, [claimed(2, PROMPTS[2], temperature=1.0, seed=1),
                         claimed(3, PROMPTS[1], temperature=1.0, seed=7),
                         claimed(4, PROMPTS[3], temperature=0.8, seed=3)])
    assert crowd[3].response == alone
    other = run_engine(engine, [claimed(5, PROMPTS[1], temperature=1.0, seed=8)])[5].response
    assert other != alone


def test_too_long_prompt_fails_alone(tiny):
    model, tok = tiny
    engine = Engine(model, tok, batch_size=2, context_length=16)
    results = run_engine(engine, [claimed(1, "word " * 40), claimed(2, "Hello")])
    assert "context window is 16" in results[1].error
    assert results[2].error is None and results[2].response is not None


def test_a_request_that_breaks_the_batch_fails_alone(tiny):
    model, tok = tiny
    engine = Engine(fragile(model, tok), tok, batch_size=4)
    results = run_engine(engine, [claimed(1, PROMPTS[0]), claimed(2, "zebra zebra"),
                           claimed(3, PROMPTS[1])])
    assert "poisoned" in results[2].error
    assert results[1].error is None and results[3].error is None
    assert results[1].response == run_engine(Engine(model, tok, batch_size=1),
                                      [claimed(9, PROMPTS[0])])[9].response


def test_two_requests_that_always_break_the_batch_each_fail_alone(tiny):
    """Rerun one at a time, each suspect that breaks its step alone fails, even while
    another suspect waits; the engine does not put them back forever."""
    model, tok = tiny
    engine = Engine(fragile(model, tok), tok, batch_size=4)
    batch = [claimed(1, PROMPTS[0]), claimed(2, "zebra"), claimed(3, "zebra zebra"),
             claimed(4, PROMPTS[1])]
    results = run_engine(engine, batch)
    assert set(results) == {1, 2, 3, 4}
    assert "poisoned" in results[2].error and "poisoned" in results[3].error
    assert results[1].error is None and results[4].error is None
    assert not engine.suspects and engine.free_slots() == 4


def test_a_request_longer_than_the_memory_plan_fails_alone(tiny):
    model, tok = tiny
    engine = Engine(model, tok, batch_size=2, planned_tokens=64)
    results = run_engine(engine, [claimed(1, "Hello", max_tokens=200), claimed(2, "Hello")])
    assert "plus max_tokens (200) is more than the 64 tokens" in results[1].error
    assert "--max-context" in results[1].error
    assert results[2].error is None and results[2].response is not None


def test_isolated_requests_run_apart(tiny):
    model, tok = tiny
    engine = Engine(model, tok, batch_size=4)
    engine.add([claimed(1, PROMPTS[0])], isolated=True)
    assert engine.free_slots() == 0  # nothing joins a request lost with a dead worker
    while engine.busy:
        engine.step()
    assert engine.free_slots() == 4
    engine.add([claimed(2, PROMPTS[1])])
    assert engine.free_slots() == 3


def test_prefix_reuse_gives_identical_greedy_output_with_less_prefill(tiny):
    model, tok = tiny
    system = "The quick brown fox jumps over the lazy dog. " * 8
    batch = [claimed(i, system + p) for i, p in enumerate(PROMPTS)]
    plain = run_engine(Engine(model, tok, batch_size=6), batch)
    prefixes = PrefixCache(model, min_tokens=16)
    engine = Engine(model, tok, batch_size=6, prefix_cache=prefixes)
    reused = run_engine(engine, batch)
    for i in plain:
        assert reused[i].response == plain[i].response
        assert reused[i].cached_tokens > 40 and plain[i].cached_tokens == 0
    assert len(prefixes.entries) == 1
    # Later requests with the same prefix reuse the entry without building another.
    built = prefixes.built_tokens
    again = run_engine(engine, [claimed(10, system + "Another question")])
    assert again[10].cached_tokens > 40 and prefixes.built_tokens == built


def test_prefix_cache_is_bounded(tiny):
    model, tok = tiny
    one = PrefixCache(model, min_tokens=4)
    base = tok.encode("The quick brown fox jumps")
    one.learn([base + [5], base + [6]])
    size = one.nbytes
    bounded = PrefixCache(model, min_tokens=4, budget_bytes=int(size * 1.5))
    for word in ("alpha", "beta", "gamma"):
        base = tok.encode(f"{word} " * 12)
        bounded.learn([base + [5], base + [6]])
    assert len(bounded.entries) == 1 and bounded.nbytes <= size * 1.5


def test_common_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == [1, 2]
    assert common_prefix([[1], [2]]) == []
    assert mx is not None
