"""How `nightshift status` shows workers and jobs."""

from __future__ import annotations

import click
from nightshift.cli import output
from nightshift.jobs.reads import Reads
from nightshift.jobs.vocabulary import CANCELLED, DONE, EXPIRED, FAILED, QUEUED, RUNNING


def _worker_json(w) -> dict:
    return {
        "id": w.id, "host": w.host, "pid": w.pid, "serves": w.serves, "model": w.model,
        "state": w.state, "batch_size": w.batch_size, "compute": w.compute, "memory": w.memory,
        "load_seconds": w.load_seconds, "warmup_seconds": w.warmup_seconds,
        "peak_memory_bytes": w.peak_memory, "started_at": w.started_at,
        "heartbeat_at": w.heartbeat_at,
    }


def _switch_json(s) -> dict:
    return {
        "worker_id": s.worker_id, "from_model": s.from_model, "to_model": s.to_model,
        "unload_seconds": s.unload_seconds, "load_seconds": s.load_seconds,
        "warmup_seconds": s.warmup_seconds,
        "total_seconds": s.unload_seconds + s.load_seconds + s.warmup_seconds, "at": s.at,
    }


def _switch_line(s: dict) -> str:
    return (f"last model switch: {s['from_model']} -> {s['to_model']} took "
            f"{s['total_seconds']:.1f} s (unload {s['unload_seconds']:.1f}, load "
            f"{s['load_seconds']:.1f}, warm-up {s['warmup_seconds']:.1f}), {output.ago(s['at'])}")


def _waiting_line(live, waiting: dict[str, int]) -> str:
    loaded = {w.model for w in live}
    parts = [f"{model} {n}{' (loaded)' if model in loaded else ''}"
             for model, n in sorted(waiting.items())]
    return "requests waiting, by model: " + ", ".join(parts)


def _waiting_notes(live, waiting: dict[str, int]) -> list[str]:
    """Plain words for work that nothing will run: the classic overnight failure."""
    notes = []
    if not live:
        total = sum(waiting.values())
        if total:
            notes.append(f"NO WORKER IS RUNNING: {total} requests are waiting. "
                         "Start one: nightshift worker")
        else:
            notes.append("No worker is running (start one: nightshift worker)")
        return notes
    any_model = any(w.serves is None for w in live)
    for model, n in sorted(waiting.items()):
        served = any(w.serves == model or w.model == model for w in live)
        if served:
            continue
        if any_model:
            notes.append(f"{n} requests wait for model {model}: the worker switches to it "
                         "when its current model's work is done")
        else:
            notes.append(f"{n} requests wait for model {model}, which no running worker "
                         f"serves (start one: nightshift worker --model {model})")
    return notes


def overview(store: Reads, limit: int, as_json: bool) -> None:
    live = store.live_workers()
    waiting = store.models_waiting()
    jobs = store.list_jobs(limit)
    notes = _waiting_notes(live, waiting)
    switches = store.switches(limit=1)
    last_switch = _switch_json(switches[0]) if switches else None
    if as_json:
        output.print_json({
            "workers": [_worker_json(w) for w in live],
            "waiting": waiting,
            "notes": notes,
            "last_switch": last_switch,
            "jobs": [j.to_json() for j in jobs],
        })
        return
    for w in live:
        output.echo(
            f"worker {w.id}: {w.state}, model {w.model or '-'}"
            f"{' (serves only ' + w.serves + ')' if w.serves else ''}, batch {w.batch_size or '-'},"
            f" heartbeat {output.duration(w.heartbeat_age)} ago"
        )
        if w.compute:
            output.echo(f"  compute: {w.compute}")
        if w.load_seconds is not None:
            click.echo(f"  loaded in {w.load_seconds:.1f} s, warm-up {w.warmup_seconds or 0:.1f} s,"
                       f" peak memory {output.size(w.peak_memory)}")
    if last_switch:
        output.echo(_switch_line(last_switch))
    if waiting and live:
        output.echo(_waiting_line(live, waiting))
    for note in notes:
        output.echo(note)
    if not jobs:
        click.echo("No jobs yet: nightshift submit FILE")
        return
    rows = []
    for j in jobs:
        c = j.counts
        rows.append([
            j.id, j.name or "", j.model, j.state,
            f"{c.get(DONE, 0)}/{j.total}", c.get(FAILED, 0) or "",
            output.rate(j.tokens_per_second), output.duration(j.eta_seconds),
        ])
    click.echo()
    output.table(["JOB", "NAME", "MODEL", "STATE", "DONE", "FAILED", "TOK/S", "ETA"], rows)


def job_detail(store: Reads, job_id: str, as_json: bool) -> None:
    job = store.job(job_id)
    stats = store.request_stats(job_id)
    data = {**job.to_json(), **stats}
    if as_json:
        output.print_json(data)
        return
    c = job.counts
    lines = [
        ("job", f"{job.id}{' (' + job.name + ')' if job.name else ''}"),
        ("model", job.model),
        ("state", job.state),
        ("requests", f"{job.total}: {c.get(DONE, 0)} done, {c.get(FAILED, 0)} failed, "
                     f"{c.get(RUNNING, 0)} running, {c.get(QUEUED, 0)} queued, "
                     f"{c.get(CANCELLED, 0)} cancelled"
                     + (f", {c[EXPIRED]} expired" if c.get(EXPIRED) else "")),
        ("priority", job.priority),
        ("created", output.when(job.created_at)),
        ("not before", output.when(job.not_before)),
        ("deadline", output.when(job.deadline)),
        ("started", output.when(job.started_at)),
        ("finished", output.when(job.finished_at) if job.remaining == 0 else "-"),
        ("wall time", output.duration(job.wall_seconds)),
        ("generated",
         f"{job.completion_tokens} tokens, {output.rate(job.tokens_per_second)} tok/s"),
        ("prompt", f"{job.prompt_tokens} tokens, "
                   f"{output.rate(stats['prompt_tps_mean'])} tok/s per request (mean)"),
        ("first token", f"p50 {_secs(stats['ttft_p50'])}, p95 {_secs(stats['ttft_p95'])}"),
        ("peak memory", output.size(job.peak_memory)),
        ("eta", output.duration(job.eta_seconds)),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        output.echo(f"{key:<{width}}  {value}")


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


__all__ = ["overview", "job_detail", "watch_progress"]


ENDED = ("done", "failed", "cancelled", "expired")


def watch_progress(store: Reads, job_id: str | None, limit: int, interval: float) -> None:
    """``status --watch``: a live view refreshed in place on a terminal, until Ctrl-C (or
    until JOB ends); elsewhere (a log, a pipe) one plain line per job each interval."""
    import sys
    import time

    live_view = sys.stdout.isatty()
    shown = None
    try:
        if live_view:
            from rich.live import Live

            with Live(_frame(store, job_id, limit), console=output.console(),
                      auto_refresh=False) as live:
                while not _ended(store, job_id):
                    time.sleep(interval)
                    live.update(_frame(store, job_id, limit), refresh=True)
            return
        while True:
            jobs = _watched(store, job_id, limit)
            lines = [j.progress_line() for j in jobs] or ["no job in progress"]
            if lines != shown:  # a log gains a line when something moved, not every tick
                stamp = time.strftime("%H:%M:%S")
                for line in lines:
                    output.echo(f"{stamp} {line}")
                sys.stdout.flush()
                shown = lines
            if job_id and jobs[0].state in ENDED:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        pass  # Ctrl-C ends the watch; the last frame stays on the screen


def _watched(store: Reads, job_id: str | None, limit: int) -> list:
    if job_id:
        return [store.job(job_id)]
    return [j for j in store.list_jobs(limit) if j.state not in ENDED]


def _ended(store: Reads, job_id: str | None) -> bool:
    return bool(job_id) and store.job(job_id).state in ENDED


def _frame(store: Reads, job_id: str | None, limit: int):
    """What the terminal shows: the workers, then a progress bar per job."""
    import time

    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    live = store.live_workers()
    head = [Text(output.printable(
        f"worker {w.id}: {w.state}, model {w.model or '-'}, batch {w.batch_size or '-'}"))
        for w in live] or [Text("No worker is running (start one: nightshift worker)")]
    jobs = [store.job(job_id)] if job_id else store.list_jobs(limit)
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("JOB", "NAME", "STATE", "PROGRESS", "", "FAILED", "TOK/S", "ETA"):
        table.add_column(column)
    for j in jobs:
        finished = j.total - j.remaining
        table.add_row(Text(j.id), Text(output.printable(j.name or "")), Text(j.state),
                      ProgressBar(total=max(j.total, 1), completed=finished, width=24),
                      Text(f"{j.counts.get(DONE, 0):,}/{j.total:,}"),
                      Text(str(j.counts.get(FAILED, 0) or "")),
                      Text(output.rate(j.tokens_per_second)),
                      Text(output.duration(j.eta_seconds)))
    stamp = Text(time.strftime("%H:%M:%S") + (" (Ctrl-C to stop watching)" if not job_id
                                             else ""), style="dim")
    return Group(*head, Text(), table, stamp)
