"""The batch size a model runs at: measured once per model and machine, and remembered.

Throughput rises with the batch until attention and padding cost more than they save;
the best size is measured on the loaded model (after its compute plan is applied) and
kept in ``$NIGHTSHIFT_HOME/cache``, keyed by the model's files and the plan.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nightshift.jobs import settings
from nightshift.worker.plan import ComputePlan

log = logging.getLogger(__name__)

BATCH_CANDIDATES = (8, 16, 32, 48, 64)
# A batch-size measurement taken while other processes used more than this share of
# the CPU is not remembered.
CONTENDED_SHARE = 0.25
BATCH_CACHE_FILE = "batch-sizes.json"


def _decode_rate(model: Any, prefix_cache: list, last: int, batch: int, new_tokens: int) -> float:
    """Decode tok/s of ``batch`` copies of one prefilled prompt through BatchGenerator."""
    from mlx_lm.generate import BatchGenerator
    from nightshift.worker.decode import use_logits_step

    gen = BatchGenerator(model, max_tokens=new_tokens, completion_batch_size=batch,
                         prefill_batch_size=batch)
    use_logits_step(gen)  # the engine's step, so the curve is the engine's
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
    # 8 picks what 16 picks on SmolLM2 here (64, three runs each, one BLAS thread) in
    # 14.5 s instead of 24: the first start of a worker waits on it.
    new_tokens: int = 8,
    max_batch_size: int | None = None,
    time_budget_s: float = 30.0,
) -> tuple[int, dict[int, float]]:
    """Measure BatchGenerator decode throughput per batch size and pick one
    (``pick_batch_size``).

    One prompt of ``prompt_len`` tokens is prefilled once and shared by every
    sequence, so the measurement costs about ``sum(candidates) * new_tokens``
    decoded tokens. Candidates above ``max_batch_size`` (what fits in memory) are
    skipped, and the search stops once throughput falls well below the best so far,
    or once ``time_budget_s`` is spent (a busy machine can make it ten times slower).

    Args:
        model: the model, after ``apply_plan``.
        tokenizer: its tokenizer (only used to make a realistic prompt).
        candidates: batch sizes to try, ascending.
        prompt_len: tokens of context each sequence starts with.
        new_tokens: tokens decoded per sequence.
        max_batch_size: the largest batch that fits in memory at the worker's context
            (``nightshift.worker.memory.MemoryEstimate.max_batch_size``), or None for no limit.

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
    if max_batch_size is not None:
        sizes = [b for b in sizes if b <= max_batch_size] or [max(1, max_batch_size)]
    _decode_rate(model, prefix_cache, ids[-1], min(sizes), 2)  # warm-up: first calls allocate
    curve: dict[int, float] = {}
    start = time.perf_counter()
    log.info("measuring the batch size, once for this model and machine: %s sequences",
             ", ".join(map(str, sizes)))
    for n, batch in enumerate(sizes, 1):
        curve[batch] = _decode_rate(model, prefix_cache, ids[-1], batch, new_tokens)
        log.info("  batch %d: %.0f tok/s (%d of %d, %.0f s)", batch, curve[batch], n,
                 len(sizes), time.perf_counter() - start)
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
                      **measure_kwargs: Any) -> int:
    """The best batch size for this model and plan: remembered, or measured and remembered.

    Args:
        model_path: the model folder (its path and weights' mtime key the cache).
        model, tokenizer: the loaded model, after ``apply_plan``.
        plan: the plan; ``plan.batch_curve`` gets the curve when measured.
        **measure_kwargs: passed to ``measure_batch_size``; the loader passes
            ``max_batch_size`` so that batches that do not fit in memory are not tried.
    """
    remembered = remembered_batch_size(model_path, plan)
    if remembered:
        return remembered
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
