"""worker/compat/nemotron_nas.py: batching nemotron-nas models on mlx-lm 0.32.2.

The two canary tests fail on the first mlx-lm / transformers release that fixes
the problem upstream; that is the signal to drop the matching workaround.
"""

import json

import mlx_lm
import pytest
from nightshift.worker.compat import nemotron_nas

from tests.tiny_models import (
    build_tiny_llama,
    build_tiny_nemotron_nas,
    generate_batched,
    generate_single,
)

TEXTS = [
    "Hi",
    "The sea is",
    "What is the capital of France?",
    "Count from one to ten: one, two, three",
    "Explain why the sky is blue. Sunlight is scattered by the air, and",
]
# Different lengths so requests finish, and slots refill, at different steps.
MAX_TOKENS = [16, 9, 16, 5, 12]


@pytest.fixture(autouse=True)
def nightshift_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_nemotron_nas(tmp_path_factory.mktemp("nemotron-nas"))


def load(folder):
    """Load as the worker does: config first, then the tokenizer workaround."""
    config = json.loads((folder / "config.json").read_text())
    return mlx_lm.load(str(folder), **nemotron_nas.load_kwargs(config))


def test_plain_load_fails_on_tokenizer(folder):
    try:
        mlx_lm.load(str(folder))
    except AttributeError as error:
        assert "max_position_embeddings" in str(error)
        return
    pytest.fail(
        "mlx_lm.load now reads a nemotron-nas config with rope_scaling: "
        "drop nemotron_nas.load_kwargs"
    )


def test_load_kwargs_only_for_nemotron_nas_with_rope_scaling(folder):
    config = json.loads((folder / "config.json").read_text())
    assert set(nemotron_nas.load_kwargs(config)) == {"tokenizer_config"}
    assert nemotron_nas.load_kwargs({**config, "rope_scaling": None}) == {}
    assert nemotron_nas.load_kwargs({"model_type": "llama", "rope_scaling": {}}) == {}


def test_unpatched_model_crashes_in_batch_mode(folder):
    model, tokenizer = load(folder)
    prompts = [tokenizer.encode(t) for t in TEXTS]
    try:
        generate_batched(model, tokenizer, prompts, MAX_TOKENS, completion_batch_size=2)
    except AttributeError as error:
        # The unfilled KVCache of a linear block: its keys are None.
        assert "NoneType" in str(error)
        return
    pytest.fail(
        f"mlx-lm {mlx_lm.__version__} batches nemotron-nas without the patch: "
        "drop nemotron_nas.apply"
    )


def test_apply_is_idempotent_and_per_instance(folder, tmp_path):
    model, _ = load(folder)
    other, _ = load(folder)
    assert nemotron_nas.needs_patch(model)
    assert nemotron_nas.apply(model) is model
    patched_type = type(model)
    assert nemotron_nas.apply(model) is model
    assert type(model) is patched_type
    assert not nemotron_nas.needs_patch(model)
    # Only the real attention layers (0 and 3) hold a cache.
    real = [i for i, layer in enumerate(model.layers) if layer.attention_config.n_heads_in_group]
    assert real == [0, 3]
    assert len(model.make_cache()) == len(real)
    # The other instance, and mlx-lm's class, are untouched.
    assert nemotron_nas.needs_patch(other)
    assert len(other.make_cache()) == 3

    llama, _ = mlx_lm.load(str(build_tiny_llama(tmp_path / "llama")))
    assert not nemotron_nas.needs_patch(llama)
    assert nemotron_nas.apply(llama) is llama


def test_patched_batched_equals_unpatched_single(folder):
    reference, reference_tokenizer = load(folder)
    model, tokenizer = load(folder)
    nemotron_nas.apply(model)
    prompts = [tokenizer.encode(t) for t in TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts)

    # A random model never says <|im_end|>: make a token it does say mid-answer
    # an eos as well, so some requests stop early and others run to length.
    first, _ = generate_single(reference, reference_tokenizer, prompts[0], MAX_TOKENS[0])
    for t in (reference_tokenizer, tokenizer):
        t.add_eos_token(str(first[5]))

    single = [
        generate_single(reference, reference_tokenizer, p, m) for p, m in zip(prompts, MAX_TOKENS)
    ]
    batched = generate_batched(model, tokenizer, prompts, MAX_TOKENS, completion_batch_size=2)
    assert batched == single
    assert {reason for _, reason in single} == {"stop", "length"}
