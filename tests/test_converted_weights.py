"""The default model's float32 weights, kept after the first conversion and read back.

The real model loaded in this process, as the worker loads it (bfloat16 here, without
OpenBLAS; the same code keeps float32 in a worker, which the benchmark's C runs): the
kept file gives the same parameters bit for bit; a damaged or foreign file is converted
again (and replaced); ``NIGHTSHIFT_KEEP_WEIGHTS=0`` keeps nothing.
"""

from __future__ import annotations

import logging
import os

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from nightshift.worker import converted_weights, loader

pytestmark = pytest.mark.slow


def load_params(caplog) -> tuple[dict, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nightshift.weights"):
        loaded = loader.load("smollm2", loader.LoadOptions(batch_size=4))
    # float32 where OpenBLAS is preloaded (a worker), bfloat16 in this process.
    assert loaded.plan.weights in ("float32", "bfloat16")
    params = dict(tree_flatten(loaded.model.parameters()))
    assert {v.dtype for v in params.values()} == {getattr(mx, loaded.plan.weights)}
    return params, caplog.text


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item() for k in a)


def test_kept_weights_load_as_converted_and_damage_is_converted_again(
        smollm2, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(converted_weights.KEEP_ENV, str(tmp_path / "kept"))
    first, said = load_params(caplog)
    files = list((tmp_path / "kept").glob("*.safetensors"))
    assert len(files) == 1 and "kept in" in said, said

    again, said = load_params(caplog)
    assert "read from" in said, said
    assert same(first, again)

    files[0].write_bytes(files[0].read_bytes()[: files[0].stat().st_size // 2])  # cut short
    repaired, said = load_params(caplog)
    assert "cannot read the kept weights" in said and "kept in" in said, said
    assert same(first, repaired)

    # A file of the right name that holds another model's weights.
    mx.save_safetensors(str(files[0]), {"model.norm.weight": mx.ones((3,))})
    refitted, said = load_params(caplog)
    assert "do not fit the model" in said, said
    assert same(first, refitted)
    assert same(first, load_params(caplog)[0])  # and the file written then reads back


def test_a_write_that_fails_loses_nothing_and_spares_other_writers(
        smollm2, tmp_path, monkeypatch, caplog):
    """Two worker processes that load side by side both convert and write: one's clean-up
    once deleted the other's file in the making, and that load failed, failing a whole
    job (the benchmark's C, 64 requests)."""
    kept = tmp_path / "kept"
    monkeypatch.setenv(converted_weights.KEEP_ENV, str(kept))
    first, _ = load_params(caplog)
    [path] = kept.glob("*.safetensors")
    path.unlink()
    writing = converted_weights.temporary(path, os.getppid())  # a live process's
    writing.write_bytes(b"half written")
    killed = converted_weights.temporary(path, 2**22 + 1)  # above Linux's largest pid
    killed.write_bytes(b"left behind")

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    again, said = load_params(caplog)
    assert same(first, again)
    assert "not kept" in said and "No space left" in said, said
    assert writing.exists() and not killed.exists()
    assert not path.exists() and len(list(kept.iterdir())) == 1


def test_nothing_is_kept_when_switched_off(smollm2, home, monkeypatch, caplog):
    monkeypatch.setenv(converted_weights.KEEP_ENV, "0")
    _, said = load_params(caplog)
    assert "kept" not in said and "read from" not in said, said
    assert not list(home.rglob("*.safetensors")) or all(
        "models" in p.parts for p in home.rglob("*.safetensors"))
