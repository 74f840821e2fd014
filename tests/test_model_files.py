"""worker/model_files.py: one reader for config.json and safetensors headers, one way to fail."""

from __future__ import annotations

import json
import struct

import pytest
from nightshift.jobs.errors import ModelError
from nightshift.worker import model_files


@pytest.mark.parametrize("text, says", [
    (None, "config.json cannot be read"),
    ("{broken", "config.json is not readable JSON"),
    ("[1, 2]", "config.json is not readable JSON (it holds a list, not an object)"),
])
def test_a_bad_config_names_the_file_and_what_is_wrong(tmp_path, text, says):
    if text is not None:
        (tmp_path / "config.json").write_text(text)
    with pytest.raises(ModelError, match="pull or import it again") as caught:
        model_files.read_config(tmp_path)
    assert str(tmp_path / "config.json") in str(caught.value)
    assert says in str(caught.value)


def test_headers_are_read_without_the_data(tmp_path):
    header = {"__metadata__": {"format": "mlx"},
              "w": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]}}
    blob = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(12))
    assert model_files.tensor_headers(tmp_path) == {
        "w": {"dtype": "F16", "shape": [2, 3], "nbytes": 12}}


def test_a_folder_without_weights_says_so(tmp_path):
    with pytest.raises(ModelError, match="no .safetensors weights"):
        model_files.tensor_headers(tmp_path)


def test_a_header_longer_than_its_file_is_refused_before_reading(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ModelError, match="claims 1000000000000 bytes"):
        model_files.tensor_headers(tmp_path)


def test_parameters_unpack_quantized_weights_per_layer_bits():
    tensors = {
        "emb.weight": {"dtype": "U32", "shape": [10, 4], "nbytes": 160},
        "emb.scales": {"dtype": "F16", "shape": [10, 1], "nbytes": 20},
        "emb.biases": {"dtype": "F16", "shape": [10, 1], "nbytes": 20},
        "head.weight": {"dtype": "U32", "shape": [10, 4], "nbytes": 160},
        "head.scales": {"dtype": "F16", "shape": [10, 1], "nbytes": 20},
        "norm.weight": {"dtype": "F32", "shape": [32], "nbytes": 128},
    }
    config = {"quantization": {"bits": 4, "group_size": 32, "emb": {"bits": 8}}}
    assert model_files.quantized_layers(tensors) == {"emb", "head"}
    assert model_files.parameter_counts(tensors, config) == {
        "emb.weight": 10 * 4 * 4, "head.weight": 10 * 4 * 8, "norm.weight": 32}
