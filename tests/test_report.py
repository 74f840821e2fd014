"""nightshift report (issue 13): one self-contained HTML file, opened in a real headless
browser (Debian's Chromium), which renders it with its plots."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess

import pytest
from nightshift.jobs.submit import JobOptions, submit
from nightshift.jobs.vocabulary import Chunk, Result

PLOTS = 7  # throughput, TTFT, latency, prompt and completion tokens, finish reasons, failures


def finished_job(store, name: str, n: int, pace: float) -> str:
    """A job whose requests ran (with spread timings), one failed, two were cancelled."""
    data = "".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(n)).encode()
    job = submit(store, io.BytesIO(data), "in.jsonl", JobOptions(model="m", name=name),
                 lambda m: m)[0]
    store.register_worker(f"w-{name}", "host", 1, None)
    claimed = store.claim(Chunk(job, 0, n, "m"), f"w-{name}", n - 2)
    start = 1_800_000_000.0
    results = []
    for i, c in enumerate(claimed):
        t = start + i * pace
        if i == 3:
            results.append(Result(c.id, job, t, t + 1, error="generation failed: out of memory"))
            continue
        results.append(Result(c.id, job, t, t + pace * (1 + i % 4), first_token_at=t + 0.2 * (
            1 + i % 3), response="x", finish_reason="length" if i % 5 else "stop",
            prompt_tokens=20 + i, completion_tokens=10 + i % 7))
    store.finish(results, f"w-{name}")
    store.cancel(job)
    return job


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def store(home):
    from nightshift.jobs.store import Store

    s = Store()  # the home's SQLite file, which the command reads
    yield s
    s.close()


def test_a_report_compares_jobs_in_one_self_contained_page(invoke, store, tmp_path):
    a = finished_job(store, "first", 40, 0.5)
    b = finished_job(store, "second <b>", 30, 0.8)
    out = tmp_path / "report.html"
    invoke("report", a, b, "-o", out)
    page = out.read_text()
    assert page.count("<svg") == PLOTS
    # Nothing to fetch: no scripts, styles or images from elsewhere.
    assert "<script" not in page and "<link" not in page and "src=" not in page
    assert "second &lt;b&gt;" in page and "<b>" not in page  # names are escaped
    assert "generation failed" in page and ">1<" in page  # the failure, counted
    assert invoke("report", a, "-o", out, expect=1).output.strip().endswith(
        "pass --force to overwrite it, or choose another -o")
    invoke("report", "nosuchjob", "-o", tmp_path / "x.html", expect=1)
    assert not (tmp_path / "x.html").exists()


@pytest.mark.slow
def test_the_report_renders_in_a_headless_browser(invoke, store, tmp_path):
    browser = chromium()
    if browser is None:
        if os.environ.get("NIGHTSHIFT_REQUIRE_SERVICES"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's)")
        pytest.skip("chromium is not installed")
    job = finished_job(store, "nightly", 60, 0.4)
    out = tmp_path / "report.html"
    invoke("report", job, "-o", out)
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", out.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<svg") == PLOTS and "nightly" in dom.stdout
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1000,2400",
                    out.as_uri()], capture_output=True, timeout=120, check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] == 2400
    colours = {tuple(p) for p in (pixels[::7, ::7, :3] * 255).astype(int).reshape(-1, 3)}
    assert len(colours) > 50  # text, axes and coloured plots, not a blank page
