"""worker/memory.py: sizes from config and safetensors headers, and the peak estimate."""

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
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator
from nightshift.jobs.errors import ResourceError
from nightshift.worker import memory
from nightshift.worker.plan import ComputePlan, apply_plan, kv_dtype_bytes
from nightshift.worker.prefill import prefill_settings

from tests.tiny_models import build_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.15


@pytest.fixture(autouse=True)
def nightshift_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory, tiny_dir) -> Path:
    """The tiny model quantized to 4 bits (8 for the embedding), saved as mlx-lm does."""
    folder = tmp_path_factory.mktemp("tiny-q4")
    model, _ = mlx_lm.load(str(tiny_dir))
    nn.quantize(model, group_size=32, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and "embed" not in p)
    nn.quantize(model, group_size=32, bits=8, class_predicate=lambda p, m: "embed" in p)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = json.loads((tiny_dir / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 4,
                              "model.embed_tokens": {"group_size": 32, "bits": 8}}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_dir / name).read_bytes())
    return folder


def test_weights_bytes_reads_headers_only(tiny_dir):
    file = tiny_dir / "model.safetensors"
    header = 8 + int.from_bytes(file.read_bytes()[:8], "little")
    assert memory.weights_bytes(tiny_dir) == file.stat().st_size - header


def test_resident_bytes_of_dequantized_weights_from_parameter_counts(quantized_dir):
    stored = memory.weights_bytes(quantized_dir)
    assert memory.resident_weights_bytes(quantized_dir) == stored
    model, _ = mlx_lm.load(str(quantized_dir))
    apply_plan(model, ComputePlan("cpu", "openblas", "float32", "4/8-bit"))
    float32 = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert memory.resident_weights_bytes(quantized_dir, 4) == float32
    assert memory.resident_weights_bytes(quantized_dir, 2) == float32 // 2
    assert float32 > 4 * stored  # 4-bit weights, float32 scales: about 4.6x


def test_activation_dtype_is_the_widest_stored_float(tiny_dir, quantized_dir):
    assert memory.activation_dtype_bytes(tiny_dir) == 4
    model, _ = mlx_lm.load(str(quantized_dir))
    assert memory.activation_dtype_bytes(quantized_dir) == kv_dtype_bytes(model)


def test_kv_per_token_llama(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    # 2 layers x (K and V) x 2 kv heads x head_dim 64/4 x 4 bytes
    assert memory.kv_bytes_per_token(config, 4) == 2 * 2 * 2 * 16 * 4
    no_gqa = {**config, "num_key_value_heads": None}  # then every head has its own KV
    assert memory.kv_bytes_per_token(no_gqa, 2) == 2 * 2 * 4 * 16 * 2


def test_kv_per_token_nemotron_nas_by_hand():
    def block(**attention):
        return {"attention": {"n_heads_in_group": None, "no_op": False,
                              "replace_with_linear": False, **attention},
                "ffn": {"ffn_mult": 2.0}}

    config = {
        "model_type": "nemotron-nas", "hidden_size": 1024, "num_attention_heads": 16,
        "num_hidden_layers": 5, "num_key_value_heads": None,
        "block_configs": [block(n_heads_in_group=8),  # 16 // 8 = 2 kv heads
                          block(no_op=True),  # no attention, no cache
                          block(replace_with_linear=True),  # a linear layer, no cache
                          block(n_heads_in_group=4),  # 4 kv heads
                          block(n_heads_in_group=16)],  # 1 kv head
    }
    assert memory.kv_heads_per_layer(config) == [2, 0, 0, 4, 1]
    # (2 + 4 + 1) kv heads x head_dim 1024/16 x (K and V) x 2 bytes
    assert memory.kv_bytes_per_token(config, 2) == 7 * 64 * 2 * 2


def peak_in_fresh_process(folder, batch: int, context: int) -> int:
    """``measure_peak`` of the model in ``folder`` (loaded as the worker loads it), in a
    process of its own: MLX's peak in this one counts whatever earlier tests left alive
    or cached, and the figure moved by 20% with the order the tests ran in."""
    script = textwrap.dedent(f"""
        import json, mlx_lm
        from tests.test_memory import measure_peak
        from nightshift.worker.compat import nemotron_nas
        config = json.load(open("{folder}/config.json"))
        model, _ = mlx_lm.load("{folder}", **nemotron_nas.load_kwargs(config))
        nemotron_nas.apply(model)
        print(measure_peak(model, {batch}, {context}))
    """)
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)), timeout=300)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def measure_peak(model, batch: int, context: int, new_tokens: int = 8) -> int:
    """MLX's peak while a full batch generates up to ``context`` tokens each, with the
    engine's prefill settings."""
    vocab = model.args.vocab_size
    prompts = [[(i * 7 + j) % (vocab - 10) + 5 for j in range(context - new_tokens)]
               for i in range(batch)]
    prefill_batch, prefill_step = prefill_settings(batch)
    gen = BatchGenerator(model, max_tokens=new_tokens, completion_batch_size=batch,
                         prefill_batch_size=prefill_batch, prefill_step_size=prefill_step)
    gen.insert(prompts)
    while gen.next_generated():
        pass
    gen.close()
    return mx.get_peak_memory()


@pytest.mark.parametrize("batch,context", [(8, 1024), (16, 512)])
def test_estimate_is_within_15_percent_of_the_measured_peak(tiny_dir, batch, context):
    peak = peak_in_fresh_process(tiny_dir, batch, context)
    est = memory.estimate(tiny_dir, batch_size=batch, context_tokens=context, device="cpu")
    assert abs(est.total / peak - 1) < TOLERANCE, (est.total, peak)


def test_describe_and_check_fits(tiny_dir):
    est = memory.estimate(tiny_dir, batch_size=32, context_tokens=2048, available=20 * 10**9)
    assert est.fits
    line = est.describe()
    assert "for 32x2048 tokens" in line and "of 20.0 GB available" in line
    memory.check_fits(est)

    small = memory.estimate(tiny_dir, batch_size=32, context_tokens=2048, available=10**8)
    assert not small.fits
    with pytest.raises(ResourceError) as raised:
        memory.check_fits(small)
    message = str(raised.value)
    assert "--batch-size" in message and "--max-context" in message and "--force" in message
    memory.check_fits(small, force=True)


def test_estimate_follows_the_plan_dtype(quantized_dir):
    as_loaded = memory.estimate(quantized_dir, batch_size=4, context_tokens=256, available=10**10)
    float32 = memory.estimate(quantized_dir, batch_size=4, context_tokens=256, dtype="float32",
                              available=10**10)
    assert as_loaded.weights == memory.weights_bytes(quantized_dir)
    assert float32.weights == memory.resident_weights_bytes(quantized_dir, 4)


def test_available_bytes_is_positive():
    assert memory.available_bytes() > 0


def test_the_estimate_imports_no_mlx_no_database_no_engine():
    # It runs before a model loads (and in `models` commands): reading files only.
    code = ("import sys, nightshift.worker.memory, nightshift.worker.batch_size; "
            "print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('mlx', 'mlx_lm', 'sqlalchemy') "
            "or m in ('nightshift.worker.engine', 'nightshift.worker.loader')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# The default model at a realistic batch, in a child with OpenBLAS (the reference BLAS
# would take minutes): prints measured and estimated peaks as JSON.
SMOLLM2_CHILD = textwrap.dedent("""
    import json, sys
    from nightshift.worker.blas import ensure_fast_blas
    from nightshift.worker.plan import apply_plan, choose_plan
    ensure_fast_blas()
    import mlx.core as mx, mlx_lm
    from nightshift.worker import memory
    from tests.test_memory import measure_peak
    path, batch, context = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    model, _ = mlx_lm.load(path)
    plan = choose_plan(model)
    apply_plan(model, plan)
    peak = measure_peak(model, batch, context)
    est = memory.estimate(path, batch_size=batch, context_tokens=context, dtype=plan.weights)
    print(json.dumps({"peak": peak, "estimate": est.total, "plan": plan.describe()}))
""")


@pytest.mark.slow
def test_estimate_within_15_percent_on_the_default_model(smollm2_dir):
    out = subprocess.run([sys.executable, "-c", SMOLLM2_CHILD, str(smollm2_dir), "8", "512"],
                         cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                         timeout=600, check=True)
    result = json.loads(out.stdout.splitlines()[-1])
    assert abs(result["estimate"] / result["peak"] - 1) < TOLERANCE, result
