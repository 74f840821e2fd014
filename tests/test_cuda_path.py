"""The NVIDIA path, checked on the CPU: make setup installs the cuda extra where
nvidia-smi finds a GPU, an mlx-cuda wheel is recognised, and a CUDA install keeps the
quantized weights and runs one process (no machine here has a GPU to run it on)."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from nightshift.worker import blas, processes
from nightshift.worker.plan import packs_linear_weights, planned_dtype

ROOT = Path(__file__).resolve().parent.parent
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the backend is chosen on Linux")


def _setup_commands(tmp_path, nvidia_smi_status: int) -> str:
    """What ``make setup`` would run, with an ``nvidia-smi`` that exits with the status."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(f"#!/bin/sh\nexit {nvidia_smi_status}\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run(["make", "-n", "-B", "setup"], cwd=ROOT, env=env, check=True,
                          capture_output=True, text=True).stdout


@linux_only
def test_make_setup_installs_the_cuda_extra_only_where_nvidia_smi_finds_a_gpu(tmp_path):
    (tmp_path / "gpu").mkdir()
    (tmp_path / "none").mkdir()
    assert "-e '.[cuda,test," in _setup_commands(tmp_path / "gpu", 0)
    without = _setup_commands(tmp_path / "none", 1)
    assert "-e '.[cpu,test," in without and "cuda" not in without


def test_the_cuda_extra_brings_mlx_for_cuda_13():
    # (tomllib is Python 3.11+; the extra is one line of pyproject.toml)
    line = re.search(r"^cuda = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert line and '"mlx[cuda13]' in line.group(1)


@linux_only
def test_an_installed_mlx_cuda_wheel_is_the_cuda_backend(monkeypatch):
    def only_cuda(name):
        if name != "mlx-cuda-13":
            raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(blas.metadata, "distribution", only_cuda)
    assert blas.mlx_backend() == "cuda"
    assert blas.require_backend() == "cuda"


def test_on_cuda_quantized_weights_stay_and_one_process_serves(monkeypatch):
    monkeypatch.setattr(blas, "mlx_backend", lambda: "cuda")
    assert planned_dtype({"quantization": {"bits": 4, "group_size": 64}}) == "as-loaded"
    assert processes.auto_processes() == 1
    assert not packs_linear_weights("cuda", True, 1)
    monkeypatch.setattr(blas, "mlx_backend", lambda: "cpu")  # the CPU converts them
    assert planned_dtype({"quantization": {"bits": 4, "group_size": 64}}) != "as-loaded"
