"""nightshift's benchmark: the same prompts, model and settings, several ways, side by side.

    python benchmarks/bench.py [--quick] [--json-out FILE] [--keep] [--mlx-defaults]
                               [--wait-quiet SECONDS] [--blas-threads N]
                               [--skip A,D,E,F,roofline,ingest]

Full run: 64 chat prompts of varied length (generated here, deterministically), 64 new
tokens each, greedy, on the default model (smollm2), in about 8 minutes on 2 CPU cores.
``--quick`` (what tests/test_bench.py runs, with ``--skip E``, about 2 minutes): 16
shorter prompts, 16 tokens, batch 8, 8 questions behind a 500-token prefix, a
100,000-line ingest.

A. the seed's way: mlx-lm ``stream_generate`` one prompt after another, as mlx-lm does
   out of the box on Linux: a plain process (no OpenBLAS preloaded), weights as loaded
   (4-bit). It is slow, so it runs 5 prompts (one from each fifth of the prompts sorted
   by length); rates are what is compared.
B. mlx-lm's own ``batch_generate`` on every prompt at once, loaded as the worker loads
   (OpenBLAS preloaded, float32 weights, the measured batch size) and with the engine's
   prefill settings (``nightshift.worker.prefill.prefill_settings``): the engine's ceiling, without
   queue or database. ``--mlx-defaults`` adds B0, the same with mlx-lm's own prefill
   settings.
C. nightshift end to end: ``nightshift submit``, then a real ``nightshift worker --drain``
   process; figures read back from the database it wrote (requests and workers tables).
F. structured output: extraction prompts through ``worker --drain``, once held to a JSON
   Schema (``submit --schema``) and once free, the same prompts and budget: generated
   tok/s side by side (the cost of the grammar's mask each token), and how many
   constrained answers parse and validate.
E. llama.cpp one prompt after another: ``llama-cpp-python`` (the ``bench`` extra; ``make
   bench`` installs it) on the very GGUF file the default model was pulled from, the
   same prompt tokens as A-C (handed over as tokens, so the chat template and the count
   are the same; llama.cpp's own tokenizer is checked against them), the same max tokens
   and end-of-sequence tokens, greedy, as many threads as the worker gives OpenBLAS (the
   cores, or ``--blas-threads``). As for any user, llama-cpp-python reuses the KV cache
   of what a prompt shares with the one before (the chat template's system line).
   Skipped, with the reason, where llama_cpp does not import. Its answers are compared
   with C's (informational: the weights are the same, but the two compute them in
   different precisions).
D. the same questions (the first 24, without their context sentences) behind one shared
   ~1000-token system prompt, through the worker with ``--prefix-cache`` and
   ``--no-prefix-cache``: prompt tokens computed, wall time, identical greedy answers.
Roofline: OpenBLAS fp32 GFLOP/s at the model's matmul shapes (``[64 x in] @ [in x out]``
   for each distinct weight matrix, in a child process loaded as the worker loads), the
   model's FLOPs a token (2 x the parameters of its weight matrices, the embedding once
   more as the output head where the two are tied; read from the model's files), and so
   the seconds C's prompt + generated tokens would take if every matmul ran at those
   rates and nothing else took time. C's share of it: roofline seconds / C's seconds.
Ingest: a 1,000,000-line file through ``nightshift submit`` (lines/s, peak memory), then
   ``nightshift status JOB`` and ``nightshift export JOB`` (time, peak memory).

Everything runs in a fresh temporary ``NIGHTSHIFT_HOME`` with the default model pulled
into it (offline), so nothing of the user's data is read or touched. A, B, E and the
roofline run in child processes of this script (``--phase``), C and D through the
``nightshift`` command line, each in its own process, so every figure includes what a
user would pay.

Definitions (the same for every column):
- generated tok/s: generated tokens (an end-of-sequence token counts: it was computed)
  over the serving window: A and E the sum of per-prompt wall times, B the
  ``batch_generate`` call, C and D the first request's start to the last one's finish in
  the database. Process wall time (model load and warm-up included) is shown beside it.
- prompt tok/s: A and B as mlx-lm counts it (prompt tokens / time in prefill); E prompt
  tokens / time to the first token; C the mean of the per-request figure ``nightshift
  status`` shows (prefilled tokens over the time from a request's admission to its first
  token, so it includes waiting in line).
- TTFT: A and E from the start of each call; B from the ``batch_generate`` call (every
  prompt is inserted at once); C from the moment the worker admitted the request (what
  ``nightshift status`` shows) and, comparable with B, from the job's first admission.
- peak memory: each child process's own high-water RSS, and MLX's (or the worker's) peak.
- occupancy: sequences decoded / (decode steps x slots), from the workers table, summed
  over the worker's processes; a process's slots are its batch size or, if smaller, its
  fair share of the job (``Store.fair_share``: 64 prompts on 2 processes, 32 each).
- other load: CPU the rest of the machine used while a part ran, in cores. On a shared
  2-core machine anything above ~0.1 makes OpenBLAS several times slower, and the part's
  figures with it: rerun, or use ``--wait-quiet``.

Exit status: 0 when it ran (missed targets are reported, not fatal), 1 when a part failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere in a checkout
    sys.path.insert(0, str(ROOT))

MODEL = "smollm2"


@dataclass(frozen=True)
class Sizes:
    prompts: int  # A/B/C prompts
    max_tokens: int
    a_prompts: int  # the subset A runs
    d_prompts: int
    d_max_tokens: int
    d_system_tokens: int
    ingest_lines: int
    batch_size: int | None = None  # None: the worker's own (measured) batch size
    max_context: int = 24  # context sentences before a question, at most


FULL = Sizes(prompts=64, max_tokens=64, a_prompts=5, d_prompts=24, d_max_tokens=16,
             d_system_tokens=1000, ingest_lines=1_000_000)
# Fewer prompts than FULL, but more than the batch, so refilling freed slots is exercised;
# a fixed batch size saves the measurement (about 30 s).
QUICK = Sizes(prompts=16, max_tokens=16, a_prompts=1, d_prompts=8, d_max_tokens=8,
              d_system_tokens=500, ingest_lines=100_000, batch_size=8, max_context=8)

TARGETS = {
    "c_over_a": 10.0, "c_over_b": 0.9, "occupancy": 0.85, "d_prefill_ratio": 10.0,
    "d_wall_ratio": 3.0, "ingest_lines_per_s": 50_000, "ingest_peak_mb": 300,
    "status_s": 0.3,
    # Issue 10: C's generated tok/s over llama.cpp's, each over its whole process; and
    # the roofline's seconds for C's tokens over C's serving seconds.
    "c_over_e_process": 2.0, "roofline_share": 0.40,
}
# The roofline's matmuls: [ROOFLINE_BATCH x in] @ [in x out]; 64 is the batch size the
# worker measures for the default model on a 2-core CPU (issue 10). Each timed call chains
# enough matmuls for about ROOFLINE_CALL_FLOPS, so MLX's per-call overhead does not hide
# the small shapes' rate; the best of ROOFLINE_REPEATS calls counts, after one warm-up.
ROOFLINE_BATCH = 64
ROOFLINE_CALL_FLOPS = 2e9
ROOFLINE_REPEATS = 5


# ----------------------------------------------------------------------------- prompts

TOPICS = [
    "photosynthesis", "the French Revolution", "black holes", "compound interest",
    "the water cycle", "TCP handshakes", "vaccines", "plate tectonics", "sourdough bread",
    "the Roman Empire", "machine learning", "coral reefs", "jazz music", "electric cars",
    "the human heart", "chess openings",
]
TEMPLATES = [
    "Explain {t} in simple terms.",
    "Write a short poem about {t}.",
    "List three surprising facts about {t}.",
    "What are common misconceptions about {t}?",
]
SENTENCES = [
    "I am preparing notes for a study group that meets on Thursday evenings.",
    "Most of the members are curious adults without a science background.",
    "We usually spend about twenty minutes on each topic before moving on.",
    "Last week somebody asked a question that none of us could answer well.",
    "Please keep the language plain and avoid jargon where you can.",
    "A concrete example usually helps more than a formal definition.",
    "One member is a retired engineer who likes precise numbers.",
    "Another is a teacher who wants something she can reuse in class.",
    "We have a whiteboard, but no projector, in the library room we use.",
    "If there is a common mistake people make, mention it briefly.",
    "Our previous session covered the history of the printing press.",
    "The next one will probably be about weather forecasting.",
]


def chat_prompts(n: int, seed: int = 20240601, max_context: int = 24) -> list[dict]:
    """``n`` chat requests of varied length: a question, after 0 to ``max_context``
    context sentences (about 14 tokens each)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question = TEMPLATES[i % len(TEMPLATES)].format(t=TOPICS[(i // len(TEMPLATES))
                                                                 % len(TOPICS)])
        sentences = min(max_context, rng.choice([0, 0, 1, 2, 4, 8, 16, 24]))
        context = " ".join(rng.choice(SENTENCES) for _ in range(sentences))
        content = f"{context} {question}".strip()
        rows.append({"custom_id": f"q{i:03d}", "messages": [{"role": "user", "content": content}]})
    return rows


RULES = [
    "Answer the question that was asked, and only that question.",
    "Prefer short sentences and common words over long sentences and rare ones.",
    "When a number matters, give it with its unit and say where it comes from.",
    "If the question is ambiguous, say which reading you answer.",
    "Do not invent quotations, sources or statistics.",
    "When you list items, keep the list to the items that matter most.",
    "If a safety concern applies, state it once, plainly, at the start.",
    "Use the metric system unless the question uses another one.",
    "Explain a technical term the first time it appears.",
    "Close with one sentence that sums up the answer.",
]


def system_prompt(tokens: int, count) -> str:
    """A deterministic system prompt of at least ``tokens`` tokens (``count(text)`` counts)."""
    parts = ["You are the night-shift assistant of a public library. Follow these house "
             "rules in every answer."]
    i = 0
    while count(" ".join(parts)) < tokens:
        parts.append(f"Rule {i + 1}: {RULES[i % len(RULES)]} (section {i // len(RULES) + 1})")
        i += 1
    return " ".join(parts)


def shared_prefix_prompts(n: int, system: str) -> list[dict]:
    return [{"custom_id": f"d{i:03d}", "messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": TEMPLATES[i % len(TEMPLATES)].format(
            t=TOPICS[(i // len(TEMPLATES)) % len(TOPICS)])}]} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_ingest_file(path: Path, lines: int, seed: int = 7) -> int:
    """A large submit file: plain prompts of varied length, some with settings. Returns bytes."""
    import orjson

    rng = random.Random(seed)
    words = ("the of and to in is you that it he was for on are as with his they at be "
             "this from have or by one had not but what all were when we there can an "
             "your which their said if do will each about how up out them then she").split()
    with open(path, "wb") as f:
        for i in range(lines):
            row = {"custom_id": f"r{i:07d}",
                   "prompt": " ".join(rng.choices(words, k=rng.randint(4, 60)))}
            if i % 10 == 0:
                row["max_tokens"] = 32
            f.write(orjson.dumps(row) + b"\n")
    return path.stat().st_size


def encode_chat(tokenizer, messages: list[dict]) -> tuple[str, list[int]]:
    """Prompt text and tokens the way the worker makes them (worker/engine.py
    ``Engine.encode``)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text, tokenizer.encode(text, add_special_tokens=False)


# ----------------------------------------------------------------------------- processes


@dataclass
class Ran:
    cmd: list[str]
    returncode: int
    wall_s: float
    peak_rss: int  # bytes
    stdout: str
    stderr: str
    cpu_s: float = 0.0  # the command's own CPU time
    others_cpu_s: float | None = None  # CPU time the rest of the machine used meanwhile

    @property
    def others_share(self) -> float | None:
        """Cores' worth of other work while it ran (0.1 = a tenth of one core)."""
        return None if self.others_cpu_s is None else self.others_cpu_s / self.wall_s


def _busy_cpu_s() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    t = psutil.cpu_times()
    return t.user + t.system + getattr(t, "nice", 0) + getattr(t, "irq", 0) + getattr(
        t, "softirq", 0)


class _PeakRss(threading.Thread):
    """Polls the high-water RSS (Linux ``VmHWM``) of a process and of every process under
    it (``worker --processes N`` runs N workers under a supervisor) until told to stop;
    ``peak`` is the sum of their peaks.

    ``wait4``'s ``ru_maxrss`` will not do: a child inherits the high-water mark of the
    process that started it (this one, with a tokenizer loaded), so every small command
    would seem to use what this script uses. ``VmHWM`` belongs to the address space the
    command's ``exec`` made.
    """

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peaks: dict[int, int] = {}
        self.stop = threading.Event()

    @property
    def peak(self) -> int:
        return sum(self.peaks.values())

    def run(self) -> None:
        while not self.stop.is_set():
            self.read()
            self.stop.wait(0.02)

    def read(self) -> None:
        for pid in _process_tree(self.pid):
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peaks[pid] = max(self.peaks.get(pid, 0), int(line.split()[1]) * 1024)
            except (OSError, ValueError):
                pass


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux ``/proc/PID/task/TID/children``)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return tree


def run_measured(cmd: list[str], env: dict, log: Path, timeout: float = 900) -> Ran:
    """Run a command to completion: its wall time, its own peak RSS and CPU time, and how
    much CPU the rest of the machine used meanwhile (these machines are shared)."""
    out_path, err_path = log.with_suffix(".out"), log.with_suffix(".err")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        busy0 = _busy_cpu_s()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, cwd=ROOT)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        poll = _PeakRss(proc.pid)
        poll.start()
        try:
            # Wait without reaping, so the last high-water reading comes from the
            # finished process itself (a zombie keeps its /proc entry until reaped).
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            poll.stop.set()
            poll.join()
            poll.read()
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            poll.stop.set()
        wall = time.perf_counter() - start
        busy1 = _busy_cpu_s()
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = poll.peak or usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    cpu = usage.ru_utime + usage.ru_stime
    others = max(0.0, busy1 - busy0 - cpu) if busy0 is not None else None
    return Ran(cmd, proc.returncode, wall, rss, out_path.read_text(errors="replace"),
               err_path.read_text(errors="replace"), cpu, others)


def check(ran: Ran, what: str) -> Ran:
    if ran.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {ran.returncode}): {' '.join(ran.cmd)}\n"
                           f"{ran.stderr[-3000:]}")
    return ran


def nightshift(*args) -> list[str]:
    return [sys.executable, "-m", "nightshift.cli", *map(str, args)]


def plain_env(home: Path) -> dict:
    """The environment of a process as a user starts it, without anything preloaded."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "NIGHTSHIFT_BLAS_REEXEC", "NIGHTSHIFT_DATABASE_URL",
                        "NIGHTSHIFT_QUEUE_URL", "NIGHTSHIFT_MODEL")}
    env["NIGHTSHIFT_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ----------------------------------------------------------------------------- child phases
# These run in child processes: `bench.py --phase A|B|E|roofline --data FILE --out FILE`.


def _mlx_peak() -> int:
    import mlx.core as mx

    return int(mx.get_peak_memory())


def phase_a(data: dict) -> dict:
    """The seed's way: stream_generate one prompt after another, weights as loaded."""
    import mlx_lm
    from mlx_lm import stream_generate
    from nightshift.worker.blas import openblas_loaded
    from nightshift.worker.plan import choose_plan

    start = time.perf_counter()
    model, tokenizer = mlx_lm.load(data["model_path"])
    load_s = time.perf_counter() - start
    plan = choose_plan(model, dtype="as-loaded")
    # One short call first, as B and C warm up too: the first call allocates.
    for _ in stream_generate(model, tokenizer, tokenizer.encode("Hello"), max_tokens=2):
        pass
    rows = []
    for i in data["a_subset"]:
        tokens = data["prompts"][i]
        t0 = time.perf_counter()
        first = last = None
        text = []
        for r in stream_generate(model, tokenizer, tokens, max_tokens=data["max_tokens"]):
            first = first or time.perf_counter()
            text.append(r.text)
            last = r
        rows.append({"wall_s": time.perf_counter() - t0, "ttft_s": first - t0,
                     "prompt_tokens": last.prompt_tokens, "prompt_tps": last.prompt_tps,
                     "generated": last.generation_tokens, "text": "".join(text)})
    return {"load_s": load_s, "plan": plan.describe(),
            "openblas": openblas_loaded(), "mlx_peak": _mlx_peak(), "rows": rows}


def phase_b(data: dict) -> dict:
    """mlx-lm's batch_generate with the worker's plan, batch size and prefill settings
    (loaded as the worker loads); with ``mlx_defaults`` also with mlx-lm's own prefill
    settings, to show what the worker's schedule changes."""
    import importlib

    from nightshift.worker import heap, loader
    from nightshift.worker.blas import openblas_loaded
    from nightshift.worker.prefill import prefill_settings

    heap.keep_freed_memory()  # as the worker's process does on a CPU

    # `import mlx_lm.generate` would give the function mlx_lm re-exports under that name.
    mg = importlib.import_module("mlx_lm.generate")

    start = time.perf_counter()
    # The worker's loading: plan, float32 weights, batch size (measured unless given).
    loaded = loader.load(data["model"], loader.LoadOptions(batch_size=data["batch_size"]))
    load_s = time.perf_counter() - start
    loader.warm_up(loaded)
    batch = loaded.plan.batch_size
    first_token: dict[int, float] = {}

    class TimedBatchGenerator(mg.BatchGenerator):
        """mlx-lm's own generator; only notes when each sequence's first token comes."""

        def next_generated(self):
            responses = super().next_generated()
            now = time.perf_counter()
            for r in responses:
                first_token.setdefault(r.uid, now)
            return responses

    def run(prefill_batch: int, prefill_step: int) -> dict:
        first_token.clear()
        real = mg.BatchGenerator
        mg.BatchGenerator = TimedBatchGenerator
        try:
            t0 = time.perf_counter()
            result = mg.batch_generate(
                loaded.model, loaded.tokenizer, data["prompts"], max_tokens=data["max_tokens"],
                completion_batch_size=batch, prefill_batch_size=prefill_batch,
                prefill_step_size=prefill_step)
            wall = time.perf_counter() - t0
        finally:
            mg.BatchGenerator = real
        s = result.stats
        # uids are 0..n-1 in prompt order (one generator, one insert).
        ttft = [first_token[i] - t0 for i in range(len(data["prompts"]))]
        return {"prefill_batch_size": prefill_batch, "prefill_step_size": prefill_step,
                "wall_s": wall, "prompt_tokens": s.prompt_tokens, "prompt_tps": s.prompt_tps,
                "generated": s.generation_tokens, "generation_steps": s.generation_steps,
                "ttft": ttft, "texts": result.texts}

    out = {"load_s": load_s, "warmup_s": loaded.warmup_seconds, "plan": loaded.plan.describe(),
           "batch_size": batch,
           "batch_curve": {str(k): v for k, v in loaded.plan.batch_curve.items()},
           "openblas": openblas_loaded(), **run(*prefill_settings(batch))}
    if data.get("mlx_defaults"):
        out["mlx_defaults"] = run(min(8, batch), 2048)  # BatchGenerator's own defaults
    out["mlx_peak"] = _mlx_peak()
    return out


def phase_e(data: dict) -> dict:
    """llama.cpp one prompt after another, greedy, on the GGUF file; ``{"skipped": why}``
    where llama_cpp does not import."""
    try:
        import llama_cpp
    except ImportError as exc:
        return {"skipped": f"llama_cpp does not import ({exc}): `pip install -e '.[bench]'` "
                "(`make bench` does)"}
    from nightshift.worker.blas import OPENBLAS_THREADS_ENV, cpu_threads

    # As many threads as the worker gives OpenBLAS: the cores, or --blas-threads.
    threads = int(os.environ.get(OPENBLAS_THREADS_ENV) or cpu_threads())
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=data["gguf"], n_ctx=data["n_ctx"], n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - start
    # Handed the worker's tokens, llama.cpp sees what C sees; its own tokenizer on the
    # templated text should agree (no BOS: the chat template has none, and neither does C).
    same_tokens = sum(llm.tokenize(text.encode(), add_bos=False, special=True) == tokens
                      for text, tokens in zip(data["texts"], data["prompts"]))
    greedy = {"temp": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}
    eos = set(data["eos_token_ids"])

    def answer(tokens: list[int], max_tokens: int) -> tuple[list[int], float]:
        """The tokens up to an end-of-sequence token or ``max_tokens``, and when the first
        one came."""
        out: list[int] = []
        first = 0.0
        for token in llm.generate(tokens, **greedy):
            first = first or time.perf_counter()
            out.append(token)
            if token in eos or len(out) >= max_tokens:
                break
        return out, first

    answer(llm.tokenize(b"Hello", add_bos=False), 2)  # one short call first, as in A
    rows = []
    for tokens in data["prompts"]:
        t0 = time.perf_counter()
        out, first = answer(tokens, data["max_tokens"])
        rows.append({"wall_s": time.perf_counter() - t0, "ttft_s": first - t0,
                     "prompt_tokens": len(tokens), "generated": len(out), "tokens": out})
    return {"load_s": load_s, "threads": threads, "version": llama_cpp.__version__,
            "same_prompt_tokens": same_tokens, "rows": rows}


def phase_roofline(data: dict) -> dict:
    """OpenBLAS fp32 GFLOP/s of ``[batch x in] @ [in x out]`` for each ``(in, out)`` in
    ``data["shapes"]``, run as the worker runs them (this process has OpenBLAS preloaded)."""
    import mlx.core as mx
    from nightshift.worker.blas import openblas_loaded

    batch = data["batch"]
    rates = []
    for inputs, outputs in data["shapes"]:
        x = mx.random.normal((batch, inputs), dtype=mx.float32)
        w = mx.random.normal((inputs, outputs), dtype=mx.float32)
        mx.eval(x, w)
        flops = 2 * batch * inputs * outputs
        chain = max(1, round(ROOFLINE_CALL_FLOPS / flops))
        best = float("inf")
        for i in range(1 + ROOFLINE_REPEATS):  # the first is the warm-up
            t0 = time.perf_counter()
            mx.eval([x @ w for _ in range(chain)])
            if i:
                best = min(best, time.perf_counter() - t0)
        rates.append(chain * flops / best / 1e9)
    return {"gflops": rates, "openblas": openblas_loaded(),
            "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS")}


def run_phase(name: str) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    data = json.loads(Path(args.data).read_text())
    out = {"A": phase_a, "B": phase_b, "E": phase_e, "roofline": phase_roofline}[name](data)
    Path(args.out).write_text(json.dumps(out))


# ----------------------------------------------------------------------------- helpers


def pct(values: list[float], q: float) -> float | None:
    """The same nearest-rank percentile as ``nightshift status``."""
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def ratio(a, b):
    return a / b if a is not None and b else None


def one_by_one(rows: list[dict], ran: Ran) -> dict:
    """Figures of a part that runs its prompts one after another (A, E), from per-prompt
    rows of ``wall_s``, ``ttft_s``, ``prompt_tokens`` and ``generated``: its serving window
    is the sum of the calls' wall times."""
    wall = sum(r["wall_s"] for r in rows)
    generated = sum(r["generated"] for r in rows)
    prompt_tokens = sum(r["prompt_tokens"] for r in rows)
    ttft = [r["ttft_s"] for r in rows]
    return {"prompts": len(rows), "wall_s": wall, "process_wall_s": ran.wall_s,
            "generated": generated, "gen_tps": generated / wall,
            "prompt_tokens": prompt_tokens, "prompt_tps": prompt_tokens / sum(ttft),
            "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
            "peak_rss": ran.peak_rss, "others_cores": ran.others_share}


def matmul_shapes(model_path: str | Path) -> dict[tuple[int, int], int]:
    """``(in, out)`` of each weight matrix a token goes through -> how many there are,
    from the model's own files: every 2-D weight but the embedding (a lookup), and the
    embedding once more as the output head when the model has no ``lm_head`` of its own
    (tied). Quantized weights count their unpacked values."""
    from nightshift.worker.model_files import parameter_counts, read_config, tensor_headers

    tensors = tensor_headers(model_path)
    params = parameter_counts(tensors, read_config(model_path))
    tied = not any(name.endswith("lm_head.weight") for name in tensors)
    shapes: dict[tuple[int, int], int] = {}
    for name, t in tensors.items():
        if not name.endswith(".weight") or len(t["shape"]) != 2:
            continue
        if "embed_tokens" in name and not tied:
            continue
        outputs = t["shape"][0]
        shape = (params[name] // outputs, outputs)
        shapes[shape] = shapes.get(shape, 0) + 1
    return shapes


def roofline(shapes: dict[tuple[int, int], int], gflops: list[float], tokens: int) -> dict:
    """What the measured matmul rates allow: seconds a token, and for ``tokens`` tokens."""
    flops = {shape: 2 * shape[0] * shape[1] * n for shape, n in shapes.items()}
    per_token_s = sum(flops[shape] / (rate * 1e9) for shape, rate in zip(shapes, gflops))
    flops_per_token = sum(flops.values())
    return {"batch": ROOFLINE_BATCH,
            "shapes": [{"in": k, "out": n, "count": c, "gflops": rate}
                       for ((k, n), c), rate in zip(shapes.items(), gflops)],
            "flops_per_token": flops_per_token, "seconds_per_token": per_token_s,
            "effective_gflops": flops_per_token / per_token_s / 1e9,
            "tokens": tokens, "seconds": tokens * per_token_s}


def job_figures(store, job_id: str) -> dict:
    """Per-request figures of a finished job, straight from the database."""
    rows = [r for r in store.iter_requests(job_id)]
    done = [r for r in rows if r.status == "done"]
    if not done:
        raise RuntimeError(f"job {job_id}: no request finished ({len(rows)} requests)")
    start = min(r.started_at for r in done)
    end = max(r.finished_at for r in done)
    generated = sum(r.completion_tokens or 0 for r in done)
    stats = store.request_stats(job_id)
    job = store.job(job_id)
    return {
        "requests": len(rows), "done": len(done), "failed": len(rows) - len(done),
        "window_s": end - start, "generated": generated,
        "gen_tps": generated / (end - start),
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in done),
        "cached_tokens": sum(r.cached_tokens or 0 for r in done),
        "prompt_tps_mean": stats["prompt_tps_mean"],
        "ttft_p50": stats["ttft_p50"], "ttft_p95": stats["ttft_p95"],
        "ttft_from_start_p50": pct([r.first_token_at - start for r in done], 0.5),
        "ttft_from_start_p95": pct([r.first_token_at - start for r in done], 0.95),
        "peak_memory": job.peak_memory,
        "worker_ids": sorted({r.worker_id for r in done}),
        "responses": {r.custom_id: r.response for r in rows},
    }


def worker_rows(store, worker_ids: list[str], requests: int) -> dict:
    """The workers that ran a job of `requests` (one per process of `worker --processes`):
    the first row's settings, its counters summed over all of them, and the occupancy."""
    from nightshift.jobs.schema import workers
    from sqlalchemy import select

    with store.read() as conn:
        rows = [dict(r._mapping) for r in
                conn.execute(select(workers).where(workers.c.id.in_(worker_ids)))]
    w = dict(rows[0], processes=len(rows))
    for key in ("decode_steps", "sequences_decoded", "prompt_tokens_computed"):
        w[key] = sum(r[key] or 0 for r in rows)
    share = -(-requests // len(rows))  # Store.fair_share: what each process may hold
    slots = sum((r["decode_steps"] or 0) * min(r["batch_size"], share) for r in rows)
    w["occupancy"] = w["sequences_decoded"] / slots if slots else None
    return w


def run_worker(home: Path, work: Path, name: str, *flags) -> tuple[Ran, dict]:
    ran = check(run_measured(nightshift("worker", "--drain", *flags), plain_env(home),
                             work / name), f"nightshift worker ({name})")
    ready = [line for line in ran.stderr.splitlines() if " ready: " in line]
    return ran, {"ready_line": ready[-1].split(" ready: ", 1)[1] if ready else None}


def submit(home: Path, work: Path, name: str, path: Path, *flags) -> tuple[Ran, str]:
    ran = check(run_measured(nightshift("submit", path, "--json", "-q", "--name", name, *flags),
                             plain_env(home), work / f"submit-{name}"), f"submit {name}")
    return ran, json.loads(ran.stdout)["id"]


def child_phase(name: str, home: Path, work: Path, data: dict, env: dict) -> tuple[Ran, dict]:
    data_path, out_path = work / f"phase-{name}.json", work / f"phase-{name}-out.json"
    data_path.write_text(json.dumps(data))
    ran = check(run_measured([sys.executable, str(Path(__file__).resolve()), "--phase", name,
                              "--data", str(data_path), "--out", str(out_path)], env,
                             work / f"phase-{name}"), f"phase {name}")
    return ran, json.loads(out_path.read_text())


def python_startup() -> float:
    """Seconds for this interpreter to start and import nightshift's command line."""
    best = None
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import nightshift.cli.main"], cwd=ROOT, check=True)
        best = min(best or 1e9, time.perf_counter() - t0)
    return best


def machine_load() -> dict:
    load = os.getloadavg()
    busy = []
    try:
        import psutil

        procs = [(p.info["pid"], p.info["name"], p.cpu_percent(None))
                 for p in psutil.process_iter(["pid", "name"])]
        time.sleep(0.5)
        me = os.getpid()
        for pid, name, _ in procs:
            try:
                cpu = psutil.Process(pid).cpu_percent(None)
            except psutil.Error:
                continue
            if cpu > 20 and pid != me:
                busy.append(f"{name}({pid}) {cpu:.0f}%")
    except ImportError:
        pass
    return {"loadavg": [round(x, 2) for x in load], "busy_processes": busy,
            "cpus": os.cpu_count()}


def say(msg: str = "") -> None:
    print(msg, flush=True)


class Clock:
    """Announces each part, after waiting (up to ``wait_quiet`` seconds) for the rest of
    the machine to be idle: on a shared 2-core machine another process's work makes
    OpenBLAS several times slower, and would be measured as ours."""

    def __init__(self, wait_quiet: float = 0.0):
        self.start = time.perf_counter()
        self.wait_quiet = wait_quiet
        self.waits: dict[str, float] = {}

    def begin(self, label: str, message: str) -> None:
        if self.wait_quiet > 0:
            waited, quiet = wait_for_quiet(self.wait_quiet)
            self.waits[label] = round(waited, 1)
            if waited >= 1.5:
                say(f"  (waited {waited:.0f} s for the machine to be idle"
                    f"{'' if quiet else '; it was not'})")
        say(f"[{time.perf_counter() - self.start:4.0f} s] {message}")


def wait_for_quiet(limit: float, threshold: float = 10.0) -> tuple[float, bool]:
    """Wait until total CPU use stays under ``threshold`` percent for 1.5 s (or ``limit``
    seconds pass); returns (seconds waited, whether it was quiet)."""
    try:
        import psutil
    except ImportError:
        return 0.0, False
    start = time.perf_counter()
    calm = 0
    while time.perf_counter() - start < limit:
        calm = calm + 1 if psutil.cpu_percent(interval=0.5) < threshold else 0
        if calm >= 3:
            return time.perf_counter() - start, True
    return time.perf_counter() - start, False


# ----------------------------------------------------------------------------- the run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="Few prompts, few tokens, a smaller ingest (about 2 minutes).")
    parser.add_argument("--json-out", type=Path, help="Write every figure here as JSON.")
    parser.add_argument("--keep", action="store_true",
                        help="Keep the temporary NIGHTSHIFT_HOME and logs (path printed).")
    parser.add_argument("--skip", default="",
                        help="Comma-separated parts to skip: A,D,E,F,roofline,ingest.")
    parser.add_argument("--mlx-defaults", action="store_true",
                        help="Also run B with mlx-lm's own prefill settings (B0: 8 prompts at a "
                        "time, 2048-token chunks), to see what the worker's schedule changes "
                        "(about 90 s more in the full run).")
    parser.add_argument("--blas-threads", type=int, metavar="N",
                        help="OPENBLAS_NUM_THREADS for B, C, D and the roofline, and "
                        "llama.cpp's threads in E [default: the worker's "
                        "choice, the physical cores]. 1 makes B/C comparisons robust on a "
                        "shared machine, where two spinning BLAS threads slow down many "
                        "times over whenever anything else runs.")
    parser.add_argument("--max-context", type=int, metavar="N",
                        help="Context sentences before each question, at most [default: 24 "
                        "full, 8 quick]; 1 gives short chat prompts (about 45 tokens).")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="Before each part, wait up to this long for the machine to be "
                        "idle (shared machines); the waits are reported.")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.max_context is not None:
        sizes = dataclasses.replace(sizes, max_context=args.max_context)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if not args.mlx_defaults:
        skip.add("B0")

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="nightshift-bench-"))
    home = work / "home"
    results: dict = {"mode": "quick" if args.quick else "full", "sizes": sizes.__dict__,
                     "machine": {"platform": platform.platform(),
                                 "python": platform.python_version(),
                                 "load_before": machine_load()},
                     "targets": TARGETS}
    say(f"nightshift benchmark ({results['mode']}), working in {work}")
    say(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, load average "
        f"{results['machine']['load_before']['loadavg']}"
        + (f", busy: {', '.join(results['machine']['load_before']['busy_processes'])}"
           if results['machine']['load_before']['busy_processes'] else ""))
    failed = True  # until run() returns
    try:
        clock = Clock(args.wait_quiet)
        results["waits"] = clock.waits
        if args.blas_threads:  # every child inherits it (A's reference BLAS ignores it)
            os.environ["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)
        results["blas_threads_env"] = os.environ.get("OPENBLAS_NUM_THREADS")
        run(results, sizes, skip, home, work, clock)
        failed = False
    except RuntimeError as exc:  # a part failed: say which, with its error output
        results["error"] = str(exc)
        say(f"\nFAILED: {exc}")
    finally:
        results["total_s"] = time.perf_counter() - started
        results["machine"]["load_after"] = machine_load()
        if args.json_out:
            args.json_out.write_text(json.dumps(results, indent=2, default=str))
            say(f"\nfigures written to {args.json_out}")
        if args.keep or failed:
            say(f"kept {work} (logs: *.out, *.err)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    say(f"total {results['total_s']:.0f} s")
    return 1 if failed else 0


def run(results: dict, sizes: Sizes, skip: set[str], home: Path, work: Path,
        clock: Clock) -> None:
    from nightshift.jobs.store import Store
    from nightshift.worker.blas import fast_blas_env

    env = plain_env(home)
    pulled = json.loads(check(run_measured(nightshift("models", "pull", MODEL, "--json"), env,
                                           work / "pull"), "models pull").stdout)
    model_path = pulled["path"]

    from mlx_lm.utils import load_tokenizer  # the tokenizer files only, no weights
    from tokenizers import Tokenizer

    tokenizer = load_tokenizer(Path(model_path))
    rows = chat_prompts(sizes.prompts, max_context=sizes.max_context)
    texts, prompts = zip(*(encode_chat(tokenizer, r["messages"]) for r in rows))
    lengths = [len(p) for p in prompts]
    results["prompts"] = {"count": len(rows), "max_tokens": sizes.max_tokens,
                          "prompt_tokens": sum(lengths), "min_len": min(lengths),
                          "max_len": max(lengths), "sampling": "greedy (temperature 0)"}
    say(f"{len(rows)} chat prompts of {min(lengths)}-{max(lengths)} tokens "
        f"({sum(lengths)} in all), {sizes.max_tokens} new tokens each, greedy; "
        f"model {MODEL}\n")
    # A's subset: one prompt from each equal slice of the prompts sorted by length, so
    # its lengths spread like the whole set's (A's rate depends on them: its prefill is
    # the slow part).
    by_length = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    a_subset = sorted(by_length[int((j + 0.5) * len(prompts) / sizes.a_prompts)]
                      for j in range(sizes.a_prompts))
    data = {"model": MODEL, "model_path": model_path, "prompts": prompts,
            "max_tokens": sizes.max_tokens, "a_subset": a_subset,
            "batch_size": sizes.batch_size}

    # -- A: the seed's way, on a subset --------------------------------------------------
    if "A" not in skip:
        a_env = dict(env, NIGHTSHIFT_BLAS="reference")
        clock.begin("A", f"A: stream_generate, one prompt after another, "
                    f"{sizes.a_prompts} prompts ...")
        ran, a = child_phase("A", home, work, data, a_env)
        a_rows = a.pop("rows")
        results["A"] = {**a, **one_by_one(a_rows, ran), "subset": a_subset,
                        "texts": [r["text"] for r in a_rows]}

    # -- B: mlx-lm batch_generate with the worker's plan ---------------------------------
    blas_env = fast_blas_env(env) or env
    clock.begin("B", "B: mlx-lm batch_generate, all prompts, the worker's compute plan, "
                "batch size and prefill settings"
                + ("; then with mlx-lm's prefill defaults (B0)" if "B0" not in skip else "")
                + " ...")
    ran, b = child_phase("B", home, work, dict(data, mlx_defaults="B0" not in skip), blas_env)
    b0 = b.pop("mlx_defaults", None)
    common = {"prompts": len(prompts), "peak_rss": ran.peak_rss,
              "others_cores": ran.others_share, "mlx_peak": b.pop("mlx_peak")}
    for key, x in (("B", b), ("B0", b0)):
        if x:
            results[key] = {**x, **common, "gen_tps": x["generated"] / x["wall_s"],
                            "ttft_p50": pct(x["ttft"], 0.5), "ttft_p95": pct(x["ttft"], 0.95)}
    results["B"]["process_wall_s"] = ran.wall_s

    # -- C: nightshift end to end ---------------------------------------------------------
    clock.begin("C", "C: nightshift submit + nightshift worker --drain ...")
    c_file = work / "prompts.jsonl"
    write_jsonl(c_file, rows)
    _, c_job = submit(home, work, "bench-c", c_file, "--max-tokens", sizes.max_tokens)
    # The batch size B's loader measured (or remembered): the same for every run below,
    # whatever a re-measurement on a busy machine would pick.
    batch_flag = ("--batch-size", b["batch_size"])
    ran, c_worker = run_worker(home, work, "worker-c", *batch_flag)
    store = Store(f"sqlite:///{home / 'nightshift.db'}")
    c = job_figures(store, c_job)
    w = worker_rows(store, c["worker_ids"], c["requests"])
    c_responses = c.pop("responses")
    results["C"] = {**c, "job": c_job, "prompts": c["requests"],
                    # The engine's own choice for this batch size: the function B used.
                    "prefill_batch_size": b["prefill_batch_size"],
                    "prefill_step_size": b["prefill_step_size"],
                    "process_wall_s": ran.wall_s, "peak_rss": ran.peak_rss,
                    "others_cores": ran.others_share,
                    "plan": w["compute"], "batch_size": w["batch_size"],
                    "load_s": w["load_seconds"], "warmup_s": w["warmup_seconds"],
                    "decode_steps": w["decode_steps"], "sequences_decoded": w["sequences_decoded"],
                    "occupancy": w["occupancy"], "processes": w["processes"], **c_worker}
    same = sum(c_responses[r["custom_id"]] == t for r, t in zip(rows, b["texts"]))
    results["C"]["same_text_as_B"] = same
    if c["prompt_tokens"] != sum(lengths):
        say(f"  note: C counted {c['prompt_tokens']} prompt tokens, A/B/E {sum(lengths)}")

    # -- E: llama.cpp one prompt after another, on the GGUF file the model came from ------
    if "E" not in skip:
        results["E"] = llama_cpp_part(data, texts, pulled, tokenizer, rows, c_responses,
                                      home, work, env, clock)

    # -- roofline: the matmul rates the worker's loading gets, at the model's shapes --------
    if "roofline" not in skip:
        clock.begin("roofline", f"roofline: OpenBLAS fp32 matmuls at the model's shapes, "
                    f"batch {ROOFLINE_BATCH} ...")
        shapes = matmul_shapes(model_path)
        ran, r = child_phase("roofline", home, work,
                             {"batch": ROOFLINE_BATCH, "shapes": list(shapes)}, blas_env)
        results["roofline"] = {**roofline(shapes, r["gflops"], c["prompt_tokens"]
                                          + c["generated"]),
                               "openblas": r["openblas"], "blas_threads": r["blas_threads"],
                               "others_cores": ran.others_share}

    # -- D: shared prefix, with and without the prefix cache -------------------------------
    if "D" not in skip:
        counter = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))
        system = system_prompt(sizes.d_system_tokens,
                               lambda text: len(counter.encode(text).ids))
        d_rows = shared_prefix_prompts(sizes.d_prompts, system)
        d_file = work / "shared-prefix.jsonl"
        write_jsonl(d_file, d_rows)
        d = {"prompts": len(d_rows), "max_tokens": sizes.d_max_tokens,
             "system_tokens": len(counter.encode(system).ids)}
        responses = {}
        for label, flag in (("with", "--prefix-cache"), ("without", "--no-prefix-cache")):
            clock.begin(f"D-{label}", f"D: {len(d_rows)} questions, "
                        f"{d['system_tokens']}-token shared system prompt, worker {flag} ...")
            _, job = submit(home, work, f"bench-d-{label}", d_file,
                            "--max-tokens", sizes.d_max_tokens)
            ran, _ = run_worker(home, work, f"worker-d-{label}", flag, *batch_flag)
            f = job_figures(store, job)
            wd = worker_rows(store, f["worker_ids"], f["requests"])
            responses[label] = f.pop("responses")
            d[label] = {**f, "job": job, "process_wall_s": ran.wall_s,
                        "peak_rss": ran.peak_rss, "others_cores": ran.others_share,
                        "prompt_tokens_computed": wd["prompt_tokens_computed"]}
        d["prefill_ratio"] = ratio(d["without"]["prompt_tokens_computed"],
                                   d["with"]["prompt_tokens_computed"])
        d["wall_ratio"] = ratio(d["without"]["window_s"], d["with"]["window_s"])
        d["process_wall_ratio"] = ratio(d["without"]["process_wall_s"],
                                        d["with"]["process_wall_s"])
        differ = [k for k in responses["with"] if responses["with"][k] != responses["without"][k]]
        d["identical_outputs"] = not differ
        d["differing"] = differ
        results["D"] = d

    # -- F: structured output, with and without a schema -------------------------------------
    if "F" not in skip:
        results["F"] = structured_part(sizes, store, home, work, batch_flag, clock)

    # -- ingest, status, export -------------------------------------------------------------
    if "ingest" not in skip:
        results["ingest"] = ingest(sizes, work, home, c_job, clock)

    store.close()
    summarize(results)


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "age": {"type": "integer", "minimum": 0, "maximum": 130},
                         "city": {"type": "string", "maxLength": 40}}}
_NAMES = ["Maria", "Kenji", "Amara", "Tomasz", "Lucia", "Omar", "Ingrid", "Ravi", "Chloe",
          "Diego", "Hana", "Samuel", "Yuki", "Noor", "Pavel", "Ines"]
_CITIES = ["Lyon", "Osaka", "Lagos", "Krakow", "Valencia", "Cairo", "Bergen", "Pune", "Quebec",
           "Lima", "Brno", "Accra", "Sapporo", "Doha", "Tartu", "Porto"]


def structured_part(sizes: Sizes, store, home: Path, work: Path, batch_flag: tuple,
                    clock: Clock) -> dict:
    """F: the same extraction prompts with and without ``submit --schema``."""
    n = sizes.prompts // 2
    rows = [{"custom_id": f"p{i}", "prompt": f"{_NAMES[i % 16]} is {20 + (7 * i) % 60} years "
             f"old and lives in {_CITIES[(3 * i) % 16]}. Extract the person as JSON."}
            for i in range(n)]
    path, schema = work / "extract.jsonl", work / "person.json"
    write_jsonl(path, rows)
    schema.write_text(json.dumps(PERSON))
    budget = max(sizes.max_tokens, 48)  # room for the object, in quick mode too
    f, answers = {"prompts": n, "max_tokens": budget}, {}
    for label, flags in (("schema", ("--schema", schema)), ("free", ())):
        clock.begin(f"F-{label}", f"F: {n} extraction prompts, "
                    + ("held to a JSON Schema" if flags else "free") + " ...")
        _, job = submit(home, work, f"bench-f-{label}", path, "--max-tokens", budget, *flags)
        ran, _ = run_worker(home, work, f"worker-f-{label}", *batch_flag)
        figures = job_figures(store, job)
        answers[label] = figures.pop("responses")
        f[label] = {**figures, "job": job, "process_wall_s": ran.wall_s}
    f["valid"] = sum(validates(text or "", PERSON) for text in answers["schema"].values())
    f["tps_ratio"] = ratio(f["schema"]["gen_tps"], f["free"]["gen_tps"])
    return f


def validates(text: str, schema: dict) -> bool:
    """Whether ``text`` is JSON that follows ``schema`` (jsonschema, the test extra)."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    try:
        import jsonschema
    except ImportError:  # parsing is all that can be checked
        return True
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def llama_cpp_part(data: dict, texts, pulled: dict, tokenizer, rows: list[dict],
                   c_responses: dict, home: Path, work: Path, env: dict, clock: Clock) -> dict:
    """E: llama.cpp on the GGUF file ``pulled`` (the registry entry) was made from, in a
    plain child process; ``{"skipped": why}`` where that cannot run."""
    source = pulled.get("source") or ""
    if not source.startswith("gguf:"):
        return {"skipped": f"{MODEL} was not made from a GGUF file (source {source!r})"}
    gguf = source.removeprefix("gguf:")
    eos = sorted(tokenizer.eos_token_ids)
    clock.begin("E", f"E: llama.cpp (llama-cpp-python) one prompt after another, "
                f"{len(data['prompts'])} prompts, {Path(gguf).name} ...")
    longest = max(len(p) for p in data["prompts"])
    ran, e = child_phase("E", home, work, dict(
        data, gguf=gguf, texts=list(texts), eos_token_ids=eos,
        n_ctx=longest + data["max_tokens"]), env)
    if "skipped" in e:
        return e
    e_rows = e.pop("rows")

    def text(tokens: list[int]) -> str:  # as the worker makes a response (Engine._result)
        return tokenizer.decode(tokens[:-1] if tokens and tokens[-1] in eos else tokens)

    same = sum(c_responses[r["custom_id"]] == text(x["tokens"]) for r, x in zip(rows, e_rows))
    return {**e, **one_by_one(e_rows, ran), "gguf": gguf, "same_text_as_C": same}


def ingest(sizes: Sizes, work: Path, home: Path, c_job: str, clock: Clock) -> dict:
    """A big file through submit, then status and export of that job (own NIGHTSHIFT_HOME,
    so the worker runs above never see it)."""
    ihome = work / "ingest-home"
    (ihome / "models").mkdir(parents=True)
    (ihome / "models" / MODEL).symlink_to(home / "models" / MODEL, target_is_directory=True)
    path = work / "ingest.jsonl"
    say(f"ingest: writing {sizes.ingest_lines:,} lines ...")
    size = write_ingest_file(path, sizes.ingest_lines)
    clock.begin("ingest", "ingest: nightshift submit, status, export ...")
    sub = check(run_measured(nightshift("submit", path, "--json", "-q", "--model", MODEL),
                             plain_env(ihome), work / "ingest-submit"), "ingest submit")
    job = json.loads(sub.stdout)["id"]
    status = []
    for i in range(3):
        ran = check(run_measured(nightshift("status", job), plain_env(ihome),
                                 work / f"status-{i}"), "status")
        status.append(ran.wall_s)
    status_json = check(run_measured(nightshift("status", job, "--json"), plain_env(ihome),
                                     work / "status-json"), "status --json")
    counts = json.loads(status_json.stdout)["counts"]
    # The same reads in this process (the path the command takes), without interpreter
    # start-up and imports.
    from nightshift.jobs.database import open_reads

    reads = open_reads(f"sqlite:///{ihome / 'nightshift.db'}")
    inproc = []
    for _ in range(3):
        t0 = time.perf_counter()
        reads.job(job)
        reads.request_stats(job)
        inproc.append(time.perf_counter() - t0)
    big = check(run_measured(nightshift("export", job, "-o", work / "export-big.jsonl"),
                             plain_env(ihome), work / "export-big"), "export")
    small = check(run_measured(nightshift("export", c_job, "-o", work / "export-small.jsonl"),
                               plain_env(home), work / "export-small"), "export small")
    with open(work / "export-big.jsonl", "rb") as f:
        exported = sum(1 for _ in f)
    return {
        "lines": sizes.ingest_lines, "file_bytes": size, "job": job,
        "python_startup_s": python_startup(),
        "submit_s": sub.wall_s, "lines_per_s": sizes.ingest_lines / sub.wall_s,
        "submit_peak_rss": sub.peak_rss, "queued": counts.get("queued"),
        "submit_others_cores": sub.others_share,
        "status_s": status, "status_s_median": statistics.median(status),
        "status_query_s": min(inproc),
        "export_s": big.wall_s, "export_records": exported, "export_peak_rss": big.peak_rss,
        "export_records_per_s": exported / big.wall_s,
        "export_small_peak_rss": small.peak_rss,
    }


# ----------------------------------------------------------------------------- report


def _f(v, fmt="{:.1f}", none="-"):
    return none if v is None else fmt.format(v)


def _mb(v):
    return "-" if v is None else f"{v / 1e6:.0f} MB"


def summarize(res: dict) -> None:
    a, b, b0, c, d, e, roof, ing = (res.get(k) for k in ("A", "B", "B0", "C", "D", "E",
                                                         "roofline", "ingest"))
    f = res.get("F")
    e_skipped = e and e.get("skipped")
    if e_skipped:
        e = None
    say()
    cols = [("A seed: stream_generate", a), ("B mlx-lm batch_generate", b)]
    if b0:
        cols.append(("B0 same, mlx-lm prefill", b0))
    cols.append(("C nightshift end to end", c))
    if e:
        cols.append(("E llama.cpp one by one", e))
    width = 25
    head = f"{'':<24}" + "".join(f"{name:>{width}}" for name, _ in cols)
    say(head)
    say("-" * len(head))

    def row(label, fn):
        cells = []
        for _, x in cols:
            try:
                cells.append(fn(x) if x else "-")
            except (KeyError, TypeError):
                cells.append("-")
        say(f"{label:<24}" + "".join(f"{v:>{width}}" for v in cells))

    row("prompts run", lambda x: f"{x['prompts']}")
    row("prefill batch/chunk", lambda x: f"{x['prefill_batch_size']}/{x['prefill_step_size']}")
    row("serving wall (s)", lambda x: _f(x["wall_s"] if "wall_s" in x else x["window_s"]))
    row("process wall (s)", lambda x: _f(x["process_wall_s"]))
    row("  of which load (s)", lambda x: _f(x.get("load_s")))
    row("prompt tokens", lambda x: f"{x['prompt_tokens']}")
    row("generated tokens", lambda x: f"{x['generated']}")
    row("generated tok/s", lambda x: _f(x["gen_tps"]))
    row("prompt tok/s", lambda x: _f(x.get("prompt_tps", x.get("prompt_tps_mean")))
        + ("*" if "prompt_tps_mean" in x else ""))
    row("TTFT p50/p95 (s)", lambda x: f"{_f(x['ttft_p50'], '{:.2f}')}/"
        f"{_f(x['ttft_p95'], '{:.2f}')}")
    row("  from batch start", lambda x: f"{_f(x['ttft_from_start_p50'], '{:.2f}')}/"
        f"{_f(x['ttft_from_start_p95'], '{:.2f}')}" if "ttft_from_start_p50" in x
        else f"{_f(x['ttft_p50'], '{:.2f}')}/{_f(x['ttft_p95'], '{:.2f}')}" if x is b or x is b0
        else "-")
    row("peak RSS", lambda x: _mb(x["peak_rss"]))
    row("peak (MLX / worker)", lambda x: _mb(x.get("mlx_peak") or x.get("peak_memory")))
    row("other load (cores)", lambda x: _f(x["others_cores"], "{:.2f}"))
    say("* C's prompt tok/s: mean per request as `nightshift status` shows it "
        "(includes waiting for a prefill turn)")
    if a:
        say(f"A ran {a['prompts']} of the {res['prompts']['count']} prompts (it is slow; "
            f"one from each length slice, {a['prompt_tokens']} prompt "
            f"tokens, {a['prompt_tokens'] / a['prompts']:.0f} a prompt against "
            f"{res['prompts']['prompt_tokens'] / res['prompts']['count']:.0f} in all): "
            "rates are compared, not totals.")
    say()
    say("compute plans:")
    if a:
        say(f"  A: {a['plan']} (OpenBLAS mapped: {a['openblas']})")
    if b:
        curve = ", ".join(f"{k}: {v:.0f}" for k, v in b["batch_curve"].items())
        say(f"  B: {b['plan']} (OpenBLAS mapped: {b['openblas']}); measured tok/s by batch "
            f"size: {curve or 'remembered from an earlier measurement'}")
    if c:
        say(f"  C: {c['plan']}")
        if c.get("ready_line"):
            say(f"     worker start-up: {c['ready_line']}")
    if e:
        say(f"  E: llama-cpp-python {e['version']}, threads: {e['threads']}, {e['gguf']}; "
            f"llama.cpp's own tokenizer gives the same prompt tokens on "
            f"{e['same_prompt_tokens']}/{e['prompts']} prompts")
    elif e_skipped:
        say(f"  E skipped: {e_skipped}")
    say()
    ratios = res["ratios"] = {
        "c_over_a": ratio(c and c["gen_tps"], a and a["gen_tps"]),
        "c_over_b": ratio(c and c["gen_tps"], b and b["gen_tps"]),
        "occupancy": c and c["occupancy"],
    }
    if c and e:
        ratios["c_over_e"] = ratio(c["gen_tps"], e["gen_tps"])
        ratios["c_over_e_process"] = ratio(c["generated"] / c["process_wall_s"],
                                           e["generated"] / e["process_wall_s"])
        say(f"C / E generated tok/s: {ratios['c_over_e']:.2f} serving, "
            f"{ratios['c_over_e_process']:.2f} whole process (generated tokens / process "
            f"wall time); E's answers are C's on {e['same_text_as_C']}/{e['prompts']} prompts "
            "(greedy; informational)")
    if c and roof:
        ratios["roofline_share"] = roof["seconds"] / c["window_s"]
        ratios["roofline_share_process"] = roof["seconds"] / c["process_wall_s"]
        rates = ", ".join(f"{s['in']}x{s['out']} {s['gflops']:.0f}" + (
            f" (x{s['count']})" if s["count"] > 1 else "") for s in roof["shapes"])
        say(f"roofline: OpenBLAS fp32 GFLOP/s of [{roof['batch']} x in] @ [in x out] "
            f"(OpenBLAS threads: {roof['blas_threads'] or 'default'}, other load "
            f"{_f(roof['others_cores'], '{:.2f}')} cores): {rates}")
        say(f"  the model's matmuls: {roof['flops_per_token'] / 1e9:.3f} GFLOP a token, "
            f"{roof['seconds_per_token'] * 1000:.2f} ms at these rates "
            f"({roof['effective_gflops']:.0f} GFLOP/s overall); C's {roof['tokens']:,} "
            f"prompt + generated tokens: {roof['seconds']:.2f} s")
        say(f"  C's share of the roofline: {ratios['roofline_share']:.0%} of its serving "
            f"time ({c['window_s']:.1f} s), {ratios['roofline_share_process']:.0%} of its "
            f"whole process ({c['process_wall_s']:.1f} s)")
    if c:
        say(f"C occupancy: {c['sequences_decoded']} sequences over {c['decode_steps']} decode "
            f"steps ({c['processes']} processes, batch {c['batch_size']}, fair share at most) "
            f"= {_f(c['occupancy'], '{:.3f}')}; "
            f"same text as B on {c['same_text_as_B']}/{c['done']} prompts")
    if d:
        w, wo = d["with"], d["without"]
        say()
        say(f"D shared prefix: {d['prompts']} questions behind a {d['system_tokens']}-token "
            f"system prompt, {d['max_tokens']} new tokens each")
        if d["prompts"] < res["prompts"]["count"]:
            say(f"  (the first {d['prompts']} of the {res['prompts']['count']} questions, "
                "without their context sentences: without the cache each costs "
                f"{d['system_tokens']}+ prompt tokens, and the run must stay short)")
        say(f"{'':<28}{'--prefix-cache':>18}{'--no-prefix-cache':>20}{'without/with':>14}")
        for label, key, fmt in (("prompt tokens computed", "prompt_tokens_computed", "{:.0f}"),
                                ("serving wall (s)", "window_s", "{:.1f}"),
                                ("process wall (s)", "process_wall_s", "{:.1f}"),
                                ("generated tok/s", "gen_tps", "{:.1f}"),
                                ("TTFT p50 (s)", "ttft_p50", "{:.2f}"),
                                ("TTFT p95 (s)", "ttft_p95", "{:.2f}")):
            say(f"{label:<28}{_f(w[key], fmt):>18}{_f(wo[key], fmt):>20}"
                f"{_f(ratio(wo[key], w[key]), '{:.2f}x'):>14}")
        say(f"{'peak RSS':<28}{_mb(w['peak_rss']):>18}{_mb(wo['peak_rss']):>20}")
        say(f"{'other load (cores)':<28}{_f(w['others_cores'], '{:.2f}'):>18}"
            f"{_f(wo['others_cores'], '{:.2f}'):>20}")
        say(f"identical greedy outputs: {d['identical_outputs']}"
            + (f" (differ: {', '.join(d['differing'][:10])})" if d["differing"] else ""))
        ratios["d_prefill_ratio"] = d["prefill_ratio"]
        ratios["d_wall_ratio"] = d["wall_ratio"]
    if f:
        s, fr = f["schema"], f["free"]
        say()
        say(f"F structured output: {f['prompts']} extraction prompts, {f['max_tokens']} new "
            "tokens at most, the same prompts with submit --schema and without")
        say(f"{'':<28}{'--schema':>18}{'free':>20}{'schema/free':>14}")
        for label, key, fmt in (("generated tokens", "generated", "{:.0f}"),
                                ("serving wall (s)", "window_s", "{:.1f}"),
                                ("generated tok/s", "gen_tps", "{:.1f}")):
            say(f"{label:<28}{_f(s[key], fmt):>18}{_f(fr[key], fmt):>20}"
                f"{_f(ratio(s[key], fr[key]), '{:.2f}x'):>14}")
        say(f"constrained answers that parse and validate: {f['valid']}/{f['prompts']}")
    if ing:
        say()
        say(f"ingest: {ing['lines']:,} lines ({ing['file_bytes'] / 1e6:.0f} MB) in "
            f"{ing['submit_s']:.1f} s = {ing['lines_per_s']:,.0f} lines/s, peak RSS "
            f"{_mb(ing['submit_peak_rss'])} (other load {_f(ing['submit_others_cores'], '{:.2f}')}"
            " cores)")
        say(f"status JOB: {', '.join(f'{s:.2f}' for s in ing['status_s'])} s "
            f"(whole command, 3 runs; the median is checked); of which the database reads "
            f"{ing['status_query_s'] * 1000:.1f} ms, and starting Python + importing the CLI "
            f"{ing['python_startup_s']:.2f} s")
        say(f"export JOB: {ing['export_records']:,} records in {ing['export_s']:.1f} s "
            f"({ing['export_records_per_s']:,.0f}/s), peak RSS {_mb(ing['export_peak_rss'])} "
            f"(a {res['prompts']['count']}-record export: {_mb(ing['export_small_peak_rss'])})")
        ratios["ingest_lines_per_s"] = ing["lines_per_s"]
        ratios["ingest_peak_mb"] = ing["submit_peak_rss"] / 1e6
        ratios["status_s"] = ing["status_s_median"]
        ratios["export_flat_mb"] = (ing["export_peak_rss"] - ing["export_small_peak_rss"]) / 1e6
    say()
    say("targets:" + (" (the issue's, for the full run; quick mode is smaller)"
                      if res["mode"] == "quick" else ""))
    checks = res["checks"] = {}
    for key, target in TARGETS.items():
        value = ratios.get(key)
        if value is None:
            continue
        lower_is_better = key in ("ingest_peak_mb", "status_s")
        ok = value < target if lower_is_better else value >= target
        checks[key] = ok
        say(f"  {'ok  ' if ok else 'MISS'} {key:<20} {value:>12.3f}  "
            f"({'<' if lower_is_better else '>='} {target})")
    if d:
        checks["d_identical_outputs"] = d["identical_outputs"]
        say(f"  {'ok  ' if d['identical_outputs'] else 'MISS'} d_identical_outputs")
    if ing:
        flat = ratios["export_flat_mb"] < 50
        checks["export_flat"] = flat
        say(f"  {'ok  ' if flat else 'MISS'} export_flat          "
            f"{ratios['export_flat_mb']:>12.1f}  (MB more for {ing['lines']:,} records "
            "than for a few; < 50)")


if __name__ == "__main__":
    if "--phase" in sys.argv:
        run_phase(sys.argv[sys.argv.index("--phase") + 1])
    else:
        raise SystemExit(main())
