"""The compute plan: which device, BLAS and weight dtype run a model on this machine.

MLX's quantized kernels are the fast path on Metal and CUDA, but on CPU they are much
slower than float32 weights through OpenBLAS (see ``nightshift.worker.blas``); bfloat16 and
float16 matmuls do not use BLAS at all. So on CPU the weights are dequantized to
float32 (see ``_cpu_weights`` for the numbers, measured on a 2-core Linux CPU).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

from nightshift.worker import blas

WEIGHT_DTYPES = ("as-loaded", "float32", "bfloat16", "float16")
PACKED_LINEAR_ENV = "NIGHTSHIFT_PACKED_LINEAR"  # "0": MLX's matmul for every linear layer


@dataclass
class ComputePlan:
    """How the worker runs the model on this machine.

    Attributes:
        device: ``metal``, ``cuda`` or ``cpu``.
        blas: ``openblas`` or ``reference`` (Linux CPU), ``accelerate`` (macOS), ``n/a``.
        weights: ``as-loaded`` or the float dtype the weights are converted to.
        loaded: what the weights are in the files (``4-bit``, ``4/8-bit``, ``float16``...).
        batch_size: sequences decoded together; None until chosen or measured.
        threads: BLAS threads (OpenBLAS only).
        native_kernels: MLX's CPU kernels built for this machine (worker/native_kernels.py).
        packed_linear: weight matrices a decode step reads packed (worker/packed_linear.py).
    """

    device: str
    blas: str
    weights: str
    loaded: str
    batch_size: int | None = None
    threads: int | None = None
    batch_curve: dict[int, float] = field(default_factory=dict)
    native_kernels: bool = False
    packed_linear: int = 0

    def describe(self) -> str:
        """One line for the worker's start-up message and the benchmark."""
        blas = self.blas + (f" x{self.threads}" if self.threads else "")
        if self.weights == "as-loaded":
            weights = f"weights {self.loaded} as loaded"
        else:
            weights = f"weights {self.loaded} -> {self.weights}"
        batch = f"batch {self.batch_size}" if self.batch_size else "batch to measure"
        kernels = ", kernels for this CPU" if self.native_kernels else ""
        if self.packed_linear:
            kernels += ", decode matmuls packed"
        return f"{self.device}, BLAS {blas}{kernels}, {weights}, {batch}"


def quantization_of(model: Any) -> str | None:
    """``"4-bit"``, ``"4/8-bit"``... for a model with quantized layers, else None."""
    bits = sorted({m.bits for _, m in model.named_modules()
                   if hasattr(m, "bits") and hasattr(m, "scales")})
    return "/".join(str(b) for b in bits) + "-bit" if bits else None


def _float_dtype_name(model: Any) -> str:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    for _, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            return str(value.dtype).split(".")[-1]
    return "float32"


def _fast_cpu_blas() -> bool:
    return sys.platform == "darwin" or blas.openblas_loaded()


def _cpu_weights(loaded: str) -> str:
    """The weight dtype to run on CPU, given the stored one (``4-bit``, ``float16``...).

    SmolLM2-135M here, 32 sequences, decode tok/s: with OpenBLAS float32 177,
    bfloat16 17, float16 13, 4-bit 8 (the half types and quantized kernels do not
    use BLAS). With the reference BLAS float32 drops to 8.5, so bfloat16 is best
    for quantized weights; float weights are then kept as they are.
    """
    if _fast_cpu_blas():
        return "as-loaded" if loaded == "float32" else "float32"
    return "bfloat16" if loaded.endswith("-bit") else "as-loaded"


def _check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weights dtype {dtype!r}; choose from {', '.join(WEIGHT_DTYPES)}")


def planned_dtype(config: dict, dtype: str | None = None) -> str:
    """The weights policy ``choose_plan`` will pick, from ``config.json`` alone.

    For the memory estimate before loading. Returns ``dtype`` if given, else
    ``as-loaded`` on Metal/CUDA and the CPU choice of ``choose_plan``.

    Raises:
        ValueError: for an unknown dtype.
    """
    _check_dtype(dtype)
    if dtype:
        return dtype
    if blas.mlx_backend() != "cpu":
        return "as-loaded"
    q = config.get("quantization") or config.get("quantization_config")
    if isinstance(q, dict):
        loaded = f"{q.get('bits', 4)}-bit"
    else:
        loaded = config.get("torch_dtype") or "float32"
    return _cpu_weights(loaded)


def choose_plan(model: Any, *, dtype: str | None = None,
                batch_size: int | None = None) -> ComputePlan:
    """Choose device, BLAS and weight dtype for ``model`` on this machine.

    On CPU with a fast BLAS, quantized or half-precision weights become float32;
    on Metal and CUDA the weights stay as loaded (see ``_cpu_weights`` for the
    numbers). ``dtype`` and ``batch_size`` (the worker's flags) override.

    Args:
        model: a loaded mlx-lm model.
        dtype: one of ``WEIGHT_DTYPES``, or None to choose.
        batch_size: a fixed batch size, or None to measure later.

    Returns:
        The plan; apply it with ``apply_plan``.

    Raises:
        ValueError: for an unknown dtype.
    """
    _check_dtype(dtype)
    loaded = quantization_of(model) or _float_dtype_name(model)
    device, library, threads = _device_and_blas()
    chosen = "as-loaded" if device != "cpu" else _cpu_weights(loaded)
    if dtype == loaded:
        dtype = "as-loaded"
    return ComputePlan(device, library, dtype or chosen, loaded, batch_size, threads)


def expected_plan(config: dict, dtype: str | None = None) -> ComputePlan:
    """The device, BLAS and weights ``choose_plan`` will pick, from ``config.json`` alone:
    before loading, for what is keyed on them (a remembered batch size)."""
    device, library, threads = _device_and_blas()
    return ComputePlan(device, library, planned_dtype(config, dtype), "as in config.json",
                       threads=threads)


def packs_linear_weights(device: str, float32: bool, threads: int | None) -> bool:
    """Whether worker/packed_linear.py serves the decode's matmuls from a packed copy of
    the weights: float32 weights on an AVX-512 CPU, one BLAS thread per process (the
    default there), unless ``NIGHTSHIFT_PACKED_LINEAR=0``."""
    return (os.environ.get(PACKED_LINEAR_ENV, "1") != "0" and device == "cpu" and float32
            and threads == 1 and blas.avx512())


def _device_and_blas() -> tuple[str, str, int | None]:
    """This process's device, BLAS library and BLAS threads (OpenBLAS only)."""
    import mlx.core as mx

    if mx.default_device() == mx.gpu:
        return ("metal" if mx.metal.is_available() else "cuda",
                "accelerate" if sys.platform == "darwin" else "n/a", None)
    if sys.platform == "darwin":
        return "cpu", "accelerate", None
    threads = blas.openblas_threads()
    return ("cpu", "openblas", threads) if threads else ("cpu", "reference", None)


def apply_plan(model: Any, plan: ComputePlan, converted: dict[str, Any] | None = None) -> Any:
    """Convert ``model``'s weights in place as ``plan.weights`` says; returns the model.

    Layers are dequantized and evaluated one at a time, so the peak is about the
    converted weights plus one layer, not both whole copies as with
    ``mlx_lm.utils.dequantize_model`` (which converts everything in one graph).
    ``converted``: every parameter as an earlier conversion left it (name -> array,
    worker/converted_weights.py), put in place instead of converting again.
    """
    if plan.weights == "as-loaded":
        return model
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    try:
        from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
    except ImportError:  # only MoE models have them
        QuantizedSwitchLinear = SwitchLinear = None

    quantized = (nn.QuantizedEmbedding, nn.QuantizedLinear) + (
        (QuantizedSwitchLinear,) if QuantizedSwitchLinear else ())
    dtype = getattr(mx, plan.weights)
    # Names only: holding the modules would keep every quantized weight alive.
    # Largest first, so the biggest transient (usually the embedding) comes while
    # little float memory is allocated yet.
    sizes = {name: m.weight.size for name, m in model.named_modules() if isinstance(m, quantized)}
    names = sorted(sizes, key=sizes.get, reverse=True)
    for name in names:
        module = _submodule(model, name)
        if isinstance(module, nn.QuantizedEmbedding):
            new = nn.Embedding(1, 1)
        elif isinstance(module, nn.QuantizedLinear):
            new = nn.Linear(1, 1, bias="bias" in module)
        else:
            new = SwitchLinear(1, 1, 1, bias="bias" in module)
        if converted is not None:
            new.weight = converted[f"{name}.weight"]
            if "bias" in module:
                new.bias = converted[f"{name}.bias"]
        else:
            new.weight = mx.dequantize(module.weight, module.scales,
                                       getattr(module, "biases", None), module.group_size,
                                       module.bits, module.mode, dtype=dtype)
            if "bias" in module:
                new.bias = module.bias.astype(dtype)
        mx.eval(new.parameters())
        model.update_modules(tree_unflatten([(name, new)]))
        del module
    # Norms and other float parameters follow, so activations (and the KV cache)
    # are all in one dtype.
    model.set_dtype(dtype)
    if converted is not None:
        model.update(tree_unflatten(list(converted.items())))
    mx.eval(model.parameters())
    return model


def _submodule(model: Any, name: str) -> Any:
    obj = model
    for part in name.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else getattr(obj, part)
    return obj


def kv_dtype_bytes(model: Any) -> int:
    """Bytes per element of the KV cache this model writes (one 1-token forward pass)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([[1]]), cache=cache)
    for c in cache:
        keys = getattr(c, "keys", None)
        if keys is not None:
            return keys.dtype.size
    return 4

