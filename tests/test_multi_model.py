"""Several models in one queue: one real worker process switches between them in
priority order, a pinned worker leaves other models' work alone, and `status` says
what is loaded, what waits for which model, and what a switch cost."""

from __future__ import annotations

import gc
import json
import shutil
import signal
import weakref

import mlx.core as mx
from nightshift.jobs.store import Store
from nightshift.worker import loader
from nightshift.worker.service import Worker, WorkerOptions

from tests.workers import run_worker, start_worker, wait_for

MODELS = ("tiny-a", "tiny-b", "tiny-c")


def install(home, tiny_llama_dir, names=MODELS) -> None:
    for name in names:
        shutil.copytree(tiny_llama_dir, home / "models" / name)


def submit(invoke, path, model, priority, n=3) -> str:
    path.write_text("".join(json.dumps({"prompt": f"{model} question {i}"}) + "\n"
                            for i in range(n)))
    out = invoke("submit", path, "--model", model, "--priority", priority,
                 "--max-tokens", 6, "--json").output
    return json.loads(out)["id"]


def timings(invoke, job) -> tuple[float, float]:
    """(first start, last finish) of a job's requests, from its export."""
    rows = [json.loads(x)["nightshift"] for x in invoke("export", job).output.splitlines()]
    assert {r["status"] for r in rows} == {"done"}, rows
    return min(r["started_at"] for r in rows), max(r["finished_at"] for r in rows)


def test_one_worker_switches_models_by_priority_and_age(invoke, home, tiny_llama_dir, tmp_path):
    install(home, tiny_llama_dir)
    # Submitted oldest first. The first model is the top job's (a_high), kept while it
    # has work (a_low too); then the next job by priority and age: c_mid (priority 2,
    # older than b_mid), then tiny-b's jobs, b_mid before b_low.
    b_low = submit(invoke, tmp_path / "1.jsonl", "tiny-b", 0)
    a_high = submit(invoke, tmp_path / "2.jsonl", "tiny-a", 5)
    c_mid = submit(invoke, tmp_path / "3.jsonl", "tiny-c", 2)
    b_mid = submit(invoke, tmp_path / "4.jsonl", "tiny-b", 2)
    a_low = submit(invoke, tmp_path / "5.jsonl", "tiny-a", 0)

    # Batch 2 < 3 requests per job: slots refill within a job and across same-model jobs.
    result = run_worker("--drain", "--batch-size", 2, timeout=300,
                        log_path=tmp_path / "worker.log")
    assert result.returncode == 0, result.stderr
    assert "ready: tiny-a: loaded in" in result.stderr

    spans = {job: timings(invoke, job) for job in (a_high, a_low, c_mid, b_mid, b_low)}
    # One model at a time: every request of a model ends before the next model's start.
    assert max(spans[a_high][1], spans[a_low][1]) <= spans[c_mid][0]
    assert spans[c_mid][1] <= min(spans[b_mid][0], spans[b_low][0])
    # Within a model, by priority.
    assert spans[a_high][0] <= spans[a_low][0] and spans[b_mid][0] <= spans[b_low][0]

    switches = sorted(Store().switches(), key=lambda s: s.at)
    assert [(s.from_model, s.to_model) for s in switches] == [("tiny-a", "tiny-c"),
                                                              ("tiny-c", "tiny-b")]
    for s in switches:
        assert s.unload_seconds >= 0 and s.load_seconds > 0 and s.warmup_seconds > 0
    assert "switched model tiny-a -> tiny-c (unload" in result.stderr

    status = json.loads(invoke("status", "--json").output)
    last = status["last_switch"]
    assert (last["from_model"], last["to_model"]) == ("tiny-c", "tiny-b")
    assert last["total_seconds"] == (last["unload_seconds"] + last["load_seconds"]
                                     + last["warmup_seconds"])
    assert "last model switch: tiny-c -> tiny-b took" in invoke("status").output
    assert {j["state"] for j in status["jobs"]} == {"done"}


def test_pinned_worker_leaves_other_models_queued(invoke, home, tiny_llama_dir, tmp_path):
    install(home, tiny_llama_dir, ("tiny-a", "tiny-b"))
    a = submit(invoke, tmp_path / "a.jsonl", "tiny-a", 0)
    b = submit(invoke, tmp_path / "b.jsonl", "tiny-b", 9, n=2)  # higher priority, other model

    worker = start_worker("--model", "tiny-a", "--batch-size", 2, log_path=tmp_path / "w.log")
    try:
        def job_state(job):
            return json.loads(invoke("status", job, "--json").output)["state"]

        wait_for(lambda: job_state(a) == "done", timeout=120)
        status = json.loads(invoke("status", "--json").output)
        [w] = status["workers"]
        assert (w["serves"], w["model"]) == ("tiny-a", "tiny-a")
        assert w["load_seconds"] > 0 and w["warmup_seconds"] > 0
        assert status["waiting"] == {"tiny-b": 2}
        assert ("2 requests wait for model tiny-b, which no running worker serves "
                "(start one: nightshift worker --model tiny-b)") in status["notes"]
        text = invoke("status").output
        assert "model tiny-a (serves only tiny-a)" in text
        assert "loaded in" in text and "warm-up" in text
        assert "requests waiting, by model: tiny-b 2" in text
    finally:
        worker.send_signal(signal.SIGINT)
        assert worker.wait(timeout=60) == 0, (tmp_path / "w.log").read_text()

    detail = json.loads(invoke("status", b, "--json").output)
    assert detail["state"] == "queued" and detail["counts"].get("queued") == 2
    assert not detail["counts"].get("done")
    assert Store().switches() == []


def test_switch_unloads_the_old_model_before_loading_the_next(home, tiny_llama_dir,
                                                              monkeypatch):
    """Two large models must never be resident at once: by the time the next model's
    load starts, the previous model object is gone and its memory is back."""
    install(home, tiny_llama_dir, ("tiny-a", "tiny-b"))
    store = Store()
    worker = Worker(store, options=WorkerOptions(load=loader.LoadOptions(batch_size=2)))
    store.register_worker(worker.id, worker.host, worker.pid, None)
    worker._switch_to("tiny-a")
    previous = weakref.ref(worker.loaded.model)
    weights = sum(v.nbytes for v in _leaves(worker.loaded.model.parameters()))
    active_with_a = mx.get_active_memory()

    seen = {}
    real_load = loader.load

    def observing_load(name, options=None):
        gc.collect()
        seen["previous alive"] = previous() is not None
        seen["freed"] = active_with_a - mx.get_active_memory()
        return real_load(name, options)

    monkeypatch.setattr(loader, "load", observing_load)
    worker._switch_to("tiny-b")
    assert seen["previous alive"] is False
    assert seen["freed"] >= weights
    assert worker.loaded.name == "tiny-b"
    [switch] = store.switches()
    assert (switch.from_model, switch.to_model) == ("tiny-a", "tiny-b")
    worker.engine.close()


def _leaves(tree):
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(tree)]
