"""worker/blas.py: OpenBLAS preloaded by re-executing the process, and only then."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from nightshift.worker import blas

ROOT = Path(__file__).resolve().parents[1]
linux_cpu = pytest.mark.skipif(
    not sys.platform.startswith("linux") or blas.mlx_backend() != "cpu"
    or blas.openblas_library() is None,
    reason="OpenBLAS preloading is for Linux with MLX's CPU backend and cmeel-openblas",
)


@pytest.fixture(autouse=True)
def default_blas_settings(monkeypatch):
    for name in ("NIGHTSHIFT_BLAS", blas.REEXEC_MARK_ENV):
        monkeypatch.delenv(name, raising=False)


# A child that goes through ensure_fast_blas, then checks a matmul against numpy
# and waits so the parent can read its memory map.
CHILD = textwrap.dedent("""
    import sys
    from nightshift.worker.blas import ensure_fast_blas
    ensure_fast_blas()
    import mlx.core as mx, numpy as np
    a = mx.random.normal((64, 384)); b = mx.random.normal((384, 256))
    err = float(np.abs(np.array(a @ b) - np.array(a) @ np.array(b)).max())
    print(err, flush=True)
    sys.stdin.readline()
""")


def run_child(env_extra: dict[str, str] | None = None) -> tuple[bool, float]:
    """Start CHILD; return (OpenBLAS mapped in it, matmul error)."""
    env = {**os.environ, **(env_extra or {})}
    child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        err = float(child.stdout.readline())
        # execve keeps the pid: this is the re-executed process.
        mapped = blas.openblas_loaded(child.pid)
        child.communicate("\n", timeout=60)
    finally:
        child.kill()
    assert child.returncode == 0
    return mapped, err


@linux_cpu
def test_openblas_library_is_the_cmeel_one():
    path = blas.openblas_library()
    assert path.endswith("cmeel.prefix/lib/libopenblas.so.0")
    assert Path(path).is_file()


@linux_cpu
def test_child_started_through_ensure_fast_blas_maps_openblas_and_computes_right():
    mapped, err = run_child()
    assert mapped
    assert err < 1e-3


@linux_cpu
def test_reference_setting_keeps_the_bundled_blas():
    mapped, err = run_child({"NIGHTSHIFT_BLAS": "reference"})
    assert not mapped
    assert err < 1e-3


@linux_cpu
def test_a_marked_process_never_re_executes():
    # The mark without the preload: it must carry on rather than exec again.
    mapped, _ = run_child({blas.REEXEC_MARK_ENV: "1"})
    assert not mapped


@linux_cpu
def test_fast_blas_env_sets_threads_unless_given():
    env = blas.fast_blas_env({"OPENBLAS_CORETYPE": "Haswell"})
    assert blas.openblas_library() in env["LD_PRELOAD"]
    assert int(env["OPENBLAS_NUM_THREADS"]) >= 1
    assert env["OPENBLAS_CORETYPE"] == "Haswell"
    assert blas.fast_blas_env({"OPENBLAS_NUM_THREADS": "7"})["OPENBLAS_NUM_THREADS"] == "7"


@linux_cpu
def test_an_openblas_built_for_another_cpu_is_refused_not_preloaded(tmp_path, caplog,
                                                                    monkeypatch):
    """A wheel built only for AVX-512 loads on a CPU without it and dies at its first
    multiplication: the probe multiplies, so the worker stays on the reference BLAS."""
    source = tmp_path / "fake.c"
    source.write_text("void cblas_sgemm(void) { __builtin_trap(); }\n")  # SIGILL, as ud2
    fake = tmp_path / "libopenblas.so.0"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(fake), str(source)], check=True)
    assert blas.preloaded_env() is not None  # the installed one multiplies here
    monkeypatch.setattr(blas, "openblas_library", lambda: str(fake))
    assert blas.preloaded_env() is None
    assert "illegal instruction" in caplog.text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="make setup's Linux choice")
def test_make_setup_installs_the_avx2_openblas_on_an_x86_cpu_without_avx512():
    def install_line(*settings):
        out = subprocess.run(["make", "-n", "-B", "setup", *settings], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        return next(line for line in out.splitlines() if "pip install -e" in line)

    avx2 = install_line("BACKEND=cpu", "CPU_FLAGS=flags : fpu fma avx2")
    assert avx2.endswith("cmeel-openblas==0.3.29")
    for other in (["BACKEND=cpu", "CPU_FLAGS=flags : fma avx2 avx512f"],  # the newest runs
                  ["BACKEND=cpu", "CPU_FLAGS=Features : fp asimd"],  # not x86-64
                  ["BACKEND=cuda", "CPU_FLAGS=flags : fma avx2"]):  # no OpenBLAS at all
        assert "cmeel-openblas" not in install_line(*other), other


def test_ensure_fast_blas_disabled_returns():
    blas.ensure_fast_blas(enabled=False)  # would not return if it re-executed



@pytest.mark.skipif(sys.platform == "darwin", reason="macOS always has Metal")
def test_linux_without_a_backend_wheel_is_told_which_extra_to_install(monkeypatch):
    from importlib import metadata

    from nightshift.jobs.errors import ConfigError

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    assert blas.require_backend() in ("cpu", "cuda")  # this installation has one
    monkeypatch.setattr(blas.metadata, "distribution", missing)
    assert blas.mlx_backend() == "none"
    with pytest.raises(ConfigError, match=r"cpu extra .*cuda extra"):
        blas.require_backend()
