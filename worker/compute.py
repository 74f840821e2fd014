"""Pick the fastest way to run a model on this machine.

Three choices matter; the numbers were measured on a 2-core Linux CPU:

* BLAS. The Linux CPU wheel of MLX links a reference BLAS (about 6 GFLOP/s for an
  fp32 64x1536 @ 1536x1536 matmul here); OpenBLAS from the ``cmeel-openblas``
  wheel does about 175 on two threads. It can only replace the reference one if
  it is loaded first, so ``ensure_fast_blas`` re-executes the process with
  ``LD_PRELOAD`` set (and lends it the ``libgfortran`` bundled with MLX where
  the system has none).
* Weight dtype. MLX's quantized kernels are the fast path on Metal and CUDA, but
  on CPU they are much slower than float32 weights through OpenBLAS; bfloat16
  and float16 matmuls do not use BLAS at all. So on CPU the weights are
  dequantized to float32 (see ``_cpu_weights``).
* Batch size. Throughput rises with the batch until attention and padding cost
  more than they save; the best size is measured once per model and remembered.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from jobs import settings

log = logging.getLogger(__name__)

BLAS_ENV = "NIGHTSHIFT_BLAS"  # "openblas" (default) or "reference"
# Set in the re-executed process so it never re-executes again.
REEXEC_MARK_ENV = "NIGHTSHIFT_BLAS_REEXEC"
OPENBLAS_THREADS_ENV = "OPENBLAS_NUM_THREADS"

WEIGHT_DTYPES = ("as-loaded", "float32", "bfloat16", "float16")

BATCH_CANDIDATES = (8, 16, 32, 48, 64)
# A batch-size measurement taken while other processes used more than this share of
# the CPU is not remembered.
CONTENDED_SHARE = 0.25
BATCH_CACHE_FILE = "batch-sizes.json"


# ---------------------------------------------------------------- BLAS


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
    """The backend the installed MLX runs on: ``metal``, ``cuda`` or ``cpu``.

    Read from the installed distributions, without importing mlx (which is slow
    and would be wasted in a process about to re-execute).
    """
    if sys.platform == "darwin":
        return "metal"
    for name in ("mlx-cuda-13", "mlx-cuda-12", "mlx-cuda"):
        try:
            metadata.distribution(name)
            return "cuda"
        except metadata.PackageNotFoundError:
            pass
    return "cpu"


def openblas_loaded(pid: int | str = "self") -> bool:
    """Whether OpenBLAS is mapped into a process (Linux ``/proc/<pid>/maps``)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
    return "libopenblas" in maps


def _cpu_threads() -> int:
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
    env.setdefault(OPENBLAS_THREADS_ENV, str(_cpu_threads()))
    env[REEXEC_MARK_ENV] = "1"
    return env


def ensure_fast_blas(argv: Sequence[str] | None = None, *, enabled: bool = True) -> None:
    """Re-execute this process with OpenBLAS preloaded, when that makes MLX faster.

    Only on Linux with MLX's CPU backend, and only if OpenBLAS is not mapped
    already. Call it first thing in the worker's entry point: everything before it
    runs twice. Does nothing (and returns) when disabled by ``enabled=False`` or
    ``NIGHTSHIFT_BLAS=reference``, when this process is already the re-executed
    one, or when OpenBLAS is not installed or cannot load (logged). On success it
    does not return.

    Args:
        argv: the interpreter's arguments for the new process; default
            ``sys.orig_argv[1:]`` (keeps ``-m module`` and ``-c`` intact).
        enabled: False keeps the reference BLAS.
    """
    if not enabled or os.environ.get(BLAS_ENV, "openblas").lower() == "reference":
        return
    if not sys.platform.startswith("linux") or mlx_backend() != "cpu":
        return
    if openblas_loaded():
        return
    if "pytest" in sys.modules:
        # Re-executing would restart the whole test session; tests that need
        # OpenBLAS start a subprocess through this function instead.
        return
    if os.environ.get(REEXEC_MARK_ENV):
        log.warning("OpenBLAS was preloaded but is not mapped; staying on the reference BLAS")
        return
    env = fast_blas_env()
    if env is None:
        log.warning("cmeel-openblas is not installed; MLX uses its slow reference BLAS")
        return
    # A preload that fails to load kills the process before Python starts: try it
    # on a throwaway interpreter first (a few milliseconds).
    probe = subprocess.run([sys.executable, "-S", "-c", ""], env=env, capture_output=True)
    if probe.returncode != 0:
        log.warning("OpenBLAS does not load here (%s); staying on the reference BLAS",
                    probe.stderr.decode(errors="replace").strip())
        return
    args = list(sys.orig_argv[1:] if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], env)


# ---------------------------------------------------------------- plan


@dataclass
class ComputePlan:
    """How the worker runs the model on this machine.

    Attributes:
        device: ``metal``, ``cuda`` or ``cpu``.
        blas: ``openblas`` or ``reference`` (Linux CPU), ``accelerate`` (macOS), ``n/a``.
        weights: ``as-loaded`` or the float dtype the weights are converted to.
        loaded: what the weights are in the files (``4-bit``, ``4/8-bit``, ``float16``...).
        batch_size: sequences decoded together; None until chosen or measured.
        threads: BLAS threads (OpenBLAS only).
    """

    device: str
    blas: str
    weights: str
    loaded: str
    batch_size: int | None = None
    threads: int | None = None
    batch_curve: dict[int, float] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the worker's start-up message and the benchmark."""
        blas = self.blas + (f" x{self.threads}" if self.threads else "")
        if self.weights == "as-loaded":
            weights = f"weights {self.loaded} as loaded"
        else:
            weights = f"weights {self.loaded} -> {self.weights}"
        batch = f"batch {self.batch_size}" if self.batch_size else "batch to measure"
        return f"{self.device}, BLAS {blas}, {weights}, {batch}"


def quantization_of(model: Any) -> str | None:
    """``"4-bit"``, ``"4/8-bit"``... for a model with quantized layers, else None."""
    bits = sorted({m.bits for _, m in model.named_modules()
                   if hasattr(m, "bits") and hasattr(m, "scales")})
    return "/".join(str(b) for b in bits) + "-bit" if bits else None


def _float_dtype_name(model: Any) -> str:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    for _, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            return str(value.dtype).split(".")[-1]
    return "float32"


def _fast_cpu_blas() -> bool:
    return sys.platform == "darwin" or openblas_loaded()


def _cpu_weights(loaded: str) -> str:
    """The weight dtype to run on CPU, given the stored one (``4-bit``, ``float16``...).

    SmolLM2-135M here, 32 sequences, decode tok/s: with OpenBLAS float32 177,
    bfloat16 17, float16 13, 4-bit 8 (the half types and quantized kernels do not
    use BLAS). With the reference BLAS float32 drops to 8.5, so bfloat16 is best
    for quantized weights; float weights are then kept as they are.
    """
    if _fast_cpu_blas():
        return "as-loaded" if loaded == "float32" else "float32"
    return "bfloat16" if loaded.endswith("-bit") else "as-loaded"


def _check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weights dtype {dtype!r}; choose from {', '.join(WEIGHT_DTYPES)}")


def planned_dtype(config: dict, dtype: str | None = None) -> str:
    """The weights policy ``choose_plan`` will pick, from ``config.json`` alone.

    For the memory estimate before loading. Returns ``dtype`` if given, else
    ``as-loaded`` on Metal/CUDA and the CPU choice of ``choose_plan``.

    Raises:
        ValueError: for an unknown dtype.
    """
    _check_dtype(dtype)
    if dtype:
        return dtype
    if mlx_backend() != "cpu":
        return "as-loaded"
    q = config.get("quantization") or config.get("quantization_config")
    if isinstance(q, dict):
        loaded = f"{q.get('bits', 4)}-bit"
    else:
        loaded = config.get("torch_dtype") or "float32"
    return _cpu_weights(loaded)


def choose_plan(model: Any, *, dtype: str | None = None,
                batch_size: int | None = None) -> ComputePlan:
    """Choose device, BLAS and weight dtype for ``model`` on this machine.

    On CPU with a fast BLAS, quantized or half-precision weights become float32;
    on Metal and CUDA the weights stay as loaded (see ``_cpu_weights`` for the
    numbers). ``dtype`` and ``batch_size`` (the worker's flags) override.

    Args:
        model: a loaded mlx-lm model.
        dtype: one of ``WEIGHT_DTYPES``, or None to choose.
        batch_size: a fixed batch size, or None to measure later.

    Returns:
        The plan; apply it with ``apply_plan``.

    Raises:
        ValueError: for an unknown dtype.
    """
    import mlx.core as mx

    _check_dtype(dtype)
    loaded = quantization_of(model) or _float_dtype_name(model)
    threads = None
    if mx.default_device() == mx.gpu:
        device = "metal" if mx.metal.is_available() else "cuda"
        blas = "accelerate" if sys.platform == "darwin" else "n/a"
        chosen = "as-loaded"
    else:
        device = "cpu"
        if sys.platform == "darwin":
            blas = "accelerate"
        elif openblas_loaded():
            blas = "openblas"
            threads = int(os.environ.get(OPENBLAS_THREADS_ENV) or _cpu_threads())
        else:
            blas = "reference"
        chosen = _cpu_weights(loaded)
    if dtype == loaded:
        dtype = "as-loaded"
    return ComputePlan(device, blas, dtype or chosen, loaded, batch_size, threads)


def apply_plan(model: Any, plan: ComputePlan) -> Any:
    """Convert ``model``'s weights in place as ``plan.weights`` says; returns the model.

    Layers are dequantized and evaluated one at a time, so the peak is about the
    converted weights plus one layer, not both whole copies as with
    ``mlx_lm.utils.dequantize_model`` (which converts everything in one graph).
    """
    if plan.weights == "as-loaded":
        return model
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    try:
        from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
    except ImportError:  # only MoE models have them
        QuantizedSwitchLinear = SwitchLinear = None

    quantized = (nn.QuantizedEmbedding, nn.QuantizedLinear) + (
        (QuantizedSwitchLinear,) if QuantizedSwitchLinear else ())
    dtype = getattr(mx, plan.weights)
    # Names only: holding the modules would keep every quantized weight alive.
    # Largest first, so the biggest transient (usually the embedding) comes while
    # little float memory is allocated yet.
    sizes = {name: m.weight.size for name, m in model.named_modules() if isinstance(m, quantized)}
    names = sorted(sizes, key=sizes.get, reverse=True)
    for name in names:
        module = _submodule(model, name)
        if isinstance(module, nn.QuantizedEmbedding):
            new = nn.Embedding(1, 1)
        elif isinstance(module, nn.QuantizedLinear):
            new = nn.Linear(1, 1, bias="bias" in module)
        else:
            new = SwitchLinear(1, 1, 1, bias="bias" in module)
        new.weight = mx.dequantize(module.weight, module.scales, getattr(module, "biases", None),
                                   module.group_size, module.bits, module.mode, dtype=dtype)
        if "bias" in module:
            new.bias = module.bias.astype(dtype)
        mx.eval(new.parameters())
        model.update_modules(tree_unflatten([(name, new)]))
        del module
    # Norms and other float parameters follow, so activations (and the KV cache)
    # are all in one dtype.
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def _submodule(model: Any, name: str) -> Any:
    obj = model
    for part in name.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else getattr(obj, part)
    return obj


def kv_dtype_bytes(model: Any) -> int:
    """Bytes per element of the KV cache this model writes (one 1-token forward pass)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([[1]]), cache=cache)
    for c in cache:
        keys = getattr(c, "keys", None)
        if keys is not None:
            return keys.dtype.size
    return 4


# ---------------------------------------------------------------- batch size


def _decode_rate(model: Any, prefix_cache: list, last: int, batch: int, new_tokens: int) -> float:
    """Decode tok/s of ``batch`` copies of one prefilled prompt through BatchGenerator."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, max_tokens=new_tokens, completion_batch_size=batch,
                         prefill_batch_size=batch)
    try:
        # Every request shares the prefilled prefix (merging copies it), so only
        # one token per request is prefilled and the timing is the decode.
        gen.insert([[last]] * batch, caches=[prefix_cache] * batch)
        with gen.stats() as stats:
            while gen.next_generated():
                pass
    finally:
        gen.close()
    return stats.generation_tps


def measure_batch_size(
    model: Any,
    tokenizer: Any,
    *,
    candidates: Sequence[int] = BATCH_CANDIDATES,
    prompt_len: int = 64,
    new_tokens: int = 16,
    memory_limit_bytes: int | None = None,
    bytes_per_sequence: int | None = None,
    time_budget_s: float = 30.0,
) -> tuple[int, dict[int, float]]:
    """Measure BatchGenerator decode throughput per batch size and pick one
    (``pick_batch_size``).

    One prompt of ``prompt_len`` tokens is prefilled once and shared by every
    sequence, so the measurement costs about ``sum(candidates) * new_tokens``
    decoded tokens. Candidates that would not fit in memory
    (``batch * bytes_per_sequence > memory_limit_bytes``) are skipped, and the
    search stops once throughput falls well below the best so far, or once
    ``time_budget_s`` is spent (a busy machine can make it ten times slower).

    Args:
        model: the model, after ``apply_plan``.
        tokenizer: its tokenizer (only used to make a realistic prompt).
        candidates: batch sizes to try, ascending.
        prompt_len: tokens of context each sequence starts with.
        new_tokens: tokens decoded per sequence.
        memory_limit_bytes: memory left for the KV cache and activations.
        bytes_per_sequence: memory one sequence needs at the worker's context.

    Returns:
        ``(chosen batch size, {batch size: tok/s})``.
    """
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    ids = tokenizer.encode("The night shift starts when the day shift ends. " * prompt_len)
    ids = (ids * (prompt_len // max(len(ids), 1) + 1))[:prompt_len]
    prefix_cache = make_prompt_cache(model)
    model(mx.array([ids[:-1]]), cache=prefix_cache)
    mx.eval([c.state for c in prefix_cache])

    sizes = sorted(candidates)
    if memory_limit_bytes and bytes_per_sequence:
        fitting = [b for b in sizes if b * bytes_per_sequence <= memory_limit_bytes]
        sizes = fitting or [max(1, memory_limit_bytes // bytes_per_sequence)]
    _decode_rate(model, prefix_cache, ids[-1], min(sizes), 2)  # warm-up: first calls allocate
    curve: dict[int, float] = {}
    start = time.perf_counter()
    for batch in sizes:
        curve[batch] = _decode_rate(model, prefix_cache, ids[-1], batch, new_tokens)
        # Throughput is single-peaked in the batch size: past a clear drop, larger
        # batches only cost time.
        if curve[batch] < 0.8 * max(curve.values()):
            break
        if time.perf_counter() - start > time_budget_s:
            log.warning("batch-size measurement stopped at %d after %.0f s", batch,
                        time.perf_counter() - start)
            break
    return pick_batch_size(curve), curve


# Measured rates within this fraction of the best count as equal. The measurement's
# spread on a 2-core machine is about that: in four runs on one machine the rate at 64
# over the rate at 48 was 1.11, 0.93, 0.99 and 0.98.
BATCH_PLATEAU = 0.10


def pick_batch_size(curve: dict[int, float]) -> int:
    """The largest batch size whose measured rate is within BATCH_PLATEAU of the best.

    On a plateau a larger batch costs nothing per step and serves more requests at
    once: a job larger than the batch runs in fewer waves, with fewer steps at the end
    where only the last requests decode. Measured on SmolLM2 on 2 CPU cores (64
    prompts, 64 new tokens; 133 tok/s at 48, 123 at 64), batch 48 ran the benchmark's
    job in two waves, the second 16 wide, for a batch occupancy of 0.60; batch 64 ran
    it in one, 0.87.
    """
    best = max(curve.values())
    return max(b for b, rate in curve.items() if rate >= (1 - BATCH_PLATEAU) * best)


def batch_size_key(model_path: str | Path, plan: ComputePlan) -> str:
    """Cache key of a measured batch size: model folder, its mtime, device, BLAS, dtype."""
    path = Path(model_path).resolve()
    mtimes = [p.stat().st_mtime_ns for p in path.glob("*.safetensors")] or [path.stat().st_mtime_ns]
    return f"{path}|{max(mtimes)}|{plan.device}|{plan.blas}|{plan.weights}"


def _cache_path() -> Path:
    return settings.home() / "cache" / BATCH_CACHE_FILE


def _read_cache() -> dict[str, Any]:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}  # missing or damaged: measuring again is the remedy


def remembered_batch_size(model_path: str | Path, plan: ComputePlan) -> int | None:
    """The batch size measured before for this model and plan, or None."""
    entry = _read_cache().get(batch_size_key(model_path, plan))
    if not entry:
        return None
    # Chosen again from the stored curve, so the rule of today applies to old entries.
    curve = {int(k): v for k, v in (entry.get("tok_per_s") or {}).items()}
    return pick_batch_size(curve) if curve else int(entry["batch_size"])


def remember_batch_size(model_path: str | Path, plan: ComputePlan, batch_size: int,
                        curve: dict[int, float]) -> None:
    """Store a measured batch size (and its curve) in ``$NIGHTSHIFT_HOME/cache``."""
    data = _read_cache()
    data[batch_size_key(model_path, plan)] = {
        "batch_size": batch_size,
        "tok_per_s": {str(k): v for k, v in curve.items()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = _cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def cached_batch_size(model_path: str | Path, model: Any, tokenizer: Any, plan: ComputePlan,
                      *, context_tokens: int | None = None, **measure_kwargs: Any) -> int:
    """The best batch size for this model and plan: remembered, or measured and remembered.

    Args:
        model_path: the model folder (its path and weights' mtime key the cache).
        model, tokenizer: the loaded model, after ``apply_plan``.
        plan: the plan; ``plan.batch_curve`` gets the curve when measured.
        context_tokens: the worker's longest sequence; when given, batch sizes
            whose KV cache would not fit in free memory are not tried.
        **measure_kwargs: passed to ``measure_batch_size``.
    """
    remembered = remembered_batch_size(model_path, plan)
    if remembered:
        return remembered
    if context_tokens and "memory_limit_bytes" not in measure_kwargs:
        from worker import memory

        candidates = measure_kwargs.get("candidates", BATCH_CANDIDATES)
        est = memory.estimate(model_path, batch_size=max(candidates),
                              context_tokens=context_tokens, dtype=plan.weights)
        measure_kwargs["memory_limit_bytes"] = int(
            est.available / memory.SAFETY - est.weights - est.overhead)
        measure_kwargs["bytes_per_sequence"] = est.kv_per_sequence
    start = time.perf_counter()
    others_before = _others_cpu_seconds()
    best, curve = measure_batch_size(model, tokenizer, **measure_kwargs)
    elapsed = time.perf_counter() - start
    plan.batch_curve = curve
    busy = (_others_cpu_seconds() - others_before) / (elapsed * (os.cpu_count() or 1))
    shown = ", ".join(f"{k}: {v:.0f}" for k, v in curve.items())
    if busy > CONTENDED_SHARE:
        # Another process competed for the cores: the curve says more about it than
        # about the model. Use it for now, but measure again at the next start.
        log.warning("batch size %d measured while other processes used %.0f%% of the CPU "
                    "(tok/s: %s); not remembered", best, 100 * busy, shown)
        return best
    remember_batch_size(model_path, plan, best, curve)
    log.info("batch size %d measured in %.1f s (tok/s: %s)", best, elapsed, shown)
    return best


def _others_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy, less this process's own."""
    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(
        t, "softirq", 0.0)
    own = psutil.Process().cpu_times()
    return busy - own.user - own.system
