"""MLX's CPU kernels built for this machine's instructions, with the same results.

MLX's CPU backend compiles the kernels of ``mx.compile``d functions (mlx-lm's SwiGLU,
for one) with ``g++ -std=c++17 -O3 -fPIC -shared``: for a generic x86-64, where each
``std::fma`` of its ``exp`` polynomial is a call into libm. Built with ``-march=native``
the ``fma`` is one instruction, and the same kernel runs about twice as fast.
``-ffp-contract=off`` keeps the compiler from fusing a multiply and an add the source
keeps apart, so every result is the bit MLX's own build gives (``fma`` is exact either
way). MLX runs ``g++`` through the shell and keeps its kernels in the temporary folder,
so ``enable`` puts a ``g++`` first on ``PATH`` that adds those flags to MLX's builds (and
to nothing else: a ``--notify`` command inherits ``PATH``), and points ``TMPDIR`` at a
folder of the system's temporary one kept for these kernels: one per user, CPU and
compiler, never shared with MLX's plain builds nor with another machine.

MLX's own softmax is built in, for a generic x86-64 too, and is most of the CPU's
attention (about 70% of it at prefill). ``enable`` also replaces
``mx.fast.scaled_dot_product_attention`` with what MLX computes on a CPU (its
fallback, op for op: ``attention``) but for the softmax's ``exp``, which goes through a
compiled kernel: identical outputs (tests/test_native_kernels.py), attention about 1.9x
faster.

Even so built, a compiled kernel runs MLX's ``exp`` one element at a time. On an AVX-512
CPU, mlx-lm's SwiGLU goes through nightshift's own kernel instead (``swiglu``,
cpu_kernels.cpp): MLX's ``exp``, sigmoid and products 16 lanes at a time, operation for
operation, so the same bits (checked on every 97th float32 bit pattern and on
millions of random inputs); 2.5-2.8x faster at decode and prefill shapes, 1.02x on one
process's share of the benchmark's job (benchmarks/lever.py). The softmax's
exponentials go through the same ``exp`` (``shifted_exp``): 1.02x more. ``mx.fast.rope``
goes through a table of MLX's own cosines and sines (worker/rope.py). At a decode step,
attention runs in one pass where that gives MLX's bits (worker/decode_attention.py).
"""

from __future__ import annotations

import logging
import os
import sys

from nightshift.worker import cpu_kernels, kernel_folder
from nightshift.worker.kernel_folder import MLX_FLAGS

log = logging.getLogger(__name__)

NATIVE_ENV = "NIGHTSHIFT_NATIVE_KERNELS"  # "0": MLX's kernels as MLX builds them
_enabled = False


def enable() -> bool:
    """Build MLX's CPU kernels for this machine from now on, and route attention's
    softmax through them; returns whether that is on. Once per process; nothing on
    other platforms, without g++, or with ``NIGHTSHIFT_NATIVE_KERNELS=0``."""
    global _enabled
    if _enabled:
        _install_swiglu()  # into the modules of models loaded since
        return True
    if os.environ.get(NATIVE_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    compiler = kernel_folder.real_compiler()
    if compiler is None:
        return False
    folder = kernel_folder.kernels_folder(compiler)
    if folder is None:
        return False
    wrapper = folder / "bin" / "g++"
    if not wrapper.exists():
        (folder / "bin").mkdir(exist_ok=True)
        tmp = wrapper.with_name(f".g++.{os.getpid()}")
        tmp.write_text(f'#!/bin/sh\ncase "$*" in *"/mlx/include"*) exec "{compiler}" "$@" '
                       f'{" ".join(MLX_FLAGS)} ;; esac\nexec "{compiler}" "$@"\n')
        tmp.chmod(0o755)
        os.replace(tmp, wrapper)  # several workers may start at once
    (folder / "tmp").mkdir(exist_ok=True)
    os.environ["PATH"] = os.pathsep.join([str(wrapper.parent), os.environ.get("PATH", "")])
    os.environ["TMPDIR"] = str(folder / "tmp")
    _install_attention()
    _install_swiglu()
    if cpu_kernels.library() is not None:
        from nightshift.worker import rope  # imports numpy

        rope.install()
    _enabled = True
    log.info("MLX's CPU kernels are built for this machine (g++ %s)", " ".join(MLX_FLAGS))
    return True


def _install_attention() -> None:
    import mlx.core as mx
    from nightshift.worker import decode_attention

    original = mx.fast.scaled_dot_product_attention

    def scaled_dot_product_attention(q, k, v, *, scale, mask=None, sinks=None, stream=None):
        if (sinks is not None or stream is not None or q.ndim != 4
                or not q.dtype == k.dtype == v.dtype == mx.float32):
            return original(q, k, v, scale=scale, mask=mask, sinks=sinks, stream=stream)
        if decode_attention.serves(q, k, v, mask) and decode_attention.enabled(original):
            return decode_attention.attend(q, k, v, scale=scale, mask=mask)
        return attention(q, k, v, scale=scale, mask=mask)

    scaled_dot_product_attention.__wrapped__ = original  # MLX's own, for comparison
    mx.fast.scaled_dot_product_attention = scaled_dot_product_attention


def _install_swiglu() -> None:
    """Route mlx-lm's SwiGLU, in every model module that imported it, through
    ``swiglu`` where nightshift's CPU kernels build here."""
    from mlx_lm.models import activations

    if cpu_kernels.library() is None:
        return
    for name, module in list(sys.modules.items()):
        if (name.startswith("mlx_lm.models.") and module is not activations
                and getattr(module, "swiglu", None) is activations.swiglu):
            module.swiglu = swiglu  # activations.swiglu stays: the fallback


def swiglu(gate, x):
    """mlx-lm's ``swiglu`` (``nn.silu(gate) * x``) bit for bit, in one pass of
    cpu_kernels.cpp for float32 arrays of one shape (2.5-2.8x faster); MLX's otherwise."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models import activations

    if not (gate.dtype == x.dtype == mx.float32 and gate.shape == x.shape):
        return activations.swiglu(gate, x)
    gate_in = np.ascontiguousarray(np.asarray(gate))
    x_in = np.ascontiguousarray(np.asarray(x))
    out = np.empty_like(gate_in)
    cpu_kernels.library().swiglu(out.size, cpu_kernels.pointer(gate_in),
                                 cpu_kernels.pointer(x_in), cpu_kernels.pointer(out))
    return mx.array(out)


def attention(q, k, v, *, scale: float, mask=None):
    """``mx.fast.scaled_dot_product_attention`` as MLX computes it on a CPU (mlx/fast.cpp,
    its fallback), op for op, with ``softmax`` for its softmax."""
    import mlx.core as mx

    n_kv, repeats = k.shape[1], q.shape[1] // k.shape[1]
    q = mx.array(scale, q.dtype) * q
    if repeats > 1:
        q = q.reshape(q.shape[0], n_kv, repeats, *q.shape[2:])
        k, v = mx.expand_dims(k, 2), mx.expand_dims(v, 2)
    scores = q @ mx.swapaxes(k, -1, -2)
    if mask is not None:
        if isinstance(mask, str):  # "causal"
            offset = k.shape[-2] - q.shape[-2]
            mask = (mx.expand_dims(mx.arange(offset, q.shape[-2] + offset), 1)
                    >= mx.expand_dims(mx.arange(0, k.shape[-2]), 0))
        if repeats > 1 and mask.ndim >= 3:
            if mask.shape[-3] == 1:
                mask = mx.expand_dims(mask, -3)
            else:
                mask = mask.reshape(*mask.shape[:-3], n_kv, repeats, *mask.shape[-2:])
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        else:
            scores = scores + mask
    out = softmax(scores) @ v
    if repeats > 1:
        out = out.reshape(out.shape[0], n_kv * repeats, *out.shape[3:])
    return out


def softmax(x):
    """``mx.softmax(x, axis=-1)`` bit for bit (MLX's CPU kernel: the row's maximum, the
    exponentials of the differences, times one over their sum), its ``exp`` in
    nightshift's AVX-512 kernel where it builds, else in a compiled kernel."""
    import mlx.core as mx
    import numpy as np

    m = mx.max(x, axis=-1, keepdims=True)
    library = cpu_kernels.library()
    if library is None or x.dtype != mx.float32:
        e = _shifted_exp()(x, m)
    else:
        values = np.ascontiguousarray(np.asarray(x))
        maxima = np.ascontiguousarray(np.asarray(m))
        out = np.empty_like(values)
        cols = values.shape[-1]
        library.shifted_exp(values.size // max(cols, 1), cols, cpu_kernels.pointer(values),
                            cpu_kernels.pointer(maxima), cpu_kernels.pointer(out))
        e = mx.array(out)
    return e * mx.reciprocal(mx.sum(e, axis=-1, keepdims=True))


_compiled = None


def _shifted_exp():
    global _compiled
    if _compiled is None:
        import mlx.core as mx

        _compiled = mx.compile(lambda x, m: mx.exp(x - m))
    return _compiled


__all__ = ["enable", "attention", "softmax", "swiglu"]
