"""Fixes for nemotron-nas models (Llama-3_1-Nemotron-Ultra and kin) on mlx-lm.

When to drop each part (the one place that says so):

- ``apply``: mlx-lm <= 0.32.2 (``LAST_BROKEN_MLX_LM``) gives attention blocks that
  are ``replace_with_linear`` a KVCache that is never filled; BatchGenerator then
  fails when it pads, merges or extracts the batch's caches. Drop it when the pinned
  mlx-lm makes caches only for real attention layers:
  ``tests/test_nemotron_nas.py::test_unpatched_model_crashes_in_batch_mode`` fails
  on the first release that does. If a newer pin still crashes there, raise
  ``LAST_BROKEN_MLX_LM`` instead (the batched==single test fails on it too).
- ``load_kwargs``: transformers 5.x does not know model_type "nemotron-nas", builds
  a bare ``PreTrainedConfig`` while loading the tokenizer, and crashes on its
  ``rope_scaling``. Drop it when
  ``tests/test_nemotron_nas.py::test_plain_load_fails_on_tokenizer`` fails.

Both act on one loaded model or one load call; nothing in mlx-lm or transformers is
changed globally.
"""

from __future__ import annotations

import functools
import re
from typing import Any

MODEL_TYPE = "nemotron-nas"
LAST_BROKEN_MLX_LM = "0.32.2"


def _is_real_attention(layer: Any) -> bool:
    """True for a block whose attention reads and writes a KV cache."""
    config = layer.attention_config
    return not (config.no_op or config.replace_with_linear)


def _is_patched(model: Any) -> bool:
    return isinstance(model, _CachesForRealAttention)


def _release(version: str) -> tuple[int, ...]:
    # "0.32.2" -> (0, 32, 2); a ".devN" or "rcN" suffix is ignored.
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def _mlx_lm_is_broken() -> bool:
    import mlx_lm

    return _release(mlx_lm.__version__) <= _release(LAST_BROKEN_MLX_LM)


def needs_patch(model: Any) -> bool:
    """Whether ``model`` needs ``apply`` before it can run in a BatchGenerator.

    Args:
        model: a model returned by ``mlx_lm.load``.

    Returns:
        True for an unpatched nemotron-nas model with at least one
        ``replace_with_linear`` attention block, on an mlx-lm release known broken.
    """
    if getattr(model, "model_type", None) != MODEL_TYPE or _is_patched(model):
        return False
    if not _mlx_lm_is_broken():
        return False
    return any(
        layer.self_attn is not None and not _is_real_attention(layer) for layer in model.layers
    )


def apply(model: Any) -> Any:
    """Give KV caches only to real attention layers of a nemotron-nas ``model``.

    Changes the class of this one model instance (and of its inner
    ``NemotronNASModel``) to a subclass whose ``make_cache`` and layer loop agree
    on "one cache per real attention layer"; other instances and mlx-lm itself are
    untouched. Weights are shared, not copied. Idempotent, and a no-op where
    ``needs_patch`` is False, so callers may apply it to every model they load.

    Args:
        model: a model returned by ``mlx_lm.load``.

    Returns:
        The same model object.
    """
    if not needs_patch(model):
        return model
    model.model.__class__ = _subclass(type(model.model), _LayersSkipLinearAttention)
    model.__class__ = _subclass(type(model), _CachesForRealAttention)
    return model


def load_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """Extra keyword arguments for ``mlx_lm.load`` of the model with ``config``.

    For a nemotron-nas config with ``rope_scaling``, hands the tokenizer an empty
    transformers config, so ``AutoTokenizer`` reads the tokenizer files alone
    instead of failing on the model config it cannot parse.

    Args:
        config: the model's config.json as a dict.

    Returns:
        ``{"tokenizer_config": {...}}`` where needed, else ``{}``.
    """
    if config.get("model_type") != MODEL_TYPE or not config.get("rope_scaling"):
        return {}
    import transformers

    return {"tokenizer_config": {"config": transformers.PretrainedConfig()}}


@functools.cache
def _subclass(base: type, mixin: type) -> type:
    # One subclass per base class, so repeated loads share it.
    return type(f"{base.__name__}Patched", (mixin, base), {})


class _CachesForRealAttention:
    """Mixin for mlx-lm's nemotron-nas ``Model``."""

    def make_cache(self) -> list:
        from mlx_lm.models.cache import KVCache

        return [KVCache() for layer in self.layers if _is_real_attention(layer)]


class _LayersSkipLinearAttention:
    """Mixin for mlx-lm's ``NemotronNASModel``: the 0.32.2 loop, real attention only."""

    def __call__(self, inputs, cache=None):
        from mlx_lm.models.base import create_attention_mask

        h = self.embed_tokens(inputs)
        real = [_is_real_attention(layer) for layer in self.layers]
        if cache is None:
            cache = [None] * sum(real)
        # The mask follows the first real attention cache (upstream used cache[0],
        # which could belong to a linear block and never fill).
        mask = create_attention_mask(h, cache[0] if cache else None)
        caches = iter(cache)
        for layer, has_cache in zip(self.layers, real):
            h = layer(h, mask, cache=next(caches) if has_cache else None)
        return self.norm(h)
