"""Tiny random models as real mlx-lm model folders, built offline for tests.

Each builder writes config.json, model.safetensors and a small byte-level BPE
tokenizer into a folder that ``mlx_lm.load`` reads like any downloaded model.
Weights come from instantiating mlx-lm's own model class with the config and
saving its random parameters under a fixed seed, so names and shapes always
match what the loader expects and every build is identical.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SEED = 0

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A reasoning model's: the answer opens with a thinking section, as DeepSeek-R1's does.
THINKING_TOKENS = ["<think>", "</think>"]
REASONING_TEMPLATE = CHATML_TEMPLATE.replace("'<|im_start|>assistant\n'",
                                             "'<|im_start|>assistant\n<think>\n'")

# Enough varied English for a few hundred merges; the words only have to recur.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A night shift starts when the day
shift ends, and the queue keeps every prompt until a worker takes it. What is the
capital of France? The capital of France is Paris. Write a short poem about the
sea. The sea is wide and the waves are loud; the boats go out before the cloud.
Summarise the following text in one sentence. Translate this sentence into
French. Count from one to ten: one, two, three, four, five, six, seven, eight,
nine, ten. Models read tokens, and tokens are pieces of words. Batching many
prompts together keeps the machine busy while everyone sleeps. Explain why the
sky is blue. Sunlight is scattered by the air, and blue light is scattered most.
Give three reasons to test software. Tests find mistakes early, they document
behaviour, and they let people change code without fear. Hello, world! 0123456789
"""


def build_tokenizer(folder: str | Path, vocab_size: int = 512, *,
                    thinking: bool = False) -> Path:
    """Train a small byte-level BPE tokenizer and save it in ``folder``.

    Writes tokenizer.json and tokenizer_config.json (ChatML chat template, eos
    ``<|im_end|>``). Special tokens get ids 0..2 in the order of SPECIAL_TOKENS.

    Args:
        folder: directory to write into; created if missing.
        vocab_size: target vocabulary size including the 256 byte tokens.

    Returns:
        The folder as a Path.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    # No prefix space, as in GPT-2-style and SmolLM2 tokenizers.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # Every byte is a token, so any text encodes without unknowns.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    if thinking:
        tokenizer.add_special_tokens(THINKING_TOKENS)
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": REASONING_TEMPLATE if thinking else CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return folder


def _vocab_size(folder: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()


def _build(folder: str | Path, config: dict[str, Any], *, thinking: bool = False) -> Path:
    """Write tokenizer, config.json and random float32 weights for ``config``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    folder = build_tokenizer(folder, thinking=thinking)
    config = {
        "vocab_size": _vocab_size(folder),
        "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
        **config,
    }
    model_class, args_class = _get_classes(config)
    # Seed right before construction: parameters are drawn at __init__.
    mx.random.seed(SEED)
    model = model_class(args_class.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def build_tiny_llama(folder: str | Path, *, thinking: bool = False, **overrides: Any) -> Path:
    """Build a tiny random Llama (hidden 64, 2 layers, GQA 4/2 heads) in ``folder``.

    Args:
        folder: directory to write into; created if missing.
        thinking: a reasoning model's tokenizer: ``<think>``, ``</think>``, and a chat
            template that opens the thinking.
        **overrides: config.json keys to change (e.g. ``num_hidden_layers=4``).

    Returns:
        The folder as a Path, loadable with ``mlx_lm.load``.
    """
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        **overrides,
    }
    return _build(folder, config, thinking=thinking)


def _block(attention: dict[str, Any], ffn: dict[str, Any]) -> dict[str, Any]:
    # Spelled out with every key, as in the real checkpoints' config.json.
    return {
        "attention": {
            "n_heads_in_group": None,
            "no_op": False,
            "replace_with_linear": False,
            "sparsify": None,
            "num_sink_tokens": None,
            "unshifted_sink": False,
            "use_prefill_window_in_sink_attention": False,
            "window_length": None,
            **attention,
        },
        "ffn": {
            "ffn_mult": None,
            "no_op": False,
            "replace_with_linear": False,
            "sparsify": None,
            **ffn,
        },
    }


# One of each block kind; layer 0 is real attention, as in the real models.
NEMOTRON_NAS_BLOCKS = [
    _block({"n_heads_in_group": 2}, {"ffn_mult": 1.5}),  # 4 kv heads, ffn 256
    _block({"replace_with_linear": True}, {"ffn_mult": 6.5}),  # ffn 512
    _block({"no_op": True}, {"replace_with_linear": True}),
    _block({"n_heads_in_group": 4}, {"no_op": True}),  # 2 kv heads
]


def build_tiny_nemotron_nas(folder: str | Path) -> Path:
    """Build a tiny random nemotron-nas model (hidden 64, 8 heads, 4 mixed blocks).

    The blocks mix real attention with different ``n_heads_in_group``,
    attention ``no_op`` and ``replace_with_linear``, FFN ``no_op`` and
    ``replace_with_linear``, and normal FFNs of different ``ffn_mult``. The
    config carries the Llama-3.1 ``rope_scaling`` of Llama-3_1-Nemotron-Ultra,
    which is what trips transformers' tokenizer loading (see
    worker/compat/nemotron_nas.py).

    Args:
        folder: directory to write into; created if missing.

    Returns:
        The folder as a Path, loadable with ``mlx_lm.load``.
    """
    config = {
        "model_type": "nemotron-nas",
        "architectures": ["DeciLMForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": len(NEMOTRON_NAS_BLOCKS),
        "num_attention_heads": 8,
        "num_key_value_heads": None,
        "intermediate_size": None,
        "block_configs": NEMOTRON_NAS_BLOCKS,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    return _build(folder, config)


def generate_single(model, tokenizer, prompt: list[int], max_tokens: int) -> tuple[list[int], str]:
    """Greedy tokens for one prompt with ``mlx_lm.stream_generate``, one sequence.

    Returns:
        The generated token ids (the stop token included, as BatchGenerator
        reports it) and the finish reason ("stop" or "length").
    """
    from mlx_lm import stream_generate

    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens))
    return [r.token for r in responses], responses[-1].finish_reason


def generate_batched(
    model, tokenizer, prompts: list[list[int]], max_tokens: list[int], completion_batch_size: int
) -> list[tuple[list[int], str]]:
    """Greedy tokens for all ``prompts`` through one mlx-lm ``BatchGenerator``.

    Stops on the tokenizer's eos ids. With ``completion_batch_size`` below
    ``len(prompts)`` finished slots are refilled while others are mid-decode.

    Returns:
        One ``(tokens, finish_reason)`` per prompt, in prompt order.
    """
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(
        model,
        stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
        completion_batch_size=completion_batch_size,
        # completion_batch_size is raised to at least prefill_batch_size.
        prefill_batch_size=completion_batch_size,
    )
    try:
        uids = generator.insert(prompts, max_tokens=max_tokens)
        tokens: dict[int, list[int]] = {uid: [] for uid in uids}
        reasons: dict[int, str] = {}
        while len(reasons) < len(uids):
            responses = generator.next_generated()
            if not responses:
                # Idle with requests unfinished: fail rather than spin forever.
                raise RuntimeError(f"BatchGenerator went idle; finished {len(reasons)}")
            for response in responses:
                tokens[response.uid].append(response.token)
                if response.finish_reason is not None:
                    reasons[response.uid] = response.finish_reason
    finally:
        generator.close()
    return [(tokens[uid], reasons[uid]) for uid in uids]


def run_engine(engine, batch) -> dict:
    """Every request of ``batch`` through a nightshift Engine to its result, by id."""
    results = engine.add(batch)
    for _ in range(10_000):
        if not engine.busy and not engine.suspects:
            break
        results += engine.step()
    return {r.id: r for r in results}
