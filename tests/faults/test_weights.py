"""Issue 17, siblings of row 8: damaged weight files are named, not reported as bare zip/JSON errors."""

import pytest

from lsync_jax.porting import inception as weights
from lsync_jax.porting.vae import read_state_file
from lsync_jax.storage import read_json


def test_damaged_inception_weights_are_named(tmp_path):
    path = tmp_path / "inception.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip file")
    with pytest.raises(ValueError, match=f"Inception weights {path} are damaged"):
        weights.load_weights(str(path))


def test_a_damaged_json_file_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 768,')
    with pytest.raises(ValueError, match=f"the DINOv2 config {path} is damaged"):
        read_json(str(path), "the DINOv2 config")


def test_a_damaged_safetensors_file_is_named(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{truncated")
    with pytest.raises(ValueError, match=f"weights file {path} is damaged"):
        read_state_file(str(path))
