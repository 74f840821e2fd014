"""Estimate the memory a model needs before loading it.

Everything here reads ``config.json`` and the safetensors headers only; mlx is
imported lazily, and only on macOS to ask Metal for its working-set limit. The loader
(``nightshift.worker.loader``) passes what it learns here on: the batch size that fits goes to
the batch-size measurement, which does not import this module.

The estimate is of MLX's peak allocation (``mx.get_peak_memory()``) while
mlx-lm's BatchGenerator runs a full batch at the given context:

* weights: as stored, or as converted by the compute plan (4-bit weights
  dequantized to float32 take about 8x their file size);
* KV cache: ``batch x context x kv_bytes_per_token``, with the context rounded
  up to mlx-lm's cache step (256 tokens) after the one token the decode loop
  writes ahead;
* overhead: the larger of prefill activations and decode logits. On CPU, MLX
  materialises the attention scores of a prefill chunk
  (``prefill_batch x heads x chunk x context``), which dominates for long
  prompts; GPU kernels do not.

The activation coefficients were fitted on measured peaks of a tiny Llama and
SmolLM2-135M (float32, CPU, 17 prefill shapes, all within 8 %).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from nightshift.jobs.errors import ResourceError
from nightshift.worker.blas import mlx_backend, openblas_threads
from nightshift.worker.model_files import (
    parameter_counts,
    quantized_layers,
    read_config,
    tensor_headers,
)
from nightshift.worker.plan import packs_linear_weights
from nightshift.worker.prefill import prefill_settings

GB = 1e9
# mlx-lm's KVCache / BatchKVCache grow in steps of this many tokens.
KV_STEP = 256
# Fitted on measured prefill peaks (see module docstring): bytes beyond the KV cache
# = SCORES x scores + MASK x (query, key) pairs + per token (INTER x intermediate
# + HIDDEN x hidden) activations.
SCORES_FACTOR = 1.1
MASK_BYTES = 0.2
INTER_FACTOR = 3.5
HIDDEN_FACTOR = 8.5
# Decode keeps a few (batch x vocab) float32 arrays: logits, log-sum-exp, logprobs.
LOGITS_COPIES = 3
# The estimate is within ~15 % of the measured peak, and MLX's buffer cache adds
# some on top: ask for this much more than the estimate before calling it a fit.
SAFETY = 1.15

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4,
                "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_TORCH_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def weights_bytes(model_path: str | Path) -> int:
    """Bytes of all tensors in the model folder, as stored."""
    return sum(t["nbytes"] for t in tensor_headers(model_path).values())


def resident_weights_bytes(model_path: str | Path, dtype_bytes: int | None = None) -> int:
    """Bytes the weights take in memory once loaded and converted.

    Args:
        model_path: the model folder.
        dtype_bytes: bytes per element after the compute plan's conversion
            (4 for float32), or None for weights kept as loaded. Quantized
            weights are counted by their parameters (``in_features`` from the
            packed width and the layer's bits); their scales and biases go away.
    """
    tensors = tensor_headers(model_path)
    if dtype_bytes is None:
        return sum(t["nbytes"] for t in tensors.values())
    quantized = quantized_layers(tensors)
    total = 0
    for name, count in parameter_counts(tensors, read_config(model_path)).items():
        t = tensors[name]
        if name.rpartition(".")[0] in quantized or t["dtype"] in _FLOAT_DTYPES:
            total += count * dtype_bytes
        else:
            total += t["nbytes"]
    return total


def activation_dtype_bytes(model_path: str | Path) -> int:
    """Bytes per activation (and KV) element of the model run as loaded.

    MLX promotes mixed float types to the widest, so it is the widest float type
    among the stored tensors (float32 norms make a float16-scaled model run in
    float32).
    """
    floats = [_DTYPE_BYTES[t["dtype"]] for t in tensor_headers(model_path).values()
              if t["dtype"] in _FLOAT_DTYPES]
    if floats:
        return max(floats)
    return _TORCH_DTYPE_BYTES.get(read_config(model_path).get("torch_dtype"), 2)


def _text_config(config: dict) -> dict:
    # Multimodal configs keep the language model's sizes in text_config.
    return {**config, **config["text_config"]} if "text_config" in config else config


def kv_heads_per_layer(config: dict) -> list[int]:
    """KV heads of each layer; 0 for layers without a KV cache.

    Llama-like configs: ``num_key_value_heads`` (default: all heads) on every
    layer. nemotron-nas: per ``block_configs``, where attention ``no_op`` and
    ``replace_with_linear`` layers keep no cache and the others have
    ``num_attention_heads // n_heads_in_group`` KV heads.
    """
    config = _text_config(config)
    heads = config["num_attention_heads"]
    blocks = config.get("block_configs")
    if blocks:
        kv = []
        for block in blocks:
            attention = block.get("attention", {})
            if attention.get("no_op") or attention.get("replace_with_linear"):
                kv.append(0)
            else:
                kv.append(heads // attention["n_heads_in_group"])
        return kv
    return [config.get("num_key_value_heads") or heads] * config["num_hidden_layers"]


def _head_dim(config: dict) -> int:
    config = _text_config(config)
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def kv_bytes_per_token(config: dict, dtype_bytes: int) -> int:
    """KV-cache bytes one token takes: sum over layers of 2 x kv_heads x head_dim x bytes."""
    return 2 * sum(kv_heads_per_layer(config)) * _head_dim(config) * dtype_bytes


def _intermediate_size(config: dict) -> int:
    """The widest MLP of any layer (nemotron-nas sizes each block by ``ffn_mult``)."""
    config = _text_config(config)
    hidden = config["hidden_size"]
    sizes = [config.get("intermediate_size") or 4 * hidden]
    for block in config.get("block_configs") or []:
        mult = block.get("ffn", {}).get("ffn_mult")
        if mult:
            # As mlx-lm's nemotron-nas: 2/3 x mult x hidden, rounded up to 256.
            sizes.append(-(-int(2 * mult * hidden / 3) // 256) * 256)
    return max(s for s in sizes if s)


def _size(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.0f} MB"


def _kv_tokens(tokens: int) -> int:
    return -(-tokens // KV_STEP) * KV_STEP


def available_bytes() -> int:
    """Memory MLX can use now: free RAM, capped by Metal's recommended working set."""
    import psutil

    available = psutil.virtual_memory().available
    if sys.platform == "darwin":
        try:
            import mlx.core as mx

            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            working_set = info.get("max_recommended_working_set_size")
            if working_set:
                available = min(available, int(working_set))
        except (ImportError, RuntimeError, AttributeError):
            pass  # no Metal: free RAM is the limit
    return int(available)


@dataclass
class MemoryEstimate:
    """Peak memory of running a model at a batch size and context, against what is free.

    All sizes in bytes.
    """

    weights: int
    kv_cache: int
    overhead: int
    total: int
    available: int
    fits: bool
    batch_size: int
    context_tokens: int
    kv_per_sequence: int

    def describe(self) -> str:
        """One line: what is needed, of what, and of how much is available."""
        return (
            f"needs ~{_size(self.total)} (weights {_size(self.weights)} + KV "
            f"{_size(self.kv_cache)} for {self.batch_size}x{self.context_tokens} tokens + "
            f"overhead {_size(self.overhead)}) of {_size(self.available)} available"
        )

    def fits_copies(self, copies: int) -> bool:
        """Whether ``copies`` processes of this model fit in what is available, as each
        would find when started after the others had loaded: their weights and working
        memory taken, their KV caches still to grow (they grow with the requests)."""
        others = (copies - 1) * (self.weights + self.overhead)
        return (self.total + others) * SAFETY <= self.available

    def max_batch_size(self) -> int:
        """Roughly the largest batch that fits at this context (0 if none)."""
        room = self.available / SAFETY - self.weights - self.overhead
        return max(0, int(room // max(self.kv_per_sequence, 1)))


def estimate(
    model_path: str | Path,
    *,
    batch_size: int,
    context_tokens: int,
    dtype_bytes_weights: int | None = None,
    kv_dtype_bytes: int | None = None,
    dtype: str | None = None,
    config: dict | None = None,
    prefill_batch_size: int | None = None,
    prefill_step_size: int | None = None,
    device: str | None = None,
    available: int | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of generating with a model, before loading it.

    Args:
        model_path: the model folder (config.json + safetensors).
        batch_size: sequences decoded together.
        context_tokens: longest prompt + completion of any sequence.
        dtype_bytes_weights: bytes per weight after the compute plan's conversion,
            or None to keep the stored size.
        kv_dtype_bytes: bytes per KV element; default the activation dtype
            (``dtype_bytes_weights`` if converting, else the widest stored float).
        dtype: instead of ``dtype_bytes_weights``, the compute plan's weights
            policy (``as-loaded``, ``float32``, ``bfloat16``, ``float16``).
        config: the model's config.json if already read.
        prefill_batch_size, prefill_step_size: the BatchGenerator's prefill settings
            (default: the engine's, ``nightshift.worker.prefill.prefill_settings``).
        device: ``cpu``, ``metal`` or ``cuda`` (default: the installed MLX backend);
            only CPU materialises the attention scores.
        available: bytes free (default: ``available_bytes()``).

    Returns:
        The estimate; ``fits`` when ``total`` with a safety margin is available.

    Raises:
        ModelError: unreadable config or weights.
    """
    config = _text_config(config or read_config(model_path))
    if dtype and dtype != "as-loaded":
        dtype_bytes_weights = dtype_bytes_weights or _TORCH_DTYPE_BYTES[dtype]
    if device is None:
        device = mlx_backend()
    act_bytes = kv_dtype_bytes or dtype_bytes_weights or activation_dtype_bytes(model_path)
    weights = resident_weights_bytes(model_path, dtype_bytes_weights)
    if packs_linear_weights(device, act_bytes == 4, openblas_threads()):
        weights *= 2  # and a packed copy for the decode's matmuls (worker/packed_linear.py)
    per_token = kv_bytes_per_token(config, act_bytes)
    # The decode loop computes one step ahead, so a full context writes one more token.
    kv_per_sequence = _kv_tokens(context_tokens + 1) * per_token
    kv_cache = batch_size * kv_per_sequence

    # Prefill of the last chunk of one prefill batch, while the rest of the batch
    # already holds its cache (not yet grown by the decode's look-ahead token).
    if prefill_batch_size is None or prefill_step_size is None:
        prefill_batch_size, prefill_step_size = prefill_settings(batch_size)
    pb = min(prefill_batch_size, batch_size)
    chunk = min(prefill_step_size, context_tokens)
    pairs = pb * chunk * context_tokens
    scores = SCORES_FACTOR * config["num_attention_heads"] * pairs * act_bytes
    activations = pb * chunk * act_bytes * (
        INTER_FACTOR * _intermediate_size(config) + HIDDEN_FACTOR * config["hidden_size"])
    prefill = (batch_size * _kv_tokens(context_tokens) * per_token + activations
               + (scores + MASK_BYTES * pairs if device == "cpu" else 0))
    decode = kv_cache + LOGITS_COPIES * batch_size * config.get("vocab_size", 0) * 4
    overhead = int(max(prefill, decode) - kv_cache)
    total = weights + kv_cache + overhead
    available = available_bytes() if available is None else available
    fits = total * SAFETY <= available
    return MemoryEstimate(weights, kv_cache, overhead, total, available, fits,
                          batch_size, context_tokens, kv_per_sequence)


def check_fits(est: MemoryEstimate, force: bool = False) -> None:
    """Raise ResourceError unless the estimate fits (or ``force`` says to try anyway).

    Raises:
        ResourceError: naming what is needed, what is available and what to change.
    """
    if est.fits or force:
        return
    if est.weights * SAFETY > est.available:
        advice = "the weights alone do not fit: use a smaller or more quantized model"
    else:
        fitting = est.max_batch_size()
        about = f" (about {fitting} would fit)" if fitting else ""
        advice = (f"use a smaller --batch-size{about} or --max-context "
                  f"(now {est.batch_size} and {est.context_tokens} tokens)")
    raise ResourceError(f"Not enough memory: the model {est.describe()}. To fit, {advice}; "
                        "or pass --force to try anyway.")
