"""Import a GGUF file (Llama architecture) as an mlx-lm model folder.

MLX reads GGUF itself (``mx.load``): Q4_0/Q4_1/Q8_0 tensors arrive already in MLX's
quantized layout (``weight`` uint32 + ``scales`` + ``biases``, group size 32), so the
import only renames tensors and writes the config and tokenizer mlx-lm expects. The
weights stay quantized exactly as they were in the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from nightshift.jobs.errors import ModelError

GGUF_MAGIC = b"GGUF"
# Every quantized GGUF type MLX keeps packed (Q4_0, Q4_1, Q8_0) uses blocks of 32.
GGUF_GROUP_SIZE = 32
WEIGHTS_FILE = "model.safetensors"

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|scales|biases)$")
_TOP = re.compile(r"(\w+)\.(weight|scales|biases)$")

# GGUF token types (llama.cpp): 3 = control (special), 4 = user-defined (added, not special).
_CONTROL, _USER_DEFINED = 3, 4

# llama.cpp's pre-tokenizer names -> what precedes the GPT-2 byte-level split.
# "smollm" splits every digit on its own before the GPT-2 regex (as SmolLM's own tokenizer.json).
_PRE_DIGITS = {"smollm": True, "gpt2": False, "default": False}


def import_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a Llama GGUF file into an mlx-lm model folder.

    Writes ``config.json``, ``model.safetensors`` (quantized tensors kept as they
    are), ``tokenizer.json`` and ``tokenizer_config.json``. The folder is built in a
    temporary directory beside ``out_dir`` and renamed into place, so a crash never
    leaves half a model.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: the model folder to create; it must not exist yet.

    Returns:
        ``out_dir``.

    Raises:
        ModelError: the file is missing, is not GGUF, is not a supported
            architecture or tokenizer, or ``out_dir`` already exists.
    """
    import mlx.core as mx  # lazy: importing this module must stay cheap

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ModelError(f"{gguf_path}: no such file")
    with open(gguf_path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"{gguf_path}: not a GGUF file (it does not start with 'GGUF')")
    if out_dir.exists():
        raise ModelError(f"{out_dir} already exists; remove it first")
    try:
        tensors, meta = mx.load(str(gguf_path), format="gguf", return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise ModelError(f"{gguf_path}: MLX cannot read this GGUF file: {e}") from e

    arch = _value(meta.get("general.architecture"))
    if arch != "llama":
        raise ModelError(
            f"{gguf_path}: architecture {arch!r} is not supported; only 'llama' GGUF files "
            "can be imported (convert other models with mlx_lm.convert from Hugging Face)"
        )

    weights = {_mlx_name(gguf_path, name): t for name, t in tensors.items()}
    config = _config(meta, weights)
    tokenizer, tokenizer_config = _tokenizer(gguf_path, meta)
    # mlx-lm stops on config.json's eos ids as well as the tokenizer's.
    config["eos_token_id"] = _value(meta.get("tokenizer.ggml.eos_token_id"))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
        tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is ordinary data
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _value(v):
    """A metadata value as plain Python (MLX returns scalars as 0-d arrays)."""
    v = v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v
    # Floats are float32 in GGUF: keep their 7 significant digits, not 1e-05's
    # float64 noise (9.999999747378752e-06) in config.json.
    return float(f"{v:.7g}") if isinstance(v, float) else v


def _mlx_name(gguf_path: Path, name: str) -> str:
    if m := _BLOCK.match(name):
        layer, part, kind = m.groups()
        if part in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    elif (m := _TOP.match(name)) and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    # Fail loudly: a tensor we cannot place (e.g. Llama 3.1's rope_freqs) means the
    # model would run with different maths than it was trained with.
    raise ModelError(f"{gguf_path}: tensor {name!r} has no mlx-lm Llama equivalent")


def _config(meta: dict, weights: dict) -> dict:
    def key(k, default=None):
        return _value(meta.get(f"llama.{k}", default))

    hidden, heads = key("embedding_length"), key("attention.head_count")
    vocab = key("vocab_size") or len(meta["tokenizer.ggml.tokens"])
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": key("block_count"),
        "intermediate_size": key("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length") or hidden // heads,
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "vocab_size": vocab,
        "max_position_embeddings": key("context_length"),
        "rope_theta": key("rope.freq_base", 10000.0),
        # llama.cpp's converter permutes q/k rows into the interleaved rotary layout.
        "rope_traditional": True,
        "tie_word_embeddings": "lm_head.weight" not in weights,
    }
    if quant := _quantization(weights):
        config["quantization"] = quant
        config["quantization_config"] = quant  # mlx-lm's own saves write both
    return config


def _quantization(weights: dict) -> dict | None:
    """Global quantization plus a per-layer entry for each layer whose bits differ."""
    bits = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            layer = name[: -len(".scales")]
            # Packed uint32 columns * 32 bits = input dims * bits; input dims = groups * 32.
            bits[layer] = weights[f"{layer}.weight"].shape[-1] // scales.shape[-1]
    if not bits:
        return None
    common = Counter(bits.values()).most_common(1)[0][0]
    quant: dict = {"group_size": GGUF_GROUP_SIZE, "bits": common, "mode": "affine"}
    for layer, b in sorted(bits.items()):
        if b != common:
            quant[layer] = {"group_size": GGUF_GROUP_SIZE, "bits": b, "mode": "affine"}
    return quant


def _tokenizer(gguf_path: Path, meta: dict):
    """A ``tokenizers.Tokenizer`` and the matching tokenizer_config dict."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in _PRE_DIGITS:
        raise ModelError(
            f"{gguf_path}: tokenizer {kind!r} (pre-tokenizer {pre!r}) is not supported; "
            "only byte-level BPE ('gpt2' with pre-tokenizer "
            f"{', '.join(sorted(_PRE_DIGITS))}) can be imported"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = meta["tokenizer.ggml.token_type"].tolist()
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]

    tok = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _PRE_DIGITS[pre]:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # Ids already exist in the vocab, so adding keeps them; this only makes the
    # tokenizer match them whole and (for control tokens) skip them when decoding.
    typed = list(zip(tokens, types, strict=True))
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, y in typed if y == _CONTROL]
    )
    tok.add_tokens([AddedToken(t, normalized=False) for t, y in typed if y == _USER_DEFINED])

    def token(key):
        i = _value(meta.get(f"tokenizer.ggml.{key}_token_id"))
        return None if i is None else tokens[i]

    bos, eos = token("bos"), token("eos")
    add_bos = bool(_value(meta.get("tokenizer.ggml.add_bos_token", False)))
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, _value(meta["tokenizer.ggml.bos_token_id"]))],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": token("padding") or eos,
        "unk_token": token("unknown"),
        "add_bos_token": add_bos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _value(meta.get("llama.context_length")),
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    return tok, config
