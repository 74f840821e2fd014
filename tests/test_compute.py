"""worker/blas.py (OpenBLAS re-exec), worker/plan.py (the compute plan) and
worker/batch_size.py (batch-size measurement and its cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest

from tests.tiny_models import build_tiny_llama
from worker import batch_size, blas
from worker.plan import (
    ComputePlan,
    apply_plan,
    choose_plan,
    kv_dtype_bytes,
    planned_dtype,
    quantization_of,
)

ROOT = Path(__file__).resolve().parents[1]
linux_cpu = pytest.mark.skipif(
    not sys.platform.startswith("linux") or blas.mlx_backend() != "cpu"
    or blas.openblas_library() is None,
    reason="OpenBLAS preloading is for Linux with MLX's CPU backend and cmeel-openblas",
)


@pytest.fixture(autouse=True)
def nightshift_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    for name in ("NIGHTSHIFT_BLAS", blas.REEXEC_MARK_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def tiny(tiny_dir):
    return mlx_lm.load(str(tiny_dir))


@pytest.fixture
def quantized_tiny(tiny):
    model, tokenizer = tiny
    nn.quantize(model, group_size=32, bits=4)
    return model, tokenizer


# A child that goes through ensure_fast_blas, then checks a matmul against numpy
# and waits so the parent can read its memory map.
CHILD = textwrap.dedent("""
    import sys
    from worker.blas import ensure_fast_blas
    ensure_fast_blas()
    import mlx.core as mx, numpy as np
    a = mx.random.normal((64, 384)); b = mx.random.normal((384, 256))
    err = float(np.abs(np.array(a @ b) - np.array(a) @ np.array(b)).max())
    print(err, flush=True)
    sys.stdin.readline()
""")


def run_child(env_extra: dict[str, str] | None = None) -> tuple[bool, float]:
    """Start CHILD; return (OpenBLAS mapped in it, matmul error)."""
    env = {**os.environ, **(env_extra or {})}
    child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        err = float(child.stdout.readline())
        # execve keeps the pid: this is the re-executed process.
        mapped = blas.openblas_loaded(child.pid)
        child.communicate("\n", timeout=60)
    finally:
        child.kill()
    assert child.returncode == 0
    return mapped, err


@linux_cpu
def test_openblas_library_is_the_cmeel_one():
    path = blas.openblas_library()
    assert path.endswith("cmeel.prefix/lib/libopenblas.so.0")
    assert Path(path).is_file()


@linux_cpu
def test_child_started_through_ensure_fast_blas_maps_openblas_and_computes_right():
    mapped, err = run_child()
    assert mapped
    assert err < 1e-3


@linux_cpu
def test_reference_setting_keeps_the_bundled_blas():
    mapped, err = run_child({"NIGHTSHIFT_BLAS": "reference"})
    assert not mapped
    assert err < 1e-3


@linux_cpu
def test_a_marked_process_never_re_executes():
    # The mark without the preload: it must carry on rather than exec again.
    mapped, _ = run_child({blas.REEXEC_MARK_ENV: "1"})
    assert not mapped


@linux_cpu
def test_fast_blas_env_sets_threads_unless_given():
    env = blas.fast_blas_env({"OPENBLAS_CORETYPE": "Haswell"})
    assert blas.openblas_library() in env["LD_PRELOAD"]
    assert int(env["OPENBLAS_NUM_THREADS"]) >= 1
    assert env["OPENBLAS_CORETYPE"] == "Haswell"
    assert blas.fast_blas_env({"OPENBLAS_NUM_THREADS": "7"})["OPENBLAS_NUM_THREADS"] == "7"


def test_ensure_fast_blas_disabled_returns():
    blas.ensure_fast_blas(enabled=False)  # would not return if it re-executed


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


def test_measure_batch_size_on_the_tiny_model(tiny):
    model, tokenizer = tiny
    best, curve = batch_size.measure_batch_size(model, tokenizer, candidates=(2, 4, 8),
                                             prompt_len=16, new_tokens=4)
    assert best in curve and set(curve) <= {2, 4, 8}
    assert all(rate > 0 for rate in curve.values())


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


def test_a_remembered_curve_is_chosen_from_by_todays_rule(tiny_dir, tiny):
    model, _ = tiny
    plan = choose_plan(model)
    batch_size.remember_batch_size(tiny_dir, plan, 48, {32: 121.0, 48: 124.0, 64: 121.0})
    assert batch_size.remembered_batch_size(tiny_dir, plan) == 64


def test_batch_size_is_measured_once_then_remembered(tiny_dir, tiny, monkeypatch):
    model, tokenizer = tiny
    plan = choose_plan(model)
    monkeypatch.setattr(batch_size, "_others_cpu_seconds", lambda: 0.0)  # a quiet machine
    first = batch_size.cached_batch_size(tiny_dir, model, tokenizer, plan, candidates=(2, 4),
                                      prompt_len=8, new_tokens=2)
    assert set(plan.batch_curve) == {2, 4}
    stored = json.loads((Path(os.environ["NIGHTSHIFT_HOME"]) / "cache" /
                         batch_size.BATCH_CACHE_FILE).read_text())
    assert [e["batch_size"] for e in stored.values()] == [first]

    def must_not_measure(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(batch_size, "measure_batch_size", must_not_measure)
    assert batch_size.cached_batch_size(tiny_dir, model, tokenizer, plan) == first
    # Another dtype is another measurement.
    other = ComputePlan(plan.device, plan.blas, "bfloat16", plan.loaded)
    assert batch_size.remembered_batch_size(tiny_dir, other) is None


def test_a_measurement_under_contention_is_not_remembered(tiny_dir, tiny, monkeypatch):
    model, tokenizer = tiny
    plan = choose_plan(model)
    readings = iter([0.0, 1e6])  # other processes took all the CPU meanwhile
    monkeypatch.setattr(batch_size, "_others_cpu_seconds", lambda: next(readings))
    best = batch_size.cached_batch_size(tiny_dir, model, tokenizer, plan, candidates=(2, 4),
                                     prompt_len=8, new_tokens=2)
    assert best in (2, 4)
    assert batch_size.remembered_batch_size(tiny_dir, plan) is None
