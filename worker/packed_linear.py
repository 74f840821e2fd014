"""The linear layers of a decode step, from weights packed once (a Linux CPU with AVX-512).

A decode step multiplies a few rows (one per live sequence: 32 in each of the two
processes of a 64-prompt job here) by every weight matrix. OpenBLAS packs the weight
again at every call, and at 32 rows that packing takes as long as the multiplication
(``sgemm_incopy``, README "Speed"); from a cold cache it reaches 45-56 GFLOP/s on the
default model's shapes at 26-32 rows. ``packed_matmul`` (cpu_kernels.cpp) keeps each
weight packed in 32-column panels and streams them: 87-109 GFLOP/s there, 1.4-1.9x.
Through the worker (the benchmark's 64 prompts, two processes): serving 33.6-33.9 s ->
30.3-30.7 s, the same answers. A matrix whose every weight is a float16 exactly (as the
default model's are: MLX dequantizes 4-bit weights in float16) is packed as float16 and
widened as it streams (``packed_matmul_half``): the same values in the same sums, half the
bytes read at each step; 100 -> 80 ms for a decode step's matmuls at 32 rows, 1.08x on
one process's share of the benchmark (benchmarks/lever.py).

The results are OpenBLAS's, bit for bit: the kernel sums each output in the order
OpenBLAS's kernels do (one fused multiply-add chain per block of K, the blocks added in
order), and ``apply`` checks every weight shape against MLX's own matmul on this
machine, at each number of rows it will serve, before using it; a shape that differs
(another CPU's OpenBLAS kernels, a small-matrix path) keeps MLX's matmul. Prefill's
large matmuls (thousands of rows, where OpenBLAS runs near the CPU's peak) keep MLX's too.

On when the weights are float32 (converted, or so in the files) and each process runs
one BLAS thread (a Linux CPU's default); the packed copy adds the weights' memory again
(half of it when packed as float16; ``memory.estimate`` counts it whole).
``NIGHTSHIFT_PACKED_LINEAR=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from nightshift.worker import cpu_kernels
from nightshift.worker.plan import packs_linear_weights

log = logging.getLogger(__name__)

PANEL = 32
# Rows up to which the kernel serves a matmul: a decode step's batch. Beyond, OpenBLAS's
# blocked sgemm catches up (1.2x at 64 rows, prefill runs thousands).
MAX_ROWS = 64
# Rows at which each weight shape is checked: every small count, where OpenBLAS may
# take other paths, then a spread up to MAX_ROWS.
CHECK_ROWS = (*range(1, 9), 12, 16, 24, 31, 32, 48, 63, 64)
# OpenBLAS's blocking of K in its x86-64 AVX-512 sgemm (SGEMM_DEFAULT_Q, then halving
# what is left under two blocks): 576 -> 288 + 288, 1536 -> 448 + 448 + 320 + 320.
OPENBLAS_Q, OPENBLAS_UNROLL = 448, 16


def apply(model: Any, plan: Any) -> int:
    """Serve the model's decode-sized matmuls from packed weights where that gives
    MLX's results on this machine; returns how many weight matrices it packed."""
    # Float32 weights: converted, or so in the files (each matrix is checked below).
    float32 = plan.weights in ("float32", "as-loaded")
    if not packs_linear_weights(plan.device, float32, plan.threads):
        return 0
    library = cpu_kernels.library()
    if library is None:
        return 0
    targets = [(parent, key, child) for parent, key, child in _children(model)
               if type(child) is nn.Linear and "bias" not in child and _packable(child.weight)]
    embeddings = []
    if "lm_head" not in model:  # tied: the embedding's matrix is also the output layer
        embeddings = [m for _, m in model.named_modules()
                      if isinstance(m, nn.Embedding) and _packable(m.weight)]
    checks = _Checks(library)
    packed = 0
    for parent, key, linear in targets:
        weight = checks.packed(linear.weight)
        if weight is not None:
            parent[key] = PackedLinear(linear.weight, weight)
            packed += 1
    for embedding in embeddings:
        weight = checks.packed(embedding.weight)
        if weight is not None:
            embedding.as_linear = _as_linear(embedding, weight)
            packed += 1
    checks.save()
    differing = sorted(shape for shape, rows in checks.rows.items() if rows is None)
    if differing:
        log.info("decode matmuls: MLX's kept for weight shapes %s (the packed kernel's "
                 "results differ from OpenBLAS's here)", differing)
    return packed


class PackedWeight:
    """A weight matrix packed for ``packed_matmul`` (cpu_kernels.cpp), and the rows it
    serves."""

    def __init__(self, library: ctypes.CDLL, weight: Any):
        self.n, self.k = weight.shape
        self.min_rows = 1  # set by the check
        source = np.ascontiguousarray(np.asarray(weight))
        pointer = cpu_kernels.pointer
        # Float16 where every weight is one (as weights dequantized from 4 bits in float16
        # are): the same values, half the bytes to stream at every decode step.
        self.packed = np.empty(self.n * self.k, np.uint16)
        self.kernel = library.packed_matmul_half
        if not library.pack_half(self.n, self.k, pointer(source), pointer(self.packed)):
            self.packed = np.empty(self.n * self.k, np.float32)
            self.kernel = library.packed_matmul
            library.pack(self.n, self.k, pointer(source), pointer(self.packed))
        splits = openblas_k_blocks(self.k)
        self.splits = (ctypes.c_long * max(1, len(splits)))(*splits)
        self.n_splits = len(splits)

    def serves(self, x: Any) -> bool:
        return x.dtype == mx.float32 and self.min_rows <= x.size // self.k <= MAX_ROWS

    def matmul(self, x: Any) -> Any:
        """``x @ weight.T`` (evaluates ``x``)."""
        rows = x.size // self.k
        source = np.ascontiguousarray(np.asarray(x).reshape(rows, self.k))
        out = np.empty((rows, self.n), np.float32)
        pointer = cpu_kernels.pointer
        self.kernel(rows, self.n, self.k, pointer(source), pointer(self.packed), pointer(out),
                    self.splits, self.n_splits)
        return mx.array(out).reshape(*x.shape[:-1], self.n)


class PackedLinear(nn.Module):
    """``nn.Linear`` without bias: decode-sized inputs through the packed kernel,
    larger ones (prefill) through MLX's matmul as before."""

    def __init__(self, weight: Any, packed: PackedWeight):
        super().__init__()
        self.weight = weight
        self._packed = packed

    def __call__(self, x):
        if self._packed.serves(x):
            return self._packed.matmul(x)
        return x @ self["weight"].T


def _as_linear(embedding: Any, packed: PackedWeight):
    original = embedding.as_linear

    def as_linear(x):
        return packed.matmul(x) if packed.serves(x) else original(x)

    return as_linear


def openblas_k_blocks(k: int) -> list[int]:
    """Where OpenBLAS's sgemm restarts its sums over K (level3.c's blocking)."""
    bounds, done = [], 0
    while done < k:
        step = k - done
        if step >= 2 * OPENBLAS_Q:
            step = OPENBLAS_Q
        elif step > OPENBLAS_Q:
            step = (step // 2 + OPENBLAS_UNROLL - 1) // OPENBLAS_UNROLL * OPENBLAS_UNROLL
        done += step
        if done < k:
            bounds.append(done)
    return bounds


class _Checks:
    """Per weight shape, the rows from which the kernel gives MLX's bits (None: never),
    kept beside the kernel for this CPU, keyed by the kernel, MLX and OpenBLAS (about
    1 s of checks at the default model's first start)."""

    def __init__(self, library: ctypes.CDLL):
        from nightshift.worker import blas

        self.library = library
        openblas = blas.openblas_library() or ""
        size = os.stat(openblas).st_size if openblas else 0
        identity = f"{library._name}|{mx.__version__}|{openblas}|{size}"
        key = hashlib.sha256(identity.encode()).hexdigest()[:12]
        self.path = Path(library._name).with_name(f"packed_linear-checks-{key}.json")
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            saved = {}
        self.rows = {tuple(map(int, shape.split("x"))): rows for shape, rows in saved.items()}
        self.known = len(self.rows)

    def packed(self, weight: Any) -> PackedWeight | None:
        """The weight packed, if its shape gives MLX's results."""
        shape = tuple(weight.shape)
        if shape in self.rows and self.rows[shape] is None:
            return None  # known to differ: not packed at all
        packed = PackedWeight(self.library, weight)
        if shape not in self.rows:
            self.rows[shape] = _exact_from(packed, weight)
        if self.rows[shape] is None:
            return None
        packed.min_rows = self.rows[shape]
        return packed

    def save(self) -> None:
        if len(self.rows) == self.known:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps({f"{n}x{k}": rows for (n, k), rows in self.rows.items()}))
            os.replace(tmp, self.path)
        except OSError as exc:  # checked again at the next start
            log.info("decode matmuls: checks not kept (%s)", exc)


def _exact_from(packed: PackedWeight, weight: Any) -> int | None:
    """The fewest rows from which the kernel gives MLX's matmul's bits at every checked
    count up to ``MAX_ROWS``; None if it differs even at ``MAX_ROWS``."""
    exact_from = None
    for rows in sorted(CHECK_ROWS, reverse=True):
        x = mx.random.normal((rows, packed.k), key=mx.random.key(rows))
        if not mx.array_equal(packed.matmul(x), x @ weight.T).item():
            break
        exact_from = rows
    return exact_from


def _packable(weight: Any) -> bool:
    return (weight.ndim == 2 and weight.dtype == mx.float32 and weight.shape[0] % PANEL == 0
            and weight.shape[0] >= PANEL)


def _children(module: Any):
    """(parent, key, child) for every module below ``module``, lists included."""
    stack = [module]
    while stack:
        parent = stack.pop()
        items = parent.items() if isinstance(parent, dict) else enumerate(parent)
        for key, child in items:
            if isinstance(child, nn.Module):
                yield parent, key, child
                stack.append(child)
            elif isinstance(child, (list, tuple, dict)):
                stack.append(child)


__all__ = ["apply", "openblas_k_blocks", "PackedLinear", "PackedWeight"]
