"""Loading a model once, fitting it to the machine, warming it up, and letting it go.

Like mlx-lm's server ModelProvider: the worker keeps one model for the life of the
process (or until it switches to another model's jobs).
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from nightshift.jobs.errors import ModelError, NightshiftError
from nightshift.worker import converted_weights, memory, native_kernels, processes, registry
from nightshift.worker.batch_size import BATCH_CANDIDATES, cached_batch_size, remembered_batch_size
from nightshift.worker.compat import nemotron_nas
from nightshift.worker.model_files import read_config
from nightshift.worker.plan import (
    ComputePlan,
    choose_plan,
    expected_plan,
    planned_dtype,
)

log = logging.getLogger("nightshift.loader")
WARMUP_PROMPT = "Hello"
DEFAULT_CONTEXT = 4096  # tokens a sequence may hold, for the memory estimate
# Where nothing can be measured (a model known only by repo id); ENGINE-NOTES found
# 32 the best of 8..128 there.
DEFAULT_BATCH_SIZE = 32


@dataclass
class LoadOptions:
    """How to load: what the user may override, each with a sensible automatic default."""

    dtype: str | None = None  # None: automatic (see worker/plan.py)
    batch_size: int | None = None  # None: measured
    max_context: int | None = None  # None: the model's window, capped at DEFAULT_CONTEXT
    force: bool = False  # load even if the estimate says it will not fit
    trust_remote_code: bool = False


@dataclass
class LoadedModel:
    name: str
    path: str
    model: object
    tokenizer: object
    config: dict
    context_length: int | None
    plan: ComputePlan
    estimate: memory.MemoryEstimate | None  # None for a repo id (no local files to read)
    load_seconds: float
    warmup_seconds: float = 0.0
    planned_tokens: int | None = None  # prompt + completion a sequence may hold (memory)

    def describe(self) -> str:
        return (
            f"{self.name}: loaded in {self.load_seconds:.1f} s, warm-up {self.warmup_seconds:.1f} s"
            f" | compute: {self.plan.describe()} | memory: "
            f"{self.estimate.describe() if self.estimate else 'not estimated'}"
        )


def load(name: str, options: LoadOptions | None = None) -> LoadedModel:
    """Load a registry model, local folder or repo id, refusing what cannot fit.

    Raises:
        NotFound: no such model.
        ResourceError: the memory estimate exceeds what the machine has (unless forced).
        ModelError: the files are missing, corrupt, or the tokenizer fails to load.
    """
    import mlx_lm

    options = options or LoadOptions()
    path = registry.resolve(name)
    local = Path(path).is_dir()
    config = read_config(path) if local else {}  # a repo id: mlx-lm fetches it
    context = registry.model_context_length(path) if local else None
    if options.max_context:  # a cap the user asked for, within the model's own window
        context = min(context or options.max_context, options.max_context)
    plan_context = min(context or DEFAULT_CONTEXT, options.max_context or DEFAULT_CONTEXT)
    planned = planned_dtype(config, options.dtype)
    processes.wait_for_turn_to_load()  # the copies loaded before it count below
    if local:
        # Before loading (the seed's model "wouldn't load on 192GB configs"): the
        # weights and at least one full sequence, or the batch the user asked for.
        before = memory.estimate(path, config=config, batch_size=options.batch_size or 1,
                                 context_tokens=plan_context, dtype=planned)
        memory.check_fits(before, force=options.force)
        # Said before loading: a large model can take minutes to load.
        log.info("loading %s (%s); at batch %d it %s", name, path, before.batch_size,
                 before.describe())
        _let_the_other_processes_load(path, config, options, plan_context)
    start = time.perf_counter()
    kwargs = nemotron_nas.load_kwargs(config)
    # mlx-lm passes trust_remote_code to the model only; the tokenizer (a
    # tokenizer_config.json "auto_map") is asked here, so that code in the folder runs
    # only with --trust-remote-code, and transformers never stops to ask on a terminal.
    kwargs["tokenizer_config"] = {**kwargs.get("tokenizer_config", {}),
                                  "trust_remote_code": options.trust_remote_code}
    try:
        model, tokenizer = mlx_lm.load(path, trust_remote_code=options.trust_remote_code,
                                       **kwargs)
    except NightshiftError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot load model {name!r} from {path}: {_one_line(exc)}") from exc
    try:
        nemotron_nas.apply(model)
        plan = choose_plan(model, dtype=options.dtype, batch_size=options.batch_size)
        if plan.device == "cpu":  # before anything is compiled: the batch-size measurement
            plan.native_kernels = native_kernels.enable()
        converted_weights.apply(model, plan, path if local else None)
        from nightshift.worker import packed_linear  # imports MLX

        plan.packed_linear = packed_linear.apply(model, plan)
        estimate = None
        if local:
            if not plan.batch_size:  # measured once per model and machine, within memory
                largest = memory.estimate(path, config=config, batch_size=max(BATCH_CANDIDATES),
                                          context_tokens=plan_context, dtype=plan.weights)
                plan.batch_size = cached_batch_size(path, model, tokenizer, plan,
                                                    max_batch_size=largest.max_batch_size())
            estimate = memory.estimate(path, config=config, batch_size=plan.batch_size,
                                       context_tokens=plan_context, dtype=plan.weights)
        else:
            plan.batch_size = plan.batch_size or DEFAULT_BATCH_SIZE
    except NightshiftError:
        raise
    except Exception as exc:  # it loaded, but cannot run
        raise ModelError(f"model {name!r} from {path} loaded but does not run: "
                         f"{_one_line(exc)}") from exc
    load_seconds = time.perf_counter() - start
    return LoadedModel(name, path, model, tokenizer, config, context, plan, estimate,
                       load_seconds, planned_tokens=plan_context)


def _let_the_other_processes_load(path: str, config: dict, options: LoadOptions,
                                  context: int) -> None:
    """In the first load of a supervised worker process: let the processes after this
    one load now, beside it, where waiting for it buys nothing
    (worker/processes.py): their copies fit in memory beside this one at the batch size
    they will use (``MemoryEstimate.fits_copies``), and no batch size is measured (a
    measurement wants the CPU alone).

    Two processes here, the benchmark's job: 3 to 4 s of loading and warm-up each,
    which no longer add up.
    """
    copies = processes.processes_to_load()
    if copies < 2:
        return
    batch_size = options.batch_size or remembered_batch_size(path,
                                                             expected_plan(config, options.dtype))
    if not batch_size:
        return
    each = memory.estimate(path, config=config, batch_size=batch_size, context_tokens=context,
                           dtype=planned_dtype(config, options.dtype))
    if each.fits_copies(copies):
        processes.notify_others_may_load()
    else:
        log.info("the other worker processes load once this one is ready: %d copies would "
                 "not fit beside each other (each %s)", copies, each.describe())


def warm_up(loaded: LoadedModel) -> float:
    """Run a short batch once so the first real request does not pay for cold kernels
    and allocations (the seed: 15 s to the first token, cold). Returns seconds."""
    from mlx_lm.generate import batch_generate

    start = time.perf_counter()
    try:
        tokens = loaded.tokenizer.encode(WARMUP_PROMPT)
        n = min(loaded.plan.batch_size, 4)
        # One token: a prefill and the decode steps that follow it touch every kernel;
        # each further step only streams all the weights again (~0.1 s for SmolLM2 here).
        batch_generate(loaded.model, loaded.tokenizer, [tokens] * n, max_tokens=1)
    except Exception as exc:  # it loaded, but cannot run: say so before taking work
        raise ModelError(f"model {loaded.name!r} from {loaded.path} loaded but fails to "
                         f"generate: {_one_line(exc)}") from exc
    loaded.warmup_seconds = time.perf_counter() - start
    return loaded.warmup_seconds


def unload(loaded: LoadedModel | None) -> float:
    """Free a model's memory before another is loaded; returns seconds."""
    import mlx.core as mx

    start = time.perf_counter()
    if loaded is not None:
        loaded.model = loaded.tokenizer = None
    gc.collect()
    mx.clear_cache()
    return time.perf_counter() - start


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (transformers' span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__
