"""Convert a float model into a quantized mlx-lm model folder, with mlx-lm's own tools.

mlx-lm does the work: ``mlx_lm.utils.load`` (lazy), ``quantize_model`` with a
``quant_predicate`` deciding each layer's bits, and ``save``. What this module adds:

* recipes by name: the Nemotron-253B notes' rule (``embed_head_6``: embedding and
  lm_head at 6 bits, every other layer at ``--q-bits``) and mlx-lm's mixed recipes
  (``mixed_2_6``, ``mixed_3_4``, ``mixed_3_6``, ``mixed_4_6``, built by
  ``mlx_lm.convert.mixed_quant_predicate_builder``);
* the nemotron-nas tokenizer workaround (worker/compat/nemotron_nas.py) on load,
  which ``mlx_lm.convert.convert`` has no way to pass, and the reason this calls
  mlx-lm's parts rather than ``convert`` itself;
* checks that name the flag and the fix before anything heavy starts.

Importing this module does not import mlx; ``check_options`` never does.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

from nightshift.jobs.errors import ModelError
from nightshift.worker.model_files import CONFIG_FILE, read_config

# The rule from running Nemotron-253B on an M3 Ultra: keep the layers every token
# passes through twice (in and out) at higher precision.
EMBED_HEAD_6 = "embed_head_6"
EMBED_HEAD_BITS = 6
# mlx-lm's own mixed recipes (mlx_lm.convert.QUANT_RECIPES; tests check they agree).
MLX_LM_RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")
RECIPES = (EMBED_HEAD_6, *MLX_LM_RECIPES)
DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 64
BITS = (2, 3, 4, 5, 6, 8)  # what MLX's affine quantization supports
GROUP_SIZES = (32, 64, 128)
DTYPES = ("float16", "bfloat16", "float32")  # mlx_lm.convert.MODEL_CONVERSION_DTYPES


@dataclass(frozen=True)
class ConvertOptions:
    """How to quantize. ``q_bits`` None: the default (4), or the mixed recipe's own."""

    q_bits: int | None = None
    q_group_size: int = DEFAULT_GROUP_SIZE
    recipe: str | None = None
    dtype: str | None = None  # None: the source's torch_dtype, as mlx_lm.convert does

    def describe(self) -> str:
        """One line for ``models list``'s source column, e.g. ``embed_head_6, 4-bit, group 64``."""
        if self.recipe in MLX_LM_RECIPES:
            what = self.recipe
        elif self.recipe == EMBED_HEAD_6:
            what = f"{EMBED_HEAD_6}, {self.bits}-bit"
        else:
            what = f"{self.bits}-bit"
        return f"{what}, group {self.q_group_size}" + (f", {self.dtype}" if self.dtype else "")

    @property
    def bits(self) -> int:
        return self.q_bits or DEFAULT_BITS


def check_options(options: ConvertOptions) -> None:
    """Refuse option combinations that make no sense, before any loading.

    Raises:
        ModelError: the message names the flag and what to do instead.
    """
    if options.recipe is not None and options.recipe not in RECIPES:
        raise ModelError(f"--recipe {options.recipe}: unknown recipe; choose one of "
                         f"{', '.join(RECIPES)}")
    if options.q_bits is not None and options.q_bits not in BITS:
        raise ModelError(f"--q-bits {options.q_bits}: MLX quantizes to "
                         f"{', '.join(map(str, BITS))} bits")
    if options.q_group_size not in GROUP_SIZES:
        raise ModelError(f"--q-group-size {options.q_group_size}: MLX takes "
                         f"{', '.join(map(str, GROUP_SIZES))}")
    if options.dtype is not None and options.dtype not in DTYPES:
        raise ModelError(f"--dtype {options.dtype}: choose one of {', '.join(DTYPES)}")
    if options.recipe in MLX_LM_RECIPES and options.q_bits is not None:
        raise ModelError(f"--q-bits does not apply to --recipe {options.recipe}, which sets its "
                         "own bits (in its name): leave --q-bits out")
    if options.recipe == EMBED_HEAD_6 and options.bits >= EMBED_HEAD_BITS:
        raise ModelError(f"--recipe {EMBED_HEAD_6} keeps embedding and lm_head at "
                         f"{EMBED_HEAD_BITS} bits, above the rest: with --q-bits "
                         f"{options.q_bits} leave --recipe out")


def check_source(path: str) -> None:
    """Refuse a local source that is already quantized (re-quantizing loses quality twice).

    Raises:
        ModelError: the source's config says it is quantized.
    """
    if not (Path(path) / CONFIG_FILE).is_file():
        return  # a repo id: mlx-lm downloads it and the load reports what is wrong
    config = read_config(path)
    quant = config.get("quantization") or config.get("quantization_config")
    if quant:
        bits = quant.get("bits", "?") if isinstance(quant, dict) else "?"
        raise ModelError(
            f"{path} is already quantized ({bits}-bit): convert needs the original float "
            "weights; point SOURCE at the float model folder"
        )


def embed_head_predicate(bits: int, group_size: int = DEFAULT_GROUP_SIZE):
    """The ``embed_head_6`` recipe as an mlx-lm ``quant_predicate(path, module)``.

    Embedding and lm_head at 6 bits, every other quantizable layer at ``bits``; the
    same group size for all. (mlx-lm only asks about layers it can quantize.)
    """

    def predicate(path: str, module) -> dict:
        if "embed" in path or "lm_head" in path:
            return {"bits": EMBED_HEAD_BITS, "group_size": group_size}
        return {"bits": bits, "group_size": group_size}

    return predicate


def convert(source: str, dest: str | Path, options: ConvertOptions) -> dict:
    """Quantize the model at ``source`` into a new mlx-lm folder ``dest``.

    Args:
        source: a local float model folder, or a Hugging Face repo id (needs a network).
        dest: the folder to create; it must not exist.
        options: bits, group size, recipe, dtype.

    Returns:
        ``{"bits_per_weight": float, "quantization": {...}}`` of the saved model.

    Raises:
        ModelError: bad options, a quantized source, or mlx-lm failed to load or save.
    """
    check_options(options)
    check_source(source)
    import mlx.core as mx
    from mlx.utils import tree_map_with_path
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import compute_bits_per_weight, load, quantize_model, save
    from nightshift.worker.compat import nemotron_nas

    source_config = read_config(source) if (Path(source) / CONFIG_FILE).is_file() else {}
    # mlx-lm prints [INFO] lines on stdout; keep stdout for the command's own output.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            model, tokenizer, config = load(
                source, lazy=True, return_config=True,
                **nemotron_nas.load_kwargs(source_config),
            )
        except Exception as exc:
            raise ModelError(f"cannot load {source} to convert it: {exc}") from exc
        dtype = options.dtype or config.get("torch_dtype")
        if dtype in DTYPES:  # as mlx_lm.convert does: cast float weights first
            target = getattr(mx, dtype)
            cast = getattr(model, "cast_predicate", lambda _: True)
            model.update(tree_map_with_path(
                lambda k, v: v.astype(target)
                if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v,
                model.parameters(),
            ))
        if options.recipe in MLX_LM_RECIPES:
            try:
                predicate = mixed_quant_predicate_builder(options.recipe, model,
                                                          options.q_group_size)
            except ValueError as exc:  # no down_proj layers: not a Llama-like model
                raise ModelError(f"--recipe {options.recipe} does not fit this model ({exc}); "
                                 f"use --recipe {EMBED_HEAD_6} or plain --q-bits") from exc
        elif options.recipe == EMBED_HEAD_6:
            predicate = embed_head_predicate(options.bits, options.q_group_size)
        else:
            predicate = None
        model, config = quantize_model(model, config, options.q_group_size, options.bits,
                                       quant_predicate=predicate)
        bits_per_weight = compute_bits_per_weight(model)
        save(dest, source, model, tokenizer, config)
    return {"bits_per_weight": round(bits_per_weight, 3),
            "quantization": config.get("quantization")}
