"""Output that cannot hurt: what a user submitted never drives the terminal or a
spreadsheet, export files are written like any other file and counted right, and a
read-only data directory or a missing optional driver is a clear message."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nightshift.jobs.store import Store
from nightshift.jobs.submit import JobOptions, submit
from nightshift.jobs.vocabulary import Result
from nightshift.worker import registry

REPO = Path(__file__).resolve().parent.parent
HOSTILE_NAME = "[/bold] [red]x\x1b[2J\u202e"


@pytest.fixture
def model(fake_model) -> str:
    return fake_model


def make_job(store: Store, rows: list[dict], **options) -> str:
    data = io.BytesIO("".join(json.dumps(r) + "\n" for r in rows).encode())
    options.setdefault("model", "fake")
    return submit(store, data, "in.jsonl", JobOptions(**options), registry.reference)[0]


def finish_all(store: Store, job_id: str, responses: list[str | None],
               errors: list[str | None] | None = None) -> None:
    """Store a result for each request, as a worker would."""
    claimed = store.claim(store.chunks(job_id)[0], "w", len(responses))
    now = time.time()
    errors = errors or [None] * len(responses)
    store.finish([Result(c.id, job_id, now - 1, now, first_token_at=now - 0.5, response=r,
                         finish_reason="stop", prompt_tokens=3, completion_tokens=2, error=e)
                  for c, r, e in zip(claimed, responses, errors)], "w")


# -- 1. status and the other commands escape what users wrote --------------------------


def test_status_shows_markup_and_control_characters_as_text(invoke, model):
    store = Store()
    job = make_job(store, [{"prompt": "hi"}], name=HOSTILE_NAME)
    # A worker on another host, whose id, host and model came from elsewhere.
    store.register_worker("evil\x1b[2J:1:1", "evil\x1b[2J", 1, None)
    store.update_worker("evil\x1b[2J:1:1", state="running", model="m\x1b]0;title\x07")
    for args in (["status"], ["status", job]):
        out = invoke(*args).output
        assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out, out
        assert "[/bold] [red]x\\x1b[2J\\u202e" in out
    assert "\\x1b[2J" in invoke("status").output  # the worker's line
    # --json keeps the text as it is (JSON escapes it).
    assert json.loads(invoke("status", "--json").output)["jobs"][0]["name"] == HOSTILE_NAME


def test_models_list_escapes_markup(invoke, model, home):
    (home / "models" / model / "nightshift.json").write_text(
        json.dumps({"source": "gguf:/tmp/[/bold]\x1b[2J.gguf"}))
    out = invoke("models", "list").output
    assert "gguf:/tmp/[/bold]\\x1b[2J.gguf" in out and "\x1b" not in out


def test_echoed_arguments_and_errors_escape_control_characters(invoke, model, tmp_path):
    job = make_job(Store(), [{"prompt": "hi"}])
    out = tmp_path / "a\x1b[2J.jsonl"
    result = invoke("export", job, "-o", out)
    assert "\x1b" not in result.output and "a\\x1b[2J.jsonl" in result.output
    result = invoke("models", "convert", tmp_path / "x\x1b[2J", "--name", "y", expect=1)
    assert "\x1b" not in result.output and "x\\x1b[2J" in result.output


# -- export: counts, CSV cells, the -o file --------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_reports_the_records_it_wrote(invoke, model, tmp_path, fmt):
    from nightshift.jobs.export import export

    store = Store()
    job = make_job(store, [{"prompt": f"q{i}"} for i in range(3)])
    sink = io.BytesIO()
    assert export(store, job, fmt, None, stdout=sink) == 3
    out = tmp_path / f"out.{fmt}"
    assert "wrote 3 records" in invoke("export", job, "--format", fmt, "-o", out).output
    lines = out.read_text().splitlines()
    assert len(lines) == 3 + (fmt == "csv") and sink.getvalue().decode().splitlines() == lines


FORMULAS = ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx", "plain"]


def csv_rows(text: str) -> list[dict]:
    import csv

    return list(csv.DictReader(io.StringIO(text, newline="")))


def test_csv_cells_a_spreadsheet_would_run_are_neutralised(invoke, model):
    store = Store()
    job = make_job(store, [{"prompt": "q", "custom_id": f"={i}", "metadata": {"k": "=1"}}
                           for i in range(len(FORMULAS) + 1)])
    finish_all(store, job, FORMULAS + [None], errors=[None] * len(FORMULAS) + ["-oops"])
    with store.write() as conn:  # a negative number, which must stay a number
        conn.exec_driver_sql("UPDATE requests SET first_token_at = started_at - 1.5 "
                             "WHERE seq = 0")
    rows = csv_rows(invoke("export", job, "--format", "csv").output)
    assert [r["response"] for r in rows] == ["'" + f for f in FORMULAS[:-1]] + ["plain", ""]
    assert rows[0]["custom_id"] == "'=0" and rows[-1]["error"] == "'-oops"
    assert rows[0]["ttft_s"] == "-1.5" and rows[0]["line"] == "1"
    assert json.loads(rows[0]["metadata"]) == {"k": "=1"}
    raw = csv_rows(invoke("export", job, "--format", "csv", "--raw-cells").output)
    assert [r["response"] for r in raw] == FORMULAS + [""] and raw[-1]["error"] == "-oops"
    result = invoke("export", job, "--raw-cells", expect=2)
    assert "--format csv" in result.output


def test_export_into_a_missing_folder_is_a_clear_error(invoke, model, tmp_path):
    job = make_job(Store(), [{"prompt": "q"}])
    out = tmp_path / "missing" / "out.jsonl"
    result = invoke("export", job, "-o", out, expect=1)
    assert f"Error: cannot write {out}: folder {out.parent} does not exist" in result.output
    assert not out.parent.exists()


def test_export_file_gets_the_permissions_of_any_new_file(invoke, model, tmp_path):
    import os
    import stat

    job = make_job(Store(), [{"prompt": "q"}])
    old = os.umask(0o022)
    try:
        invoke("export", job, "-o", tmp_path / "new.jsonl")
        kept = tmp_path / "kept.jsonl"
        kept.write_text("old")
        kept.chmod(0o640)
        invoke("export", job, "-o", kept, "--force")  # as open(path, "w") would keep it
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.jsonl").stat().st_mode) == 0o644
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() != "old"


def test_a_dangling_link_is_not_replaced_without_force(invoke, model, tmp_path):
    job = make_job(Store(), [{"prompt": "q"}])
    target = tmp_path / "elsewhere.jsonl"
    link = tmp_path / "out.jsonl"
    link.symlink_to(target)
    result = invoke("export", job, "-o", link, expect=1)
    assert "exists: pass --force" in result.output
    assert link.is_symlink() and not target.exists()
    invoke("export", job, "-o", link, "--force")  # the link itself is replaced
    assert not link.is_symlink() and not target.exists() and link.read_text()


# -- submit ------------------------------------------------------------------------------


@pytest.mark.parametrize("priority", [10**30, -(2**31) - 1])
def test_a_priority_the_database_cannot_hold_is_a_clear_error(invoke, model, tmp_path,
                                                              priority):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    result = invoke("submit", prompts, "--model", model, "--priority", priority, expect=2)
    assert "--priority" in result.output and "2147483647" in result.output
    assert json.loads(invoke("status", "--json").output)["jobs"] == []
    invoke("submit", prompts, "--model", model, "--priority", 2**31 - 1)


def test_a_model_folder_is_stored_as_an_absolute_path(invoke, model, tmp_path, monkeypatch):
    folder = tmp_path / "work" / "my-model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "work")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    chat = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "./my-model", "messages": [{"role": "user", "content": "hi"}]}}
    from_lines = tmp_path / "batch.jsonl"
    from_lines.write_text(json.dumps(chat) + "\n")
    stored = {}
    for args in (["--model", "./my-model"], ["--model", model], ["--model", "org/name"], []):
        source = prompts if args else from_lines
        job = json.loads(invoke("submit", source, *args, "--json").output)["id"]
        stored[args[-1] if args else "lines"] = Store().job(job).model
    # A worker started in another folder finds it; names and repo ids stay as typed.
    assert stored == {"./my-model": str(folder), model: model, "org/name": "org/name",
                      "lines": str(folder)}


# -- missing optional drivers -------------------------------------------------------------


@pytest.mark.parametrize("module", ["psycopg", "psycopg2"])
def test_a_postgresql_url_without_its_driver_says_which_extra_to_install(invoke, monkeypatch,
                                                                         module):
    monkeypatch.setitem(sys.modules, module, None)  # the import fails, as if not installed
    url = ("postgresql://me:secret@127.0.0.1:1/db" if module == "psycopg"
           else "postgresql+psycopg2://me:secret@127.0.0.1:1/db")
    monkeypatch.setenv("NIGHTSHIFT_DATABASE_URL", url)
    result = invoke("status", expect=1)
    assert "pip install 'nightshift[postgres]'" in result.output
    assert "NIGHTSHIFT_DATABASE_URL" in result.output and "secret" not in result.output


def test_a_redis_url_without_the_package_says_which_extra_to_install(invoke, monkeypatch,
                                                                     model, tmp_path):
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setenv("NIGHTSHIFT_QUEUE_URL", "redis://127.0.0.1:1/0")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    result = invoke("submit", prompts, "--model", model, expect=1)
    assert "pip install 'nightshift[redis]'" in result.output
    assert json.loads(invoke("status", "--json").output)["jobs"] == []  # nothing half-queued


# -- a read-only data directory ----------------------------------------------------------


def _as_reader(home):
    """How to run a command that may not write in ``home``: chmod is enough for a user;
    root ignores it, so it runs without the capabilities that let it."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    try:
        probe = subprocess.run([*prefix, "test", "-w", str(home)], timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("setpriv cannot drop root's file permission override here")
    if probe.returncode == 0:
        pytest.skip("setpriv cannot drop root's file permission override here")
    return prefix


def test_status_and_export_read_a_read_only_home(model, home):
    store = Store()
    job = make_job(store, [{"prompt": "q", "custom_id": "a"}])
    finish_all(store, job, ["=answer"])
    store.close()
    assert sorted(p.name for p in home.iterdir()) == ["models", "nightshift.db"]  # no -wal
    (home / "nightshift.db").chmod(0o444)
    (home / "empty").mkdir(mode=0o555)
    home.chmod(0o555)
    try:
        prefix = _as_reader(home)

        def run(*args):
            return subprocess.run([*prefix, sys.executable, "-m", "nightshift.cli", *args],
                                  cwd=REPO,
                                  capture_output=True, text=True, timeout=60)

        status, detail, exported, empty = (
            run("status"), run("status", job, "--json"), run("export", job, "--format", "csv"),
            run("--home", home / "empty", "status"))
    finally:
        home.chmod(0o755)
    assert status.returncode == 0 and job in status.stdout, status.stderr
    assert json.loads(detail.stdout)["counts"]["done"] == 1, detail.stderr
    assert csv_rows(exported.stdout)[0]["response"] == "'=answer", exported.stderr
    # Nothing to read and nowhere to create it: one line that says so.
    assert empty.returncode == 1 and "Traceback" not in empty.stderr, empty.stderr
    assert f"cannot create the database {home / 'empty' / 'nightshift.db'}" in empty.stderr
