"""Reading a model folder's own files: ``config.json`` and the safetensors headers.

One reader for each, with one failure behaviour: a ``ModelError`` that names the file
and what is wrong with it. Only headers are read, never tensor data, and nothing here
imports mlx: the registry lists models, and the memory estimate sizes them, before
anything is loaded.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from nightshift.jobs.errors import ModelError

CONFIG_FILE = "config.json"
_DAMAGED = "the model folder is damaged; pull or import it again"


def read_config(folder: str | Path) -> dict[str, Any]:
    """The model's ``config.json``.

    Raises:
        ModelError: the file is missing or unreadable, not JSON, or not a JSON object.
    """
    path = Path(folder) / CONFIG_FILE
    try:
        text = path.read_text()
    except OSError as e:
        raise ModelError(f"{path} cannot be read ({e.strerror or e}): {_DAMAGED}") from e
    try:
        config = json.loads(text)
    except ValueError as e:
        raise ModelError(f"{path} is not readable JSON ({e}): {_DAMAGED}") from e
    if not isinstance(config, dict):
        raise ModelError(f"{path} is not readable JSON (it holds a {type(config).__name__}, "
                         f"not an object): {_DAMAGED}")
    return config


def tensor_headers(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Name -> ``{"dtype", "shape", "nbytes"}`` of every tensor in the folder's safetensors files.

    Raises:
        ModelError: no safetensors files, or a damaged header.
    """
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder}: no .safetensors weights found")
    tensors = {}
    for file in files:
        try:
            with open(file, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                # A damaged length must not make us read (or allocate) gigabytes.
                if size > file.stat().st_size - 8:
                    raise ValueError(f"its header claims {size} bytes, more than the file has")
                header = json.loads(f.read(size))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                tensors[name] = {"dtype": info["dtype"], "shape": info["shape"],
                                 "nbytes": end - begin}
        except (OSError, ValueError, struct.error, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{file}: not a readable safetensors file ({e!r})") from e
    return tensors


def quantization(config: dict, layer: str) -> dict:
    """The quantization settings (``bits``, ``group_size``) of one layer: its own entry
    in the config's ``quantization`` where mixed recipes give one, else the model's."""
    q = config.get("quantization") or config.get("quantization_config") or {}
    return q.get(layer) if isinstance(q.get(layer), dict) else q


def quantized_layers(tensors: dict[str, dict[str, Any]]) -> set[str]:
    """Layers stored quantized: those with a ``scales`` tensor beside their weight."""
    return {name.rpartition(".")[0] for name in tensors if name.endswith(".scales")}


def parameter_counts(tensors: dict[str, dict[str, Any]], config: dict) -> dict[str, int]:
    """Name -> model parameters each tensor holds, from the headers alone.

    A quantized weight is stored as uint32 words holding 32/bits values each, so it
    counts its unpacked values; its layer's ``scales`` and ``biases`` are quantization
    overhead, not parameters, and are left out.
    """
    quantized = quantized_layers(tensors)
    counts = {}
    for name, t in tensors.items():
        layer, _, kind = name.rpartition(".")
        count = math.prod(t["shape"])
        if layer in quantized:
            if kind in ("scales", "biases"):
                continue
            if kind == "weight" and t["dtype"] == "U32":
                count = count * 32 // quantization(config, layer).get("bits", 4)
        counts[name] = count
    return counts
