"""Make MLX's CPU backend use OpenBLAS, and tell which backend MLX runs on.

The Linux CPU wheel of MLX links a reference BLAS (about 6 GFLOP/s for an fp32
64x1536 @ 1536x1536 matmul on a 2-core Linux CPU); OpenBLAS from the
``cmeel-openblas`` wheel does about 175 on two threads. It can only replace the
reference one if it is loaded first, so ``ensure_fast_blas`` re-executes the process
with ``LD_PRELOAD`` set (and lends it the ``libgfortran`` bundled with MLX where the
system has none). Nothing here imports mlx: it runs before the re-execution.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from nightshift.jobs import settings
from nightshift.jobs.errors import ConfigError

log = logging.getLogger(__name__)

BLAS_ENV = "NIGHTSHIFT_BLAS"  # "openblas" (default) or "reference"
# Set in the re-executed process so it never re-executes again.
REEXEC_MARK_ENV = "NIGHTSHIFT_BLAS_REEXEC"
OPENBLAS_THREADS_ENV = "OPENBLAS_NUM_THREADS"


def openblas_library() -> str | None:
    """Path of ``libopenblas.so.0`` from the ``cmeel-openblas`` wheel, or None.

    Found through the installed distribution's metadata, so nothing heavy is
    imported.
    """
    try:
        dist = metadata.distribution("cmeel-openblas")
    except metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file("cmeel.prefix/lib/libopenblas.so.0")))
    return str(path) if path.is_file() else None


def mlx_backend() -> str:
    """The backend the installed MLX runs on: ``metal``, ``cuda``, ``cpu``, or ``none``
    (Linux with neither backend wheel: ``require_backend`` says what to install).

    Read from the installed distributions, without importing mlx (which is slow
    and would be wasted in a process about to re-execute).
    """
    if sys.platform == "darwin":
        return "metal"
    for backend, names in (("cuda", ("mlx-cuda-13", "mlx-cuda-12", "mlx-cuda")),
                           ("cpu", ("mlx-cpu",))):
        for name in names:
            try:
                metadata.distribution(name)
                return backend
            except metadata.PackageNotFoundError:
                pass
    return "none"


def require_backend() -> str:
    """The MLX backend, or a ConfigError that says how to install one.

    On Linux the ``mlx`` wheel alone has no backend; nightshift's ``cpu`` extra
    (``mlx[cpu]`` and OpenBLAS) or ``cuda`` extra (``mlx[cuda13]``) brings one, and
    ``make setup`` picks between them (cuda where ``nvidia-smi`` finds a GPU).
    """
    backend = mlx_backend()
    if backend == "none":
        raise ConfigError(
            "MLX has no backend installed: on Linux install nightshift with the cpu extra "
            "(pip install -e '.[cpu]') or, on an NVIDIA GPU, the cuda extra "
            "(pip install -e '.[cuda]'); make setup chooses for you")
    return backend


def openblas_loaded(pid: int | str = "self") -> bool:
    """Whether OpenBLAS is mapped into a process (Linux ``/proc/<pid>/maps``)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
    return "libopenblas" in maps


def openblas_threads() -> int | None:
    """The BLAS threads of this process's OpenBLAS; None where it does not use OpenBLAS."""
    if not openblas_loaded():
        return None
    return int(os.environ.get(OPENBLAS_THREADS_ENV) or cpu_threads())


def avx512() -> bool:
    """Whether this CPU has AVX-512 (Linux: ``/proc/cpuinfo``)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512f " in f"{flags} "


def cpu_threads() -> int:
    """Physical cores this process may use: OpenBLAS gains nothing from SMT siblings."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:
        allowed = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or allowed
    except ImportError:
        physical = allowed
    return max(1, min(allowed, physical))


def _gfortran_shim() -> str | None:
    """A folder that provides ``libgfortran.so.5`` for OpenBLAS, or None if not needed.

    The cmeel OpenBLAS needs ``libgfortran.so.5``, which many machines lack. The
    MLX CPU wheel bundles one under a mangled name (auditwheel); a folder of
    symlinks under the plain name, put on ``LD_LIBRARY_PATH``, lends it. Its
    sibling libquadmath is linked too because ``$ORIGIN`` resolves to the symlink's
    folder, not the target's.
    """
    import ctypes.util

    if ctypes.util.find_library("gfortran"):
        return None
    try:
        files = metadata.distribution("mlx-cpu").files or []
    except metadata.PackageNotFoundError:
        return None
    found = [f for f in files if f.name.startswith("libgfortran") and ".so" in f.name]
    if not found:
        return None
    source = Path(str(found[0].locate())).parent
    shim = settings.home().resolve() / "cache" / "blas-libs"
    shim.mkdir(parents=True, exist_ok=True)
    links = {p.name: p for p in source.iterdir()
             if p.name.startswith(("libgfortran", "libquadmath"))}
    links["libgfortran.so.5"] = source / found[0].name
    for name, target in links.items():
        link = shim / name
        if link.is_symlink() and os.readlink(link) == str(target):
            continue
        # Build beside and rename: several workers may start at once.
        tmp = shim / f".{name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, link)
    return str(shim)


def fast_blas_env(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment that makes a new process load OpenBLAS, or None if there is none.

    Adds OpenBLAS to ``LD_PRELOAD``, the libgfortran shim to ``LD_LIBRARY_PATH``
    where needed, and ``OPENBLAS_NUM_THREADS`` (physical cores) unless already set.
    Other OpenBLAS variables (``OPENBLAS_CORETYPE``...) are left as they are.
    """
    lib = openblas_library()
    if lib is None:
        return None
    env = dict(os.environ if environ is None else environ)
    env["LD_PRELOAD"] = " ".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    shim = _gfortran_shim()
    if shim:
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (shim, env.get("LD_LIBRARY_PATH", "")) if p)
    env.setdefault(OPENBLAS_THREADS_ENV, str(cpu_threads()))
    env[REEXEC_MARK_ENV] = "1"
    return env


def preloaded_env(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """``fast_blas_env``, where OpenBLAS makes MLX faster and loads here; else None.

    Only on Linux with MLX's CPU backend, unless ``NIGHTSHIFT_BLAS=reference``. A preload
    that fails to load kills a process before Python starts, so a throwaway interpreter
    tries it first (a few milliseconds); a failure is logged.
    """
    if not _preload_wanted():
        return None
    env = fast_blas_env(environ)
    if env is None:
        log.warning("cmeel-openblas is not installed; MLX uses its slow reference BLAS")
        return None
    probe = subprocess.run([sys.executable, "-S", "-c", _PROBE], env=env, capture_output=True)
    if probe.returncode != 0:
        why = probe.stderr.decode(errors="replace").strip() or (
            "an illegal instruction: a build for another CPU" if probe.returncode == -4
            else f"exit status {probe.returncode}")
        log.warning("OpenBLAS does not run here (%s); staying on the reference BLAS, "
                    "several times slower (on a CPU without AVX-512: pip install "
                    "'cmeel-openblas==0.3.29', or make setup)", why)
        return None
    return env


# One small multiplication through the preloaded library: a build for another CPU (a
# wheel built only for AVX-512, on a CPU without it) loads but dies on its first call.
_PROBE = """
import ctypes
lib = ctypes.CDLL(None)
a = (ctypes.c_float * 64)(*range(64))
c = (ctypes.c_float * 64)()
lib.cblas_sgemm(101, 111, 111, 8, 8, 8, ctypes.c_float(1), a, 8, a, 8, ctypes.c_float(0), c, 8)
assert c[0] == 1120, c[0]  # row 0 of a times column 0: sum of k * 8k
"""


def _preload_wanted() -> bool:
    return (os.environ.get(BLAS_ENV, "openblas").lower() != "reference"
            and sys.platform.startswith("linux") and mlx_backend() == "cpu")


def ensure_fast_blas(argv: Sequence[str] | None = None, *, enabled: bool = True) -> None:
    """Re-execute this process with OpenBLAS preloaded, when that makes MLX faster.

    Call it first thing in the worker's entry point: everything before it runs twice.
    Does nothing (and returns) when disabled by ``enabled=False``, when OpenBLAS is
    mapped already (a supervisor started this process with ``preloaded_env``), when
    this process is already the re-executed one, or where ``preloaded_env`` gives
    None. On success it does not return.

    Args:
        argv: the interpreter's arguments for the new process; default
            ``sys.orig_argv[1:]`` (keeps ``-m module`` and ``-c`` intact).
        enabled: False keeps the reference BLAS.
    """
    if not enabled or openblas_loaded():
        return
    if "pytest" in sys.modules:
        # Re-executing would restart the whole test session; tests that need
        # OpenBLAS start a subprocess through this function instead.
        return
    if os.environ.get(REEXEC_MARK_ENV):
        if _preload_wanted():
            log.warning("OpenBLAS was preloaded but is not mapped; staying on the reference "
                        "BLAS")
        return
    env = preloaded_env()
    if env is None:
        return
    args = list(sys.orig_argv[1:] if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], env)

