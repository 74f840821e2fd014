"""Where kernels built for this CPU live: one folder per user, CPU and compiler, in
the system's temporary one, never shared with MLX's plain builds nor with another
machine (worker/native_kernels.py builds MLX's kernels there, worker/cpu_kernels.py
nightshift's own)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# What native_kernels adds to MLX's builds of its compiled kernels (part of the folder's key).
MLX_FLAGS = ("-march=native", "-ffp-contract=off")


def real_compiler() -> str | None:
    """``g++``, not the wrapper: a process started by a worker inherits its folder on PATH."""
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if "nightshift-kernels-" not in d)
    return shutil.which("g++", path=path)


def kernels_folder(compiler: str) -> Path | None:
    """The kernels' folder: one per user, CPU model and instruction set, and compiler,
    this user's alone (MLX and worker/cpu_kernels.py load what they find there); None
    if it cannot be."""
    try:
        cpu = "\n".join(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith(("model name", "flags", "Features")))
    except OSError:
        cpu = ""
    key = hashlib.sha256(f"{cpu}\n{compiler}\n{MLX_FLAGS}".encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"nightshift-kernels-{os.getuid()}-{key}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.stat()
    except OSError:
        return None
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        log.warning("not building MLX's kernels in %s: another user can write there", folder)
        return None
    return folder
