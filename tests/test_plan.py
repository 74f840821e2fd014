"""worker/plan.py: device, BLAS and weight dtype chosen for the machine, and applied."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from nightshift.worker import blas
from nightshift.worker.plan import (
    ComputePlan,
    apply_plan,
    choose_plan,
    kv_dtype_bytes,
    planned_dtype,
    quantization_of,
)


@pytest.fixture
def tiny(tiny_llama_dir):
    return mlx_lm.load(str(tiny_llama_dir))


@pytest.fixture
def quantized_tiny(tiny):
    model, tokenizer = tiny
    nn.quantize(model, group_size=32, bits=4)
    return model, tokenizer


def test_cpu_plan_dequantizes_to_float32_with_openblas(quantized_tiny, monkeypatch):
    model, _ = quantized_tiny
    monkeypatch.setattr(blas, "openblas_loaded", lambda pid="self": True)
    plan = choose_plan(model)
    assert (plan.device, plan.blas, plan.loaded, plan.weights) == ("cpu", "openblas", "4-bit",
                                                                   "float32")
    assert "4-bit -> float32" in plan.describe()
    assert planned_dtype({"quantization": {"bits": 4}}) == "float32"


def test_cpu_plan_without_openblas_prefers_bfloat16_for_quantized(quantized_tiny, monkeypatch):
    model, _ = quantized_tiny
    monkeypatch.setattr(blas, "openblas_loaded", lambda pid="self": False)
    assert choose_plan(model).weights == "bfloat16"


def test_float32_model_stays_as_loaded_and_flags_override(tiny):
    model, _ = tiny
    assert choose_plan(model).weights == "as-loaded"
    plan = choose_plan(model, dtype="float16", batch_size=12)
    assert (plan.weights, plan.batch_size) == ("float16", 12)
    with pytest.raises(ValueError, match="float8"):
        choose_plan(model, dtype="float8")


def test_apply_plan_dequantizes_every_layer_and_keeps_the_output(quantized_tiny):
    model, _ = quantized_tiny
    tokens = mx.array([[5, 6, 7, 8]])
    before = model(tokens)
    plan = ComputePlan("cpu", "openblas", "float32", "4-bit")
    apply_plan(model, plan)
    assert quantization_of(model) is None
    assert all(v.dtype == mx.float32 for _, v in nn.utils.tree_flatten(model.parameters()))
    assert mx.allclose(model(tokens), before, atol=1e-4)
    assert kv_dtype_bytes(model) == 4

