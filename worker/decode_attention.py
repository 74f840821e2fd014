"""A decode step's attention in one pass (a Linux CPU with AVX-512 and OpenBLAS).

At a decode step each sequence has one query per head, and MLX's CPU attention
(worker/native_kernels.py ``attention``) runs it as separate ops: the scaled queries, one
1 x dims by dims x length matmul per query head (9 a sequence for the default model, each
reading its KV head's keys again), the mask, the softmax's maximum, exponentials, sum and
reciprocal, then one matmul per head with the values, each op a pass over memory and an
allocation. ``decode_attention`` (cpu_kernels.cpp) does it per KV head in one pass: the
keys and values read once for all the query heads that share them.

Its bits are MLX's: the matmuls land in OpenBLAS's small-matrix kernels for AVX-512, and
the kernel sums in their orders (see cpu_kernels.cpp). That holds only where MLX's matmul
reaches those kernels, so ``enabled`` checks it on this machine, once per process, against
MLX's own attention on shapes that take each of the kernel's branches, and keeps MLX's where
any bit differs (another BLAS, another OpenBLAS build or version). Longer contexts than
OpenBLAS gives its small kernels (``MAX_LENGTH``) keep MLX's path too.
``NIGHTSHIFT_DECODE_ATTENTION=0`` turns it off.
"""

from __future__ import annotations

import logging
import os

import mlx.core as mx
import numpy as np
from nightshift.worker import cpu_kernels

log = logging.getLogger(__name__)

ENV = "NIGHTSHIFT_DECODE_ATTENTION"  # "0": MLX's ops
# OpenBLAS takes its small TN kernel (the queries times the keys) while M x N <= 1200,
# here the context length times one query (sgemm_small_kernel_permit_skylakex.c), and
# its small kernels at all while M x N x K <= 100^3.
MAX_LENGTH = 1200
MAX_WORK = 100**3

_checked: bool | None = None  # None: not checked yet in this process


def enabled(mlx_attention) -> bool:
    """Whether decode steps' attention goes through the kernel: built here, not turned
    off, and giving the bits of ``mlx_attention`` (MLX's own) on this machine, checked at
    the first call."""
    global _checked
    if _checked is None:
        _checked = (os.environ.get(ENV, "1") != "0" and cpu_kernels.library() is not None
                    and _same_as(mlx_attention))
    return _checked


def serves(q, k, v, mask) -> bool:
    """Whether ``attend`` takes these arrays: one float32 query per sequence and head,
    keys and values laid out as a KV cache gives them, a boolean padding mask or none,
    and a context OpenBLAS runs through its small kernels."""
    if not (q.ndim == k.ndim == v.ndim == 4 and q.shape[2] == 1
            and q.dtype == k.dtype == v.dtype == mx.float32):
        return False
    batch, heads, _, dims = q.shape
    n_kv, length = k.shape[1], k.shape[2]
    if (k.shape != v.shape or k.shape[0] != batch or k.shape[3] != dims or heads % n_kv
            or dims % 16 or dims < 32 or not 0 < length <= MAX_LENGTH
            or length * dims > MAX_WORK):
        return False
    if mask is None:
        return True
    if isinstance(mask, str) or mask.dtype != mx.bool_ or mask.ndim > 4:
        return False
    shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    return shape[1:] == (1, 1, length) and shape[0] in (1, batch)


def attend(q, k, v, *, scale: float, mask=None):
    """``mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)`` for arrays
    ``serves`` takes, as MLX computes it on a CPU, in one pass."""
    queries = np.ascontiguousarray(np.asarray(q))
    keys, values = _rows_contiguous(np.asarray(k)), _rows_contiguous(np.asarray(v))
    batch, heads, _, dims = queries.shape
    n_kv, length = keys.shape[1], keys.shape[2]
    out = np.empty_like(queries)
    mask_pointer, mask_stride = None, 0
    if mask is not None:
        flags = np.asarray(mask)
        flags = np.ascontiguousarray(flags.reshape(flags.shape[0] if flags.ndim == 4 else 1,
                                                   length))
        flags = flags.view(np.uint8)
        mask_pointer = cpu_kernels.pointer(flags)
        mask_stride = length if flags.shape[0] > 1 else 0
    ks, vs = (tuple(s // 4 for s in a.strides[:3]) for a in (keys, values))
    cpu_kernels.library().decode_attention(
        batch, n_kv, heads // n_kv, length, dims, scale, cpu_kernels.pointer(queries),
        cpu_kernels.pointer(keys), *ks, cpu_kernels.pointer(values), *vs, mask_pointer,
        mask_stride, cpu_kernels.pointer(out))
    return mx.array(out)


def _rows_contiguous(array: np.ndarray) -> np.ndarray:
    """The array itself where each row of its last axis is contiguous (a KV cache's
    slice is), else a contiguous copy."""
    if array.strides[3] == 4 and all(s % 4 == 0 for s in array.strides):
        return array
    return np.ascontiguousarray(array)


def _same_as(mlx_attention) -> bool:
    """Whether ``attend`` gives ``mlx_attention``'s bits here, on shapes that take each
    branch of the kernel and of OpenBLAS's: context lengths of each remainder mod 4, a
    group of query heads wider than a pass, a mask per sequence, a shared mask and none."""
    rng = np.random.default_rng(0)
    cases = [(2, 3, 3, 64, 1), (3, 3, 3, 64, 37), (2, 1, 6, 64, 130), (2, 2, 1, 128, 203),
             (1, 3, 3, 64, MAX_LENGTH)]
    for case, (batch, n_kv, repeats, dims, length) in enumerate(cases):
        q = mx.array(rng.normal(size=(batch, n_kv * repeats, 1, dims)).astype(np.float32) * 3)
        full = rng.normal(size=(2, batch, n_kv, length + 5, dims)).astype(np.float32)
        k, v = (mx.array(a)[:, :, :length, :] for a in full)  # as a cache's slice
        if case % 3 == 2:
            mask = None
        else:
            starts = rng.integers(0, max(1, length // 2), size=(batch if case % 3 == 0 else 1))
            mask = mx.array(np.arange(length)[None, :] >= starts[:, None])
            mask = mask.reshape(mask.shape[0], 1, 1, length)
        scale = dims**-0.5
        expected = np.asarray(mlx_attention(q, k, v, scale=scale, mask=mask))
        got = np.asarray(attend(q, k, v, scale=scale, mask=mask))
        if not np.array_equal(expected.view(np.uint32), got.view(np.uint32)):
            log.info("decode attention differs from MLX's on this machine (%d x %d heads, "
                     "%d dims, %d keys): MLX's runs", n_kv, repeats, dims, length)
            return False
    return True


__all__ = ["enabled", "serves", "attend", "ENV", "MAX_LENGTH"]
