"""The tiny random models load with mlx-lm and behave like real ones."""

import json

import mlx.core as mx
import mlx_lm
import pytest

from tests.tiny_models import (
    EOS_TOKEN,
    SPECIAL_TOKENS,
    build_tiny_llama,
    build_tiny_nemotron_nas,
    generate_batched,
    generate_single,
)


@pytest.fixture(autouse=True)
def nightshift_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = build_tiny_llama(tmp_path_factory.mktemp("llama"))
    return mlx_lm.load(str(folder))


def test_tokenizer_round_trips_and_has_chatml(llama):
    _, tokenizer = llama
    text = "What is the capital of France? Zebra-quartz 42 ünïcode!"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    for token in SPECIAL_TOKENS:
        assert tokenizer.encode(token) == [SPECIAL_TOKENS.index(token)]
    assert tokenizer.eos_token_ids == {SPECIAL_TOKENS.index(EOS_TOKEN)}
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_builds_are_deterministic(tmp_path):
    first = build_tiny_llama(tmp_path / "a", num_hidden_layers=3)
    second = build_tiny_llama(tmp_path / "b", num_hidden_layers=3)
    assert json.loads((first / "config.json").read_text())["num_hidden_layers"] == 3
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json"]:
        assert (first / name).read_text() == (second / name).read_text()
    a = mx.load(str(first / "model.safetensors"))
    b = mx.load(str(second / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
    assert all(v.dtype == mx.float32 for v in a.values())


def test_nemotron_nas_mixes_every_block_kind(tmp_path):
    from nightshift.worker.compat.nemotron_nas import load_kwargs

    folder = build_tiny_nemotron_nas(tmp_path / "nas")
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3"
    model, _ = mlx_lm.load(str(folder), **load_kwargs(config))
    attention = [layer.attention_config for layer in model.layers]
    ffn = [layer.ffn_config for layer in model.layers]
    assert any(a.no_op for a in attention)
    assert any(a.replace_with_linear for a in attention)
    assert len({a.n_heads_in_group for a in attention if a.n_heads_in_group}) > 1
    assert any(f.no_op for f in ffn)
    assert any(f.replace_with_linear for f in ffn)
    widths = {
        layer.mlp.gate_proj.weight.shape[0]
        for layer in model.layers
        if layer.ffn_config.ffn_mult is not None
    }
    assert len(widths) > 1


def test_llama_batched_equals_single(llama):
    model, tokenizer = llama
    texts = ["Hi", "The sea is", "What is the capital of France?", "Count from one to ten:"]
    prompts = [tokenizer.encode(t) for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)
    max_tokens = [16, 9, 16, 5]
    batched = generate_batched(model, tokenizer, prompts, max_tokens, completion_batch_size=2)
    single = [generate_single(model, tokenizer, p, m) for p, m in zip(prompts, max_tokens)]
    assert batched == single
