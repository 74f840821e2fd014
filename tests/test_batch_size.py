"""worker/batch_size.py: the batch size measured once per model and plan, and remembered."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx_lm
import pytest
from nightshift.worker import batch_size
from nightshift.worker.plan import ComputePlan, choose_plan


@pytest.fixture
def tiny(tiny_llama_dir):
    return mlx_lm.load(str(tiny_llama_dir))


def test_measure_batch_size_on_the_tiny_model(tiny, caplog):
    model, tokenizer = tiny
    with caplog.at_level("INFO", logger=batch_size.log.name):
        best, curve = batch_size.measure_batch_size(model, tokenizer, candidates=(2, 4, 8),
                                                    prompt_len=16, new_tokens=4)
    assert best in curve and set(curve) <= {2, 4, 8}
    assert all(rate > 0 for rate in curve.values())
    # Progress as it goes: the first start of a worker waits on this.
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("measuring the batch size, once for this model and machine")
    assert [line.split(":")[0].strip() for line in lines[1:]] == [f"batch {b}" for b in curve]


def test_measure_batch_size_skips_what_does_not_fit(tiny):
    model, tokenizer = tiny
    _, curve = batch_size.measure_batch_size(model, tokenizer, candidates=(2, 4, 8),
                                             prompt_len=16, new_tokens=2,
                                             max_batch_size=4)
    assert set(curve) <= {2, 4}


def test_the_largest_batch_on_the_plateau_is_chosen():
    # Measured curves from this machine: 48 and 64 within noise of each other.
    assert batch_size.pick_batch_size({8: 59, 16: 101, 32: 123, 48: 133, 64: 123}) == 64
    assert batch_size.pick_batch_size({8: 91, 16: 130, 32: 169, 48: 181, 64: 180}) == 64
    assert batch_size.pick_batch_size({16: 130, 32: 169, 48: 181, 64: 150}) == 48
    assert batch_size.pick_batch_size({8: 100}) == 8


def test_a_remembered_curve_is_chosen_from_by_todays_rule(tiny_llama_dir, tiny):
    model, _ = tiny
    plan = choose_plan(model)
    batch_size.remember_batch_size(tiny_llama_dir, plan, 48, {32: 121.0, 48: 124.0, 64: 121.0})
    assert batch_size.remembered_batch_size(tiny_llama_dir, plan) == 64


def test_batch_size_is_measured_once_then_remembered(tiny_llama_dir, tiny, monkeypatch):
    model, tokenizer = tiny
    plan = choose_plan(model)
    monkeypatch.setattr(batch_size, "_others_cpu_seconds", lambda: 0.0)  # a quiet machine
    first = batch_size.cached_batch_size(tiny_llama_dir, model, tokenizer, plan, candidates=(2, 4),
                                         prompt_len=8, new_tokens=2)
    assert set(plan.batch_curve) == {2, 4}
    stored = json.loads((Path(os.environ["NIGHTSHIFT_HOME"]) / "cache" /
                         batch_size.BATCH_CACHE_FILE).read_text())
    assert [e["batch_size"] for e in stored.values()] == [first]

    def must_not_measure(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(batch_size, "measure_batch_size", must_not_measure)
    assert batch_size.cached_batch_size(tiny_llama_dir, model, tokenizer, plan) == first
    # Another dtype is another measurement.
    other = ComputePlan(plan.device, plan.blas, "bfloat16", plan.loaded)
    assert batch_size.remembered_batch_size(tiny_llama_dir, other) is None


def test_a_measurement_under_contention_is_not_remembered(tiny_llama_dir, tiny, monkeypatch):
    model, tokenizer = tiny
    plan = choose_plan(model)
    readings = iter([0.0, 1e6])  # other processes took all the CPU meanwhile
    monkeypatch.setattr(batch_size, "_others_cpu_seconds", lambda: next(readings))
    best = batch_size.cached_batch_size(tiny_llama_dir, model, tokenizer, plan, candidates=(2, 4),
                                        prompt_len=8, new_tokens=2)
    assert best in (2, 4)
    assert batch_size.remembered_batch_size(tiny_llama_dir, plan) is None
