"""One lever, measured side by side: the engine alone (no queue, no database) on one
worker process's share of the benchmark's job, in child processes that alternate
between two environments, each loaded as the worker loads (one BLAS thread).

    python benchmarks/lever.py NAME=VALUE [--reps 2] [--prompts 32] [--max-tokens 64]

The first environment is this one; the second adds NAME=VALUE (for instance
``NIGHTSHIFT_NATIVE_KERNELS=0``). Prints each run's wall time, the time of the steps
that prefilled, generated tok/s, the ratio of the medians, and whether the two gave
the same greedy texts for every prompt. Run it on a quiet machine: both run on the
same cores, one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def child(prompts_file: str, max_tokens: int) -> None:
    """In the child: run the prompts through one engine; print one JSON line."""
    from nightshift.worker.blas import ensure_fast_blas

    ensure_fast_blas()
    import time

    from nightshift.jobs.vocabulary import Claimed
    from nightshift.worker import heap, loader
    from nightshift.worker.engine import Engine

    heap.keep_freed_memory()  # as the worker's process does on a CPU
    loaded = loader.load("smollm2", loader.LoadOptions(batch_size=64))
    loader.warm_up(loaded)
    rows = [json.loads(line) for line in open(prompts_file)]
    claims = [Claimed(i, "lever", i, "chat", r["messages"],
                      {"max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0}, None)
              for i, r in enumerate(rows)]
    engine = Engine(loaded.model, loaded.tokenizer, batch_size=64,
                    context_length=loaded.context_length, planned_tokens=loaded.planned_tokens)
    start = time.perf_counter()
    engine.add(claims)
    results, prefill = [], 0.0
    while engine.busy:
        t = time.perf_counter()
        waiting = any(live.first_token_at is None for live in engine.live.values())
        results += engine.step()
        if waiting:
            prefill += time.perf_counter() - t
    wall = time.perf_counter() - start
    results.sort(key=lambda r: r.id)
    print(json.dumps({"wall": wall, "prefill": prefill, "plan": loaded.plan.describe(),
                      "tokens": sum(r.completion_tokens for r in results),
                      "texts": [r.response for r in results]}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("change", help="NAME=VALUE added to the second environment")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0
    from benchmarks.bench import FULL, MODEL, chat_prompts, write_jsonl

    name, _, value = args.change.partition("=")
    with tempfile.TemporaryDirectory() as work:
        home = Path(work) / "home"
        base = dict(os.environ, NIGHTSHIFT_HOME=str(home), OPENBLAS_NUM_THREADS="1")
        subprocess.run([sys.executable, "-m", "nightshift.cli", "models", "pull", MODEL],
                       env=base, check=True, capture_output=True)
        # Every other prompt of the benchmark's 64: what each of two processes serves.
        rows = chat_prompts(FULL.prompts, max_context=FULL.max_context)[::2][:args.prompts]
        prompts = Path(work) / "prompts.jsonl"
        write_jsonl(prompts, rows)
        runs: dict[str, list[dict]] = {"as is": [], args.change: []}
        for _ in range(args.reps):
            for label, env in (("as is", base), (args.change, dict(base, **{name: value}))):
                proc = subprocess.run([sys.executable, __file__, args.change, "--child",
                                       str(prompts), str(args.max_tokens)],
                                      env=env, capture_output=True, text=True, check=True)
                run = json.loads(proc.stdout.strip().splitlines()[-1])
                runs[label].append(run)
                print(f"{label:>24}: {run['wall']:6.2f} s, prefill steps {run['prefill']:5.2f} s, "
                      f"{run['tokens'] / run['wall']:5.1f} tok/s ({run['plan']})", flush=True)
    a, b = (statistics.median(r["wall"] for r in runs[k]) for k in runs)
    same = sum(x == y for x, y in zip(runs["as is"][0]["texts"], runs[args.change][0]["texts"]))
    print(f"median wall: as is {a:.2f} s, {args.change} {b:.2f} s: {b / a:.2f}x the time; "
          f"same greedy text for {same}/{len(rows)} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
