"""The decode's matmuls from packed weights (worker/packed_linear.py) give MLX's own
results bit for bit, at every number of rows they serve, and so a model's greedy tokens;
prefill and what the plan does not cover keep MLX's matmul.

The kernel's results are compared with MLX's matmul through OpenBLAS, so those checks
run in a child process with OpenBLAS preloaded, as a worker runs."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
from nightshift.worker import blas, cpu_kernels
from nightshift.worker.plan import packs_linear_weights

from tests.chaos import run_script

REPO = Path(__file__).resolve().parent.parent

needs_kernel = pytest.mark.skipif(
    not (blas.openblas_library() and cpu_kernels.library()),
    reason="the packed kernel needs an AVX-512 CPU, OpenBLAS and g++")

EXACT = """
import json
from nightshift.worker.blas import ensure_fast_blas
ensure_fast_blas()
import mlx.core as mx
from nightshift.worker import packed_linear as pl
from nightshift.worker import cpu_kernels
library = cpu_kernels.library()
rows_from = {}
# The default model's shapes (q/o, k/v, up/gate, down, the tied lm_head) and a larger one.
# Each as float32 weights, and as float16 values in float32 (weights dequantized from 4
# bits in float16 are), which are packed as float16.
for n, k in [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576), (2048, 5632)]:
    for half in (False, True):
        weight = mx.random.normal((n, k), key=mx.random.key(n + k))
        if half:
            weight = weight.astype(mx.float16).astype(mx.float32)
        packed = pl.PackedWeight(library, weight)
        first = pl._exact_from(packed, weight)
        every = range(first or 1, pl.MAX_ROWS + 1) if n * k < 10**7 else pl.CHECK_ROWS
        wrong = []
        for rows in every:
            x = mx.random.normal((rows, k), key=mx.random.key(7 * rows))
            if rows >= (first or 1) and not mx.array_equal(packed.matmul(x), x @ weight.T).item():
                wrong.append(rows)
        rows_from[f"{n}x{k}{' half' if half else ''}"] = [first, wrong, str(packed.packed.dtype)]
print(json.dumps(rows_from))
"""


@needs_kernel
def test_the_kernel_gives_openblas_s_bits_at_every_decode_batch():
    rows_from = run_script(EXACT)
    for shape, (first, wrong, stored) in rows_from.items():
        # Served from a decode batch of 8 sequences at most, never with other bits.
        assert first is not None and first <= 8, (shape, first)
        assert wrong == [], shape
        assert stored == ("uint16" if shape.endswith("half") else "float32"), shape


GREEDY = """
import json, sys
from nightshift.worker.blas import ensure_fast_blas
ensure_fast_blas()
from nightshift.worker import loader
loaded = loader.load(sys.argv[1], loader.LoadOptions(batch_size=64))
from mlx_lm.generate import batch_generate
from nightshift.worker.packed_linear import PackedLinear
served = sorted({m._packed.min_rows for _, m in loaded.model.named_modules()
                 if isinstance(m, PackedLinear)})
prompts = [[1 + i % 7, 5, 9 + i, 200 - i, 33][: 2 + i % 4] for i in range(56)]
out = batch_generate(loaded.model, loaded.tokenizer, prompts, max_tokens=24)
print(json.dumps({"plan": loaded.plan.describe(), "served": served, "texts": out.texts}))
"""


@needs_kernel
def test_a_model_gives_the_same_greedy_tokens(tiny_model):
    runs = {flag: run_script(GREEDY, tiny_model, NIGHTSHIFT_PACKED_LINEAR=flag)
            for flag in ("1", "0")}
    assert "decode matmuls packed" in runs["1"]["plan"]
    assert "decode matmuls packed" not in runs["0"]["plan"]
    # The tiny model's matrices are small enough that OpenBLAS takes another path below
    # a few dozen rows; the 56 sequences decoded together are served by every one.
    assert runs["1"]["served"] and max(runs["1"]["served"]) <= 56
    assert runs["0"]["served"] == []
    assert runs["1"]["texts"] == runs["0"]["texts"]


def test_only_a_float32_cpu_plan_with_one_blas_thread_packs(monkeypatch):
    monkeypatch.delenv("NIGHTSHIFT_PACKED_LINEAR", raising=False)
    assert packs_linear_weights("cpu", True, 1) == blas.avx512()
    assert not packs_linear_weights("cpu", True, 2)  # OpenBLAS's threads do better
    assert not packs_linear_weights("cpu", False, 1)  # bfloat16, or quantized as loaded
    assert not packs_linear_weights("metal", False, None)
    monkeypatch.setenv("NIGHTSHIFT_PACKED_LINEAR", "0")
    assert not packs_linear_weights("cpu", True, 1)


def test_prefill_and_other_dtypes_keep_mlx_s_matmul():
    from nightshift.worker import packed_linear as pl

    packed = pl.PackedWeight.__new__(pl.PackedWeight)  # only its routing, no kernel
    packed.n, packed.k, packed.min_rows = 64, 32, 4
    assert packed.serves(mx.zeros((8, 1, 32)))  # a decode step of 8 sequences
    assert not packed.serves(mx.zeros((2, 1, 32)))  # below the rows checked exact
    assert not packed.serves(mx.zeros((8, 64, 32)))  # a prefill chunk: 512 rows
    assert not packed.serves(mx.zeros((8, 1, 32), mx.float16))


def test_openblas_k_blocks():
    from nightshift.worker.packed_linear import openblas_k_blocks

    assert openblas_k_blocks(448) == []
    assert openblas_k_blocks(576) == [288]  # one block of 448 would leave 128: halved
    assert openblas_k_blocks(1536) == [448, 896, 1216]
    assert openblas_k_blocks(4096)[-2:] == [3584, 3840]
