"""The command line, through Click's runner, on a real database and queue."""

from __future__ import annotations

import json

import pytest


def write(path, *objs, raw=None):
    path.write_text(raw if raw is not None else "".join(json.dumps(o) + "\n" for o in objs))
    return path


@pytest.fixture
def prompts(tmp_path):
    return write(tmp_path / "p.jsonl", *[{"custom_id": f"c{i}", "prompt": f"question {i}",
                                          "metadata": {"i": i}} for i in range(3)])


def test_version_and_help(invoke):
    assert "nightshift" in invoke("--version").output
    out = invoke("-h").output
    for command in ("submit", "worker", "status", "cancel", "retry", "export", "models"):
        assert command in out


def test_submit_json_status_and_export_before_any_worker(invoke, prompts, tiny_model, home):
    out = invoke("submit", prompts, "--model", tiny_model, "--name", "night", "--json").output
    job = json.loads(out)
    assert job["requests"] == 3 and job["queue_tasks"] == 1
    status = json.loads(invoke("status", "--json").output)
    assert status["workers"] == []
    assert status["waiting"] == {"tiny": 3}
    assert "NO WORKER IS RUNNING: 3 requests are waiting" in status["notes"][0]
    assert status["jobs"][0]["id"] == job["id"] and status["jobs"][0]["state"] == "queued"
    text = invoke("status").output
    assert "NO WORKER IS RUNNING" in text and job["id"] in text and "0/3" in text
    detail = json.loads(invoke("status", job["id"], "--json").output)
    assert detail["counts"]["queued"] == 3 and detail["name"] == "night"
    lines = [json.loads(x) for x in invoke("export", job["id"]).output.splitlines()]
    assert [x["custom_id"] for x in lines] == ["c0", "c1", "c2"]
    assert lines[0]["response"] is None and lines[0]["error"]["code"] == "not_finished"
    assert lines[1]["nightshift"]["metadata"] == {"i": 1}
    assert (home / "queue.db").exists()


def test_submit_reports_every_bad_line_and_queues_nothing(invoke, tmp_path, tiny_model):
    bad = write(tmp_path / "bad.jsonl", raw='{"prompt": "ok"}\nnot json\n{"prompt": 5}\n')
    result = invoke("submit", bad, "--model", tiny_model, expect=1)
    assert f"{bad}:2: " in result.output and f"{bad}:3: " in result.output
    assert "nothing was queued" in result.output
    assert "Traceback" not in result.output
    assert json.loads(invoke("status", "--json").output)["jobs"] == []


def test_submit_from_stdin(invoke, tiny_model):
    out = invoke("submit", "-", "--model", tiny_model, "--json", input='{"prompt": "hi"}\n').output
    assert json.loads(out)["requests"] == 1


def test_unknown_model_and_bad_flags_are_clear(invoke, prompts):
    result = invoke("submit", prompts, "--model", "nope", expect=1)
    assert "unknown model 'nope'" in result.output and "models pull smollm2" in result.output
    result = invoke("submit", prompts, "--temperature", "9", expect=1)
    assert "temperature" in result.output and "0 to 2" in result.output
    result = invoke("submit", prompts, "--at", "someday", expect=2)
    assert "02:00" in result.output


def test_cancel_then_retry(invoke, prompts, tiny_model):
    job = json.loads(invoke("submit", prompts, "-m", tiny_model, "--json").output)["id"]
    assert "cancelled 3" in invoke("cancel", job).output
    assert json.loads(invoke("status", job, "--json").output)["state"] == "cancelled"
    assert json.loads(invoke("retry", job, "--json").output)["requeued"] == 0


def test_unknown_job_is_a_clear_error(invoke):
    result = invoke("status", "nope", expect=1)
    assert "no job 'nope'" in result.output and "Traceback" not in result.output


def test_export_to_file_never_overwrites_without_force(invoke, prompts, tiny_model, tmp_path):
    job = json.loads(invoke("submit", prompts, "-m", tiny_model, "--json").output)["id"]
    out = tmp_path / "out.csv"
    invoke("export", job, "--format", "csv", "-o", out)
    assert out.read_text().splitlines()[0].startswith("line,custom_id,status")
    assert len(out.read_text().splitlines()) == 4
    out.write_text("precious")
    result = invoke("export", job, "-o", out, expect=1)
    assert "--force" in result.output and out.read_text() == "precious"
    invoke("export", job, "-o", out, "--force")
    assert len(out.read_text().splitlines()) == 3


def test_models_list(invoke, tiny_model):
    listed = json.loads(invoke("models", "list", "--json").output)
    assert [m["name"] for m in listed] == ["tiny"]
    assert "tiny" in invoke("models", "list").output
