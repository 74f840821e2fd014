"""nightshift's own CPU kernels (``cpu_kernels.cpp``): built once for this CPU, loaded
through ctypes, each giving MLX's bits faster than MLX's CPU backend does.

- ``packed_matmul``: the decode step's linear layers (worker/packed_linear.py), from
  float32 weights or (``packed_matmul_half``) float16 ones;
- ``swiglu``: mlx-lm's SwiGLU, and ``shifted_exp``: a softmax's exponentials
  (worker/native_kernels.py routes both here);
- ``rope``: ``mx.fast.rope`` from a table of MLX's own sines and cosines (worker/rope.py);
- ``decode_attention``: a decode step's attention in one pass (worker/decode_attention.py).

They need x86-64 with AVX-512 and ``g++``; elsewhere ``library()`` is None and MLX's
own kernels run. The build (about 2 s) lands in the folder of MLX's kernels built for
this machine (worker/kernel_folder.py: per user, CPU and compiler).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared")
_LONG, _POINTER = ctypes.c_long, ctypes.c_void_p
SIGNATURES = {
    "pack": [_LONG, _LONG, _POINTER, _POINTER],
    "pack_half": [_LONG, _LONG, _POINTER, _POINTER],
    "packed_matmul": [_LONG, _LONG, _LONG, _POINTER, _POINTER, _POINTER, _POINTER, _LONG],
    "packed_matmul_half": [_LONG, _LONG, _LONG, _POINTER, _POINTER, _POINTER, _POINTER, _LONG],
    "swiglu": [_LONG, _POINTER, _POINTER, _POINTER],
    "shifted_exp": [_LONG, _LONG, _POINTER, _POINTER, _POINTER],
    "rope": [_LONG] * 6 + [_POINTER, _LONG, _LONG, _LONG, _POINTER, _POINTER, _POINTER],
    "decode_attention": [_LONG] * 5 + [ctypes.c_float] + [_POINTER, _POINTER] + [_LONG] * 3
    + [_POINTER] + [_LONG] * 3 + [_POINTER, _LONG, _POINTER],
}

_loaded: ctypes.CDLL | None | bool = False  # False: not tried yet


def library() -> ctypes.CDLL | None:
    """The kernels, built for this CPU at the first call; None where they cannot be."""
    global _loaded
    if _loaded is False:
        _loaded = _build_and_load()
    return _loaded


def pointer(array) -> ctypes.c_void_p:
    """A numpy array's data, for a kernel's argument."""
    return ctypes.c_void_p(array.ctypes.data)


def _build_and_load() -> ctypes.CDLL | None:
    from nightshift.worker import blas, kernel_folder

    if not blas.avx512():
        return None
    compiler = kernel_folder.real_compiler()
    folder = kernel_folder.kernels_folder(compiler) if compiler else None
    if folder is None:
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:12]
    target = folder / f"cpu_kernels-{key}.so"
    if not target.exists():
        tmp = folder / f".cpu_kernels-{os.getpid()}.so"
        try:
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(tmp)], check=True,
                           capture_output=True, text=True, timeout=300)
            os.replace(tmp, target)  # several workers may build at once
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", None) or exc
            log.info("nightshift's CPU kernels do not build here (%s): MLX's run",
                     " ".join(str(detail).split())[:200])
            tmp.unlink(missing_ok=True)
            return None
    loaded = ctypes.CDLL(str(target))
    for name, arguments in SIGNATURES.items():
        function = getattr(loaded, name)
        function.argtypes, function.restype = arguments, None
    loaded.pack_half.restype = ctypes.c_long  # whether every weight is a float16
    return loaded


__all__ = ["library", "pointer", "SOURCE"]
