"""``mx.fast.rope`` on a CPU from a table of MLX's own cosines and sines, same bits.

On a CPU MLX computes RoPE by its fallback (mlx/fast.cpp): at every call the angles of
the positions, their cosines and sines, then four products, a sum, a difference and a
concatenation, each a pass of its own: 0.2 ms for a decode step's queries (26 sequences
x 15 heads) and 6.7 ms for a 64-token prefill chunk of 32 prompts, about 1.4 s of one
process's share of the benchmark's job. The angles depend on the position alone, so
the cosines and sines are computed once per position by MLX's own rope (rotating
[1, .., 1, 0, .., 0] gives cos, then sin: 1 x c - 0 x s is c) and one pass of
cpu_kernels.cpp's ``rope`` applies them with MLX's own products, rounded one by one.
tests/test_native_kernels.py checks the bits against MLX's.

``install`` puts ``rope`` in place of ``mx.fast.rope`` (worker/native_kernels.py does,
where nightshift's CPU kernels build); anything it does not cover (another dtype or
rank, a negative position, a stream) goes to MLX's.
"""

from __future__ import annotations

import numpy as np

MIN_ROWS = 4096  # positions in a new table; it doubles as longer ones come
_tables: dict[tuple, tuple[object, np.ndarray]] = {}  # key -> (freqs kept alive, table)
_original = None


def install() -> None:
    """Route ``mx.fast.rope`` through ``rope`` (once)."""
    global _original
    import mlx.core as mx

    if _original is None:
        _original = mx.fast.rope
        rope.__wrapped__ = _original  # MLX's own, for comparison
        mx.fast.rope = rope


def rope(a, dims, *, traditional, base, scale, offset, freqs=None, stream=None):
    """``mx.fast.rope`` with the same arguments and, where it applies, the same bits."""
    import mlx.core as mx
    from nightshift.worker import cpu_kernels

    library = cpu_kernels.library()
    if stream is not None or a.ndim != 4 or a.dtype != mx.float32 or library is None:
        return _original(a, dims, traditional=traditional, base=base, scale=scale,
                         offset=offset, freqs=freqs, stream=stream)
    batch, heads, steps, d = a.shape
    start = np.ascontiguousarray(np.broadcast_to(np.asarray(offset, np.int32), (batch,)))
    if batch and start.min() < 0:  # left padding: no row for it, MLX computes it
        return _original(a, dims, traditional=traditional, base=base, scale=scale,
                         offset=offset, freqs=freqs)
    table = _table(dims, traditional, base, scale, freqs,
                   int(start.max(initial=0)) + steps)
    x = np.asarray(a)
    if x.strides[-1] != x.itemsize:
        x = np.ascontiguousarray(x)
    out = np.empty(a.shape, np.float32)
    b_stride, n_stride, t_stride = (s // x.itemsize for s in x.strides[:3])
    library.rope(batch, heads, steps, d, dims, int(traditional), cpu_kernels.pointer(x),
                 b_stride, n_stride, t_stride, cpu_kernels.pointer(start),
                 cpu_kernels.pointer(table), cpu_kernels.pointer(out))
    return mx.array(out)


def _table(dims: int, traditional: bool, base, scale, freqs, rows: int) -> np.ndarray:
    """MLX's cosines and sines for positions 0 .. at least ``rows - 1``, one row of
    ``dims`` floats each, laid out as the kernel reads them."""
    key = (dims, bool(traditional), base, scale, id(freqs))
    kept = _tables.get(key)
    if kept is not None and len(kept[1]) >= rows:
        return kept[1]
    import mlx.core as mx

    size = max(MIN_ROWS, 1 << (rows - 1).bit_length())
    ones = np.zeros((1, 1, size, dims), np.float32)
    if traditional:
        ones[..., 0::2] = 1
    else:
        ones[..., : dims // 2] = 1
    rotated = _original(mx.array(ones), dims, traditional=traditional, base=base,
                        scale=scale, offset=0, freqs=freqs)
    table = np.array(rotated, np.float32).reshape(size, dims)
    _tables[key] = (freqs, table)
    return table


__all__ = ["install", "rope"]
