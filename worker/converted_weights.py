"""A model's weights as the compute plan converted them, kept for the next start.

On a CPU the worker runs float32 weights (worker/plan.py), and MLX's ``dequantize``
converts them at every load: for the default model about 2.5 s of a 3.5 s load (it
computes in float16, one element at a time). The converted weights are written once to
``$NIGHTSHIFT_HOME/cache/weights`` and read back at later starts in about half a
second, the same bytes. A file is keyed by the model folder, its weights' mtimes, the
dtype and MLX's version (a new MLX may dequantize differently), and written only where
the disk keeps room for it twice over. ``NIGHTSHIFT_KEEP_WEIGHTS`` names another folder
(several data directories can share one), or ``0`` keeps nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from nightshift.jobs import settings
from nightshift.worker.plan import ComputePlan, apply_plan

log = logging.getLogger("nightshift.weights")
KEEP_ENV = "NIGHTSHIFT_KEEP_WEIGHTS"


def apply(model: Any, plan: ComputePlan, model_path: str | None) -> None:
    """``apply_plan(model, plan)``, from the kept conversion where there is one, keeping
    the conversion where there was none. ``model_path``: the local model folder, or None
    (a repo id: nothing is kept)."""
    folder = kept_folder()
    if plan.weights == "as-loaded" or model_path is None or folder is None:
        apply_plan(model, plan)
        return
    from mlx.utils import tree_flatten

    path = folder / kept_name(model_path, plan.weights)
    converted = _read(path, model) if path.is_file() else None
    if converted is not None:
        apply_plan(model, plan, converted)
        log.info("weights as %s read from %s", plan.weights, path)
        return
    apply_plan(model, plan)
    try:
        _keep(path, dict(tree_flatten(model.parameters())), plan.weights)
    except (OSError, RuntimeError) as exc:  # MLX's write errors are RuntimeErrors
        # A full disk, a folder not writable: this start goes on; the next converts again.
        log.warning("weights as %s not kept in %s: %s", plan.weights, path.parent, exc)


def _keep(path: Path, weights: dict[str, Any], dtype: str) -> None:
    """Write the conversion to ``path``, atomically, in place of this model's older ones.
    Processes that load the model side by side may each write it: the last one wins."""
    import mlx.core as mx

    size = sum(v.nbytes for v in weights.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(path.parent).free < 2 * size:
        log.info("weights as %s not kept: the disk has less than twice their %.1f GB free",
                 dtype, size / 1e9)
        return
    model = path.name.split("-")[0]
    for old in path.parent.glob(f"{model}-*.safetensors"):
        if old != path:  # this model's conversions for other files or versions
            old.unlink(missing_ok=True)
    for old in path.parent.glob(f"tmp-*-{model}-*.safetensors"):
        pid = old.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):  # left by a process killed writing it
            old.unlink(missing_ok=True)
    tmp = temporary(path, os.getpid())
    try:
        mx.save_safetensors(str(tmp), weights)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("weights as %s kept in %s for the next start (%.1f GB)", dtype, path, size / 1e9)


def temporary(path: Path, pid: int) -> Path:
    """Where process ``pid`` writes ``path`` first: a name the clean-up above leaves alone
    (another process may be writing it)."""
    return path.with_name(f"tmp-{pid}-{path.name}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _read(path: Path, model: Any) -> dict[str, Any] | None:
    """The kept conversion, if it is whole and fits this model; else None (logged):
    converting again is the remedy."""
    import mlx.core as mx

    try:
        converted = mx.load(str(path))
        mx.eval(list(converted.values()))
    except (RuntimeError, ValueError) as exc:
        log.warning("cannot read the kept weights %s (%s): converting again", path, exc)
        return None
    if {k: tuple(v.shape) for k, v in converted.items()} != _converted_shapes(model):
        log.warning("the kept weights %s do not fit the model: converting again", path)
        return None
    return converted


def _converted_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape once quantized layers are converted (their packed
    ``weight`` unpacked; ``scales`` and ``biases`` gone)."""
    from mlx.utils import tree_flatten

    quantized = {name: m for name, m in model.named_modules()
                 if hasattr(m, "bits") and hasattr(m, "scales")}
    shapes = {}
    for key, value in tree_flatten(model.parameters()):
        owner, _, leaf = key.rpartition(".")
        module = quantized.get(owner)
        if module is None or leaf == "bias":
            shapes[key] = tuple(value.shape)
        elif leaf == "weight":
            shapes[key] = (*value.shape[:-1], value.shape[-1] * 32 // module.bits)
    return shapes


def kept_folder() -> Path | None:
    """Where conversions are kept (None: nowhere)."""
    chosen = os.environ.get(KEEP_ENV)
    if chosen == "0":
        return None
    return Path(chosen).expanduser() if chosen else settings.home() / "cache" / "weights"


def kept_name(model_path: str | Path, weights: str) -> str:
    """The file name of the conversion of this model folder's current files to ``weights``."""
    import mlx.core as mx

    folder = Path(model_path).resolve()
    files = sorted(folder.glob("*.safetensors"))
    stamp = "|".join(f"{p.name}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in files)
    version = f"{stamp}|{weights}|mlx {mx.__version__}"
    return f"{_digest(str(folder))}-{_digest(version)}.safetensors"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
