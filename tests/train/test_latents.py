"""Training on preprocessed latents: a few steps from the shards, sample grids and ADM batches decoded by
the VAE, and latent data that does not fit the config failing before anything compiles."""

import os

import numpy as np
import pytest
from PIL import Image

from lsync_jax.configs import imagenet256, tiny
from lsync_jax.eval.sampling import sample_from_workdir
from lsync_jax.recipes import train_and_evaluate


def latent_config(latent_dir, **data):
    """The tiny SiT on 8x8x4 latents of 32 px crops (3 classes)."""
    config = tiny.get_config()
    config.model.overrides.update(dict(input_size=8, in_channels=4, num_classes=3))
    config.model.name = "SiT-S/2"
    config.data.update(dict(name="imagenet_latents", dir=latent_dir, image_size=32, batch_size=6, flip=True, **data))
    config.train.update(dict(num_steps=3, checkpoint_every=3, log_every=1, num_grid_samples=6))
    config.sampler.num_steps = 4
    return config


@pytest.mark.slow
def test_a_few_steps_on_latents_then_decoded_samples(tiny_latents, tmp_path):
    _, latent_dir, _, _ = tiny_latents
    metrics = train_and_evaluate(latent_config(latent_dir), str(tmp_path))
    assert np.isfinite(metrics["loss"]) and metrics["loss/layersync"] != 0.0
    assert os.listdir(tmp_path / "checkpoints") == ["3"]
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_0000003.png"))
    assert grid.shape[-1] == 3 and grid.shape[0] == 32 + 4  # one row of decoded 32 px RGB images
    out = sample_from_workdir(latent_config(latent_dir), str(tmp_path), str(tmp_path / "adm"), num_samples=5,
                              batch_size=3)
    batch = np.load(out["npz"])
    assert batch["arr_0"].shape == (5, 32, 32, 3) and batch["arr_0"].dtype == np.uint8
    assert batch["arr_0"].std() > 0 and set(batch["arr_1"]) <= {0, 1, 2}


@pytest.mark.parametrize("change, error, match", [
    (dict(image_size=64), ValueError, "image_size=64 but the latents .* 32 px"),
    (dict(dir="/nonexistent/latents"), FileNotFoundError, "launch/preprocess.py"),
    ("input_size", ValueError, "8x8 latents but config.model.overrides.input_size=16"),
    ("vae", FileNotFoundError, "SD-VAE weights"),
    ("fid", ValueError, "FID on latent data needs an ADM reference batch"),
])
def test_mismatched_latents_fail_before_compiling(tiny_latents, tmp_path, change, error, match):
    _, latent_dir, _, _ = tiny_latents
    config = latent_config(latent_dir)
    if change == "input_size":
        config.model.overrides.input_size = 16
    elif change == "vae":
        config.vae.path = str(tmp_path / "no-vae")
    elif change == "fid":
        config.eval.every = 1
    else:
        config.data.update(change)
    with pytest.raises(error, match=match):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_paper_configs_name_the_missing_data(tmp_path):
    config = imagenet256.get_config()
    with pytest.raises(FileNotFoundError, match="config.data.dir"):
        train_and_evaluate(config, str(tmp_path))
