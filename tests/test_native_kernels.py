"""MLX's CPU kernels built for this machine (worker/native_kernels.py) give MLX's own
results bit for bit: attention against ``mx.fast.scaled_dot_product_attention`` for
every mask it takes, softmax against ``mx.softmax``, a compiled kernel and a model's
greedy tokens with the flags and without."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from nightshift.worker import cpu_kernels, native_kernels

from tests.chaos import env, run_script

REPO = Path(__file__).resolve().parent.parent
# MLX's own, also once a model loaded in this session has installed ours.
ORIGINAL_SDPA = getattr(mx.fast.scaled_dot_product_attention, "__wrapped__",
                        mx.fast.scaled_dot_product_attention)


def random(rng, *shape, scale=1.0):
    return mx.array((rng.standard_normal(shape) * scale).astype(np.float32))


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("length,context", [(1, 1), (1, 200), (7, 7), (64, 64), (64, 344)])
def test_attention_is_mlx_s_to_the_bit(heads, kv_heads, length, context):
    rng = np.random.default_rng(length * 1000 + context + heads)
    batch, dim = 3, 64
    q = random(rng, batch, heads, length, dim, scale=3)
    k = random(rng, batch, kv_heads, context, dim, scale=3)
    v = random(rng, batch, kv_heads, context, dim)
    causal = np.tril(np.ones((length, context), bool), k=context - length)
    padded = causal[None, None].repeat(batch, 0)
    padded[0, :, :, : context // 3] = False  # a left-padded row, as a batch has
    padded[0, :, :, 0] = True
    masks = [None, "causal", mx.array(causal), mx.array(padded),
             mx.array(np.where(padded, 0.0, -1e9).astype(np.float32)),
             mx.array(np.broadcast_to(padded, (batch, heads, length, context)).copy())]
    scale = dim ** -0.5
    for mask in masks:
        if isinstance(mask, str) and length > context:
            continue
        expected = ORIGINAL_SDPA(q, k, v, scale=scale, mask=mask)
        got = native_kernels.attention(q, k, v, scale=scale, mask=mask)
        assert got.shape == expected.shape
        assert mx.array_equal(got, expected).item(), (heads, kv_heads, length, context, mask)


def test_softmax_is_mlx_s_to_the_bit():
    rng = np.random.default_rng(1)
    for shape in [(4, 1), (3, 9, 64, 200), (2, 4096), (5, 40000)]:
        x = rng.standard_normal(shape).astype(np.float32) * 8
        x[..., ::7] = -np.inf  # masked positions
        x[0, ...] = np.float32(np.finfo(np.float32).min)  # a row masked whole
        x = mx.array(x)
        assert mx.array_equal(native_kernels.softmax(x), mx.softmax(x, axis=-1, precise=True),
                              equal_nan=True).item(), shape


COMPARE = """
import json, sys
import mlx.core as mx, mlx.nn as nn, numpy as np
from nightshift.worker import native_kernels
on = native_kernels.enable()
x = mx.array(np.random.default_rng(0).standard_normal((64, 1536)).astype(np.float32) * 4)
swiglu = mx.compile(lambda g, u: nn.silu(g) * u)
out = swiglu(x, x[::-1])
import os
print(json.dumps({"on": on, "tmpdir": os.environ.get("TMPDIR"),
                  "bits": np.array(out).view(np.uint32).tolist()[:4096:7]}))
"""


def test_compiled_kernels_are_built_for_this_machine_with_the_same_bits(home):
    runs = {}
    for flag in ("1", "0"):
        proc = subprocess.run([sys.executable, "-c", COMPARE], cwd=REPO, capture_output=True,
                              text=True, timeout=300,
                              env=env(NIGHTSHIFT_NATIVE_KERNELS=flag))
        assert proc.returncode == 0, proc.stderr
        runs[flag] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs["1"]["on"] and not runs["0"]["on"]
    assert runs["1"]["bits"] == runs["0"]["bits"]
    folder = Path(runs["1"]["tmpdir"]).parent
    assert folder.name.startswith("nightshift-kernels-") and folder.stat().st_mode & 0o077 == 0
    wrapper = (folder / "bin" / "g++").read_text()
    assert "-march=native" in wrapper and "-ffp-contract=off" in wrapper
    assert list((folder / "tmp").rglob("*.so")), "no kernel was built in the machine's folder"
    # MLX's builds get the flags; any other build through the wrapper (a --notify
    # command inherits PATH) is the compiler's own.
    def macros(compiler, *args):
        return subprocess.run([compiler, *args, "-dM", "-E", "-x", "c", "/dev/null"],
                              capture_output=True, text=True, check=True).stdout

    compiler = re.search(r'exec "([^"]+)"', wrapper)[1]
    built = folder / "bin" / "g++"
    assert macros(built) == macros(compiler)
    assert macros(built, "-I", "/x/mlx/include") != macros(compiler, "-I", "/x/mlx/include")


GREEDY = """
import json, sys
from nightshift.worker import loader
loaded = loader.load(sys.argv[1], loader.LoadOptions(batch_size=4))
from mlx_lm.generate import batch_generate
prompts = [[1, 5, 9, 200, 33], [7, 7, 7], list(range(3, 90))]
out = batch_generate(loaded.model, loaded.tokenizer, prompts, max_tokens=24)
print(json.dumps({"plan": loaded.plan.describe(), "texts": out.texts}))
"""


def test_a_model_gives_the_same_greedy_tokens(tiny_model):
    runs = {flag: run_script(GREEDY, tiny_model, NIGHTSHIFT_NATIVE_KERNELS=flag)
            for flag in ("1", "0")}
    assert "kernels for this CPU" in runs["1"]["plan"]
    assert "kernels for this CPU" not in runs["0"]["plan"]
    assert runs["1"]["texts"] == runs["0"]["texts"]


@pytest.mark.skipif(cpu_kernels.library() is None,
                    reason="nightshift's CPU kernels need x86-64 with AVX-512 and g++")
def test_swiglu_is_mlx_lm_s_to_the_bit():
    from mlx_lm.models.activations import swiglu

    rng = np.random.default_rng(3)
    # Every 97th float32 bit pattern (NaNs, infinities, subnormals, both signs), then
    # random values at the scales a model's gates take, odd lengths for the tail.
    patterns = np.arange(0, 2**32, 97, dtype=np.uint64).astype(np.uint32).view(np.float32)
    cases = [(patterns, np.ones_like(patterns))]
    for scale in (0.01, 1, 8, 60, 1000):
        cases.append(((rng.standard_normal(100_003) * scale).astype(np.float32),
                      rng.standard_normal(100_003).astype(np.float32)))
    for gate, up in cases:
        expected = np.asarray(swiglu(mx.array(gate), mx.array(up)))
        got = np.asarray(native_kernels.swiglu(mx.array(gate), mx.array(up)))
        same = (got == expected) | (np.isnan(got) & np.isnan(expected))
        assert same.all(), gate[~same][:5]
    shaped = mx.array(rng.standard_normal((3, 1, 40)).astype(np.float32))
    assert native_kernels.swiglu(shaped, shaped).shape == (3, 1, 40)


@pytest.mark.skipif(cpu_kernels.library() is None,
                    reason="nightshift's CPU kernels need x86-64 with AVX-512 and g++")
@pytest.mark.parametrize("traditional", [False, True])
def test_rope_is_mlx_s_to_the_bit(traditional):
    from nightshift.worker import rope

    rope.install()
    original = rope.rope.__wrapped__
    rng = np.random.default_rng(5)
    freqs = mx.array(rng.uniform(1, 5000, 16).astype(np.float32))
    for dims, d, base, scale, custom in ((64, 64, 100000.0, 1.0, None),
                                         (32, 64, 10000.0, 0.25, None),
                                         (32, 48, None, 1.0, freqs)):
        for batch, heads, steps in ((26, 15, 1), (3, 5, 64), (1, 4, 7)):
            # As the models hand it over: (batch, steps, heads, d) seen as (.., heads, steps, d).
            x = mx.array((rng.standard_normal((batch, steps, heads, d)) * 3)
                         .astype(np.float32)).transpose(0, 2, 1, 3)
            # Per-sequence offsets past the first table's 4096 rows grow it.
            for offset in (mx.array(rng.integers(0, 9000, batch).astype(np.int32)), 17,
                           mx.array(5)):
                kwargs = dict(traditional=traditional, base=base, scale=scale, offset=offset,
                              freqs=custom)
                expected = np.asarray(original(x, dims, **kwargs))
                got = np.asarray(rope.rope(x, dims, **kwargs))
                assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    # A negative position (left padding) has no row: MLX's own computes it.
    x = mx.array(rng.standard_normal((2, 3, 4, 64)).astype(np.float32))
    offset = mx.array([-2, 5], dtype=mx.int32)
    assert np.array_equal(np.asarray(rope.rope(x, 64, traditional=traditional, base=1e4,
                                               scale=1.0, offset=offset)),
                          np.asarray(original(x, 64, traditional=traditional, base=1e4,
                                              scale=1.0, offset=offset)))
