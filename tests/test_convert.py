"""`nightshift models convert`: mlx-lm's conversion with named recipes, into the registry."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from mlx_lm.convert import MODEL_CONVERSION_DTYPES, QUANT_RECIPES, mixed_quant_predicate_builder
from nightshift.worker import convert
from nightshift.worker.compat import nemotron_nas

from tests.tiny_models import build_tiny_nemotron_nas


@pytest.fixture(scope="module")
def tiny_nemotron_dir(tmp_path_factory):
    return build_tiny_nemotron_nas(tmp_path_factory.mktemp("nemotron-nas"))


def quantizable(model) -> dict[str, nn.Module]:
    """Every layer mlx-lm can quantize (Linear and Embedding, quantized or not), by path."""
    kinds = (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding)
    return {path: m for path, m in model.named_modules() if isinstance(m, kinds)}


def bits_as_loaded(model) -> dict[str, tuple[int, int] | None]:
    """(bits, group size) of each quantizable layer of a loaded model; None if still float."""
    return {
        path: (m.bits, m.group_size) if hasattr(m, "bits") else None
        for path, m in quantizable(model).items()
    }


def saved_config(home, name) -> dict:
    return json.loads((home / "models" / name / "config.json").read_text())


def generates(model, tokenizer, n=6) -> list[int]:
    out = list(mlx_lm.stream_generate(model, tokenizer, tokenizer.encode("The sea is"),
                                      max_tokens=n))
    return [r.token for r in out]


def test_embed_head_6_recipe_bits_per_layer(invoke, tiny_model, home):
    out = invoke("models", "convert", tiny_model, "--name", "tiny-q4", "--recipe", "embed_head_6",
                 "--json")
    info = json.loads(out.stdout)  # stderr: mlx-lm's [INFO] lines
    assert info["name"] == "tiny-q4" and info["bits"] == "mixed"
    assert info["source"] == "convert:tiny (embed_head_6, 4-bit, group 64)"

    # The saved config: the default 4 bits / group 64, and a 6-bit entry for exactly
    # the embedding and lm_head (mlx-lm writes one entry per layer the predicate saw).
    config = saved_config(home, "tiny-q4")
    quant = config["quantization"]
    assert (quant["bits"], quant["group_size"]) == (4, 64)
    layers = {k: v for k, v in quant.items() if isinstance(v, dict)}
    assert {k for k, v in layers.items() if v["bits"] == 6} == {"model.embed_tokens", "lm_head"}
    assert {v["bits"] for k, v in layers.items() if k not in ("model.embed_tokens", "lm_head")} \
        == {4}
    assert {v["group_size"] for v in layers.values()} == {64}

    # The loaded model: every quantizable layer is quantized, as the config says.
    model, tokenizer = mlx_lm.load(info["path"])
    loaded = bits_as_loaded(model)
    assert set(loaded) == set(layers)
    assert {p for p, b in loaded.items() if b == (6, 64)} == {"model.embed_tokens", "lm_head"}
    assert {b for p, b in loaded.items() if p not in ("model.embed_tokens", "lm_head")} == {(4, 64)}
    assert len(generates(model, tokenizer)) == 6

    record = json.loads((home / "models" / "tiny-q4" / "nightshift.json").read_text())
    assert record["kind"] == "convert" and record["recipe"] == "embed_head_6"
    assert (record["q_bits"], record["q_group_size"]) == (4, 64)
    assert 4 < record["bits_per_weight"] < 6.1  # the tiny model is mostly embedding and head
    listed = invoke("models", "list").output
    assert "tiny-q4" in listed and "convert:tiny" in listed


def test_seed_model_with_seed_recipe(invoke, tiny_nemotron_dir, home):
    """The seed's architecture (nemotron-nas, with linear and no-op blocks) and its recipe."""
    out = invoke("models", "convert", tiny_nemotron_dir, "--name", "nemo-q4",
                 "--recipe", "embed_head_6", "--json")
    info = json.loads(out.stdout)  # stderr: mlx-lm's [INFO] lines
    config = json.loads((tiny_nemotron_dir / "config.json").read_text())
    model, tokenizer = mlx_lm.load(info["path"], **nemotron_nas.load_kwargs(config))
    loaded = bits_as_loaded(model)
    # The linear replacements of blocks 1 and 2 are quantized like any other layer.
    assert "model.layers.1.self_attn.linear" in loaded and "model.layers.2.mlp.linear" in loaded
    assert {p for p, b in loaded.items() if b == (6, 64)} == {"model.embed_tokens", "lm_head"}
    assert {b for p, b in loaded.items() if p not in ("model.embed_tokens", "lm_head")} == {(4, 64)}
    assert len(generates(model, tokenizer)) == 6


@pytest.mark.parametrize("recipe", ["mixed_3_4", "mixed_2_6"])
def test_mlx_lm_mixed_recipes(invoke, tiny_model, home, recipe):
    invoke("models", "convert", tiny_model, "--name", "mixed", "--recipe", recipe)
    model, tokenizer = mlx_lm.load(str(home / "models" / "mixed"))
    # The same bits as mlx-lm's own predicate gives each layer of the float model.
    reference, _ = mlx_lm.load(str(home / "models" / tiny_model))
    predicate = mixed_quant_predicate_builder(recipe, reference, 64)
    expected = {p: (predicate(p, m)["bits"], 64) for p, m in quantizable(reference).items()}
    assert bits_as_loaded(model) == expected
    low, high = (int(b) for b in recipe.split("_")[1:])
    assert {b for b, _ in expected.values()} == {low, high}
    assert len(generates(model, tokenizer)) == 6


def test_plain_bits_and_dtype(invoke, tiny_model, home):
    invoke("models", "convert", tiny_model, "--name", "q8", "--q-bits", "8",
           "--q-group-size", "32", "--dtype", "float16")
    model, _ = mlx_lm.load(str(home / "models" / "q8"))
    assert set(bits_as_loaded(model).values()) == {(8, 32)}
    assert model.model.norm.weight.dtype == mx.float16
    assert saved_config(home, "q8")["quantization"]["bits"] == 8


def test_refusals_leave_nothing_behind(invoke, tiny_model, home):
    result = invoke("models", "convert", tiny_model, "--name", "x", "--recipe", "mixed_3_4",
                    "--q-bits", "4", expect=1)
    assert "--q-bits does not apply to --recipe mixed_3_4" in result.output
    result = invoke("models", "convert", tiny_model, "--name", "x", "--recipe", "embed_head_6",
                    "--q-bits", "8", expect=1)
    assert "leave --recipe out" in result.output
    result = invoke("models", "convert", tiny_model, "--name", tiny_model, expect=1)
    assert "already exists" in result.output
    result = invoke("models", "convert", "nope", "--name", "x", expect=1)
    assert "not found" in result.output
    invoke("models", "convert", tiny_model, "--name", "q4")
    result = invoke("models", "convert", "q4", "--name", "q4-again", expect=1)
    assert "already quantized (4-bit)" in result.output
    assert sorted(p.name for p in (home / "models").iterdir()) == ["q4", "tiny"]


def test_a_model_that_fails_to_load_leaves_no_folder(invoke, tiny_model, home, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(home / "models" / tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    result = invoke("models", "convert", broken, "--name", "x", expect=1)
    assert f"cannot load {broken}" in result.output
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny"]


def test_recipe_names_follow_mlx_lm():
    assert convert.MLX_LM_RECIPES == tuple(QUANT_RECIPES)
    assert convert.DTYPES == tuple(MODEL_CONVERSION_DTYPES)
