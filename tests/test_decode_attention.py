"""A decode step's attention in one pass (worker/decode_attention.py) gives MLX's own
attention bit for bit where it serves, and so the default model's greedy tokens; where
MLX's matmul is another BLAS's, its check at the first call keeps MLX's path.

MLX's matmuls reach OpenBLAS's small-matrix kernels only with OpenBLAS preloaded, so the
comparisons run in a child process that preloads it, as a worker does."""

from __future__ import annotations

import pytest
from nightshift.worker import blas, cpu_kernels

from tests.chaos import run_script

needs_kernel = pytest.mark.skipif(
    not (blas.openblas_library() and cpu_kernels.library()),
    reason="the decode attention kernel needs an AVX-512 CPU, OpenBLAS and g++")

# Counts the calls that go through the kernel (decode_attention imported).
COUNT_SERVED = """
served = []
counted = decode_attention.attend
def attend(*args, **kwargs):
    served.append(1)
    return counted(*args, **kwargs)
decode_attention.attend = attend
"""

EXACT = """
import json, sys
from nightshift.worker.blas import ensure_fast_blas
ensure_fast_blas(enabled=sys.argv[1] == "openblas")
import numpy as np
import mlx.core as mx
from nightshift.worker import decode_attention, native_kernels
native_kernels.enable()
mlx_s = mx.fast.scaled_dot_product_attention.__wrapped__
enabled = decode_attention.enabled(mlx_s)  # its check runs once, before the count starts
""" + COUNT_SERVED + """
rng = np.random.default_rng(3)
lengths = [1, 2, 3, 4, 5, 6, 7, 17, 64, 127, 301, decode_attention.MAX_LENGTH,
           decode_attention.MAX_LENGTH + 1]
cases, wrong = 0, []
for length in lengths:
    for masked in ("none", "each", "shared", "2-d"):
        batch = int(rng.integers(1, 6))
        n_kv, repeats = int(rng.choice([1, 3])), int(rng.choice([1, 3, 5, 8]))
        dims = int(rng.choice([64, 128])) if length * 128 <= 10**6 else 64
        q = mx.array(rng.normal(size=(batch, n_kv * repeats, 1, dims)).astype(np.float32) * 3)
        # Keys and values as a KV cache hands them over: a slice of a longer buffer.
        k, v = (mx.array(rng.normal(size=(batch, n_kv, length + 9, dims)).astype(np.float32))
                [:, :, :length, :] for _ in range(2))
        starts = rng.integers(0, max(1, length // 2), size=batch)
        mask = {"none": None,
                "each": mx.array(np.arange(length)[None] >= starts[:, None]),
                "shared": mx.array(np.arange(length)[None] >= starts[:1, None]),
                "2-d": mx.array(np.arange(length)[None] >= starts[:1, None])}[masked]
        if mask is not None and masked != "2-d":
            mask = mask.reshape(mask.shape[0], 1, 1, length)
        ours = mx.fast.scaled_dot_product_attention(q, k, v, scale=dims**-0.5, mask=mask)
        theirs = mlx_s(q, k, v, scale=dims**-0.5, mask=mask)
        cases += 1
        if not np.array_equal(np.asarray(ours).view(np.uint32), np.asarray(theirs).view(np.uint32)):
            wrong.append([length, masked, batch, n_kv, repeats, dims])
print(json.dumps({"enabled": enabled, "served": len(served),
                  "cases": cases, "wrong": wrong}))
"""


@needs_kernel
def test_the_kernel_gives_mlx_s_bits_at_every_context_length_and_mask():
    run = run_script(EXACT, "openblas")
    assert run["enabled"]
    assert run["wrong"] == []
    # Every case but the 4 beyond OpenBLAS's small kernels went through the kernel.
    assert run["served"] == run["cases"] - 4


@needs_kernel
def test_with_another_blas_the_check_keeps_mlx_s_attention():
    run = run_script(EXACT, "reference")  # MLX's own BLAS sums in other orders
    assert not run["enabled"]
    assert run["served"] == 0
    assert run["wrong"] == []


@needs_kernel
def test_turned_off_it_serves_nothing():
    run = run_script(EXACT, "openblas", NIGHTSHIFT_DECODE_ATTENTION="0")
    assert not run["enabled"] and run["served"] == 0 and run["wrong"] == []


def test_what_it_serves():
    import mlx.core as mx
    from nightshift.worker.decode_attention import MAX_LENGTH, serves

    q, kv = mx.zeros((4, 9, 1, 64)), mx.zeros((4, 3, 100, 64))
    padding = mx.ones((4, 1, 1, 100), mx.bool_)
    assert serves(q, kv, kv, None) and serves(q, kv, kv, padding)
    assert serves(q, kv, kv, padding[:1]) and serves(q, kv, kv, padding[0, 0])
    assert not serves(mx.zeros((4, 9, 8, 64)), kv, kv, None)  # a prefill chunk
    assert not serves(q, kv, kv, "causal")
    assert not serves(q, kv, kv, mx.zeros((4, 1, 1, 100)))  # an additive mask
    assert not serves(q.astype(mx.float16), kv, kv, None)
    assert not serves(mx.zeros((4, 9, 1, 16)), mx.zeros((4, 3, 100, 16)),
                      mx.zeros((4, 3, 100, 16)), None)  # heads of 16: OpenBLAS's other path
    longer = mx.zeros((4, 3, MAX_LENGTH + 1, 64))
    assert not serves(q, longer, longer, None)


GREEDY = """
import json, sys
from nightshift.worker.blas import ensure_fast_blas
ensure_fast_blas()
from nightshift.worker import decode_attention, loader
loaded = loader.load(sys.argv[1], loader.LoadOptions(batch_size=32))
from mlx_lm.generate import batch_generate
""" + COUNT_SERVED + """
prompts = [[1 + i % 7, 5, 9 + i, 200 - i, 33, 4000 + 97 * i][: 2 + i % 5] for i in range(24)]
out = batch_generate(loaded.model, loaded.tokenizer, prompts, max_tokens=16)
print(json.dumps({"served": len(served), "texts": out.texts}))
"""


@needs_kernel
def test_the_default_model_gives_the_same_greedy_tokens(smollm2):
    runs = {flag: run_script(GREEDY, smollm2, NIGHTSHIFT_DECODE_ATTENTION=flag)
            for flag in ("1", "0")}
    assert runs["1"]["served"] >= 30 * 15  # every layer's attention at every decode step
    assert runs["0"]["served"] == 0
    assert runs["1"]["texts"] == runs["0"]["texts"]
