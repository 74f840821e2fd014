"""``nightshift report``: one self-contained HTML file with a job's figures and plots.

The plots are matplotlib's, drawn as SVG and written into the page: the file opens
anywhere, offline, with no script to run (Vega-Lite or Plotly would embed a megabyte or
more of JavaScript for the same static charts). Several jobs share each plot, one colour
each, to compare runs. Every request row is read once, in pages, keeping only the few
numbers a plot needs.
"""

from __future__ import annotations

import html
import io
import time
from collections import Counter
from dataclasses import dataclass, field

from nightshift.jobs.reads import JobSummary, Reads, duration
from nightshift.jobs.vocabulary import DONE, FAILED

THROUGHPUT_BINS = 60  # points on the throughput-over-time line, at most
HISTOGRAM_BINS = 40  # at most; fewer for few requests


def _bin_count(n: int, most: int) -> int:
    """Bins for ``n`` values: about two values a bin, from 5 to ``most``."""
    return max(5, min(most, n // 2))


@dataclass
class JobData:
    """What the plots need of one job."""

    job: JobSummary
    stats: dict
    finished: list[float] = field(default_factory=list)  # done requests' finish times
    tokens: list[int] = field(default_factory=list)  # their completion tokens
    decoding: list[tuple[float, float, int]] = field(default_factory=list)  # first, last, n
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)  # admission to last token
    prompt_tokens: list[int] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)  # finish reasons of done requests
    failures: Counter = field(default_factory=Counter)  # errors of failed requests

    @property
    def label(self) -> str:
        return f"{self.job.id}" + (f" ({self.job.name})" if self.job.name else "")


def collect(store: Reads, job_id: str) -> JobData:
    """Read a job's requests once.

    Raises:
        NotFound: no such job.
    """
    data = JobData(store.job(job_id), store.request_stats(job_id))
    for row in store.iter_requests(job_id):
        if row.status == DONE:
            data.finished.append(row.finished_at)
            data.tokens.append(row.completion_tokens or 0)
            data.prompt_tokens.append(row.prompt_tokens or 0)
            data.reasons[row.finish_reason or "-"] += 1
            if row.first_token_at and row.started_at:
                data.ttft.append(row.first_token_at - row.started_at)
                data.decoding.append((row.first_token_at, row.finished_at,
                                      row.completion_tokens or 0))
            if row.started_at:
                data.latency.append(row.finished_at - row.started_at)
        elif row.status == FAILED:
            data.failures[_reason(row.error)] += 1
    return data


def _reason(error: str | None) -> str:
    """An error grouped with others of its kind: its first clause, numbers kept."""
    text = (error or "no message").split(":")[0].strip()
    return text[:120]


def render(jobs: list[JobData]) -> str:
    """The report's HTML."""
    import matplotlib

    matplotlib.use("Agg")  # no display; a file is all that is drawn
    title = "nightshift report: " + ", ".join(d.label for d in jobs)
    sections = [
        ("Throughput over the job's time", _throughput(jobs)),
        ("Time to first token", _histogram(jobs, "ttft", "seconds from admission")),
        ("Total latency", _histogram(jobs, "latency", "seconds from admission to the last token")),
        ("Prompt tokens per request", _histogram(jobs, "prompt_tokens", "tokens")),
        ("Completion tokens per request", _histogram(jobs, "tokens", "tokens")),
        ("Finish reasons", _bars(jobs, "reasons", "done requests")),
        ("Failures by reason", _bars(jobs, "failures", "failed requests")),
    ]
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p class=when>Written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
            _figures_table(jobs), _failure_table(jobs)]
    for heading, svg in sections:
        body.append(f"<section><h2>{html.escape(heading)}</h2>{svg}</section>")
    return _PAGE.format(title=html.escape(title), body="\n".join(body))


def _figures_table(jobs: list[JobData]) -> str:
    rows = [
        ("model", lambda d: d.job.model),
        ("state", lambda d: d.job.state),
        ("requests", lambda d: f"{d.job.total:,}"),
        ("done", lambda d: f"{d.job.counts.get(DONE, 0):,}"),
        ("failed", lambda d: f"{d.job.counts.get(FAILED, 0):,}"),
        ("wall time", lambda d: duration(d.job.wall_seconds)),
        ("generated tokens", lambda d: f"{d.job.completion_tokens:,}"),
        ("generated tok/s", lambda d: _num(d.job.tokens_per_second)),
        ("prompt tokens", lambda d: f"{d.job.prompt_tokens:,}"),
        ("first token p50 / p95 (s)",
         lambda d: f"{_num(d.stats['ttft_p50'], 2)} / {_num(d.stats['ttft_p95'], 2)}"),
        ("peak memory (GB)", lambda d: _num(d.job.peak_memory and d.job.peak_memory / 1e9, 2)),
    ]
    head = "".join(f"<th>{html.escape(d.label)}</th>" for d in jobs)
    body = "".join(f"<tr><th>{name}</th>" + "".join(
        f"<td>{html.escape(str(fn(d)))}</td>" for d in jobs) + "</tr>" for name, fn in rows)
    return f"<table class=figures><tr><th></th>{head}</tr>{body}</table>"


def _failure_table(jobs: list[JobData]) -> str:
    rows = [(d.label, reason, n) for d in jobs for reason, n in d.failures.most_common(10)]
    if not rows:
        return "<p>No request failed.</p>"
    body = "".join(f"<tr><td>{html.escape(label)}</td><td>{n:,}</td><td>{html.escape(reason)}"
                   "</td></tr>" for label, reason, n in rows)
    return ("<table class=failures><tr><th>job</th><th>failed</th><th>reason</th></tr>"
            f"{body}</table>")


def _num(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # inline: without the XML prologue


def _axes():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.grid(alpha=0.3)
    return fig, ax


def _throughput(jobs: list[JobData]) -> str:
    fig, ax = _axes()
    for d in jobs:
        if not d.decoding:
            continue
        start = d.job.started_at or min(first for first, _, _ in d.decoding)
        span = max(max(last for _, last, _ in d.decoding) - start, 1e-9)
        bins = THROUGHPUT_BINS
        width = span / bins
        totals = [0.0] * bins
        # A request's tokens are spread over the time it decoded (first token to last).
        for first, last, n in d.decoding:
            a, b = (first - start) / width, max((last - start) / width, (first - start) / width)
            for i in range(int(a), min(int(b), bins - 1) + 1):
                overlap = min(b, i + 1) - max(a, i)
                totals[i] += n * (overlap / (b - a) if b > a else 1.0)
        xs = [(i + 0.5) * width / 60 for i in range(bins)]
        ax.plot(xs, [n / width for n in totals], label=d.label)
    ax.set_xlabel("minutes since the job started")
    ax.set_ylabel("generated tokens / s")
    _legend(ax, jobs)
    return _svg(fig)


def _histogram(jobs: list[JobData], attr: str, xlabel: str) -> str:
    fig, ax = _axes()
    everything = [v for d in jobs for v in getattr(d, attr)]
    if everything:  # the same bins for every job, so their bars compare
        low, high = min(everything), max(everything)
        count = _bin_count(len(everything), HISTOGRAM_BINS)
        edges = [low + (high - low or 1) * i / count for i in range(count + 1)]
    for d in jobs:
        values = getattr(d, attr)
        if values:
            ax.hist(values, bins=edges, alpha=0.6, label=d.label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("requests")
    _legend(ax, jobs)
    return _svg(fig)


def _bars(jobs: list[JobData], attr: str, ylabel: str) -> str:
    fig, ax = _axes()
    names = sorted({k for d in jobs for k in getattr(d, attr)})
    width = 0.8 / max(len(jobs), 1)
    for i, d in enumerate(jobs):
        counts = getattr(d, attr)
        ax.bar([x + i * width for x in range(len(names))], [counts.get(n, 0) for n in names],
               width=width, label=d.label)
    ax.set_xticks([x + width * (len(jobs) - 1) / 2 for x in range(len(names))],
                  [n if len(n) <= 40 else n[:37] + "..." for n in names])
    ax.set_ylabel(ylabel)
    if not names:
        ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
    _legend(ax, jobs)
    return _svg(fig)


def _legend(ax, jobs: list[JobData]) -> None:
    if len(jobs) > 1 and ax.get_legend_handles_labels()[0]:
        ax.legend()


_PAGE = """<!doctype html>
<html lang=en><head><meta charset=utf-8><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.1em; margin-top: 2em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ padding: 0.25em 0.8em; text-align: left; border-bottom: 1px solid #ddd; }}
.when {{ color: #777; }} svg {{ max-width: 100%; height: auto; }}
</style></head>
<body>
{body}
</body></html>
"""
