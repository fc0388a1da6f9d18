"""U-ViT configs through the whole training system: every variant builds, the LS one trains."""

import os

import jax
import numpy as np
import pytest

from lsync_jax.builders import build_model, validate_config
from lsync_jax.configs import fashion_mnist_uvit, imagenet256_uvit
from lsync_jax.models import UViT
from lsync_jax.recipes import train_and_evaluate
from lsync_jax.train.checkpoint import Checkpointer
from tests.helpers import quick


def test_every_uvit_config_builds_its_model():
    for variant in fashion_mnist_uvit.VARIANTS:
        config = fashion_mnist_uvit.get_config(variant)
        validate_config(config)
        model = build_model(config)
        assert isinstance(model, UViT) and model.skip_scaling == variant and model.depth == 7
        params = jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs(1))["params"]
        assert ("skip_calibration" in params) == (variant == "ls")
    for variant in imagenet256_uvit.VARIANTS:
        config = imagenet256_uvit.get_config(variant)
        validate_config(config)
        model = build_model(config)
        assert (model.depth, model.hidden_size, model.patch_size, model.skip_scaling) == (29, 1152, 2, variant)
        assert not model.final_conv and not model.mlp_time_embed and model.remat
    with pytest.raises(ValueError, match=":none, :constant, :cs, :ls"):
        fashion_mnist_uvit.get_config("scalelong")


@pytest.mark.slow
def test_fashion_mnist_uvit_trains_with_layersync(tmp_path):
    """':ls' end to end (its calibration nets are the only extra parameters; the other variants
    differ by a constant factor, checked in tests/models/test_uvit.py): ~30 s of CPU compiles."""
    config = quick(fashion_mnist_uvit.get_config("ls"))
    config.train.num_grid_samples = 4  # U-ViT through the sampler too
    metrics = train_and_evaluate(config, str(tmp_path))
    for key in ("loss", "loss/velocity", "loss/layersync"):
        assert np.isfinite(metrics[key]), key
    assert os.listdir(tmp_path / "checkpoints") == ["2"]
    assert os.listdir(tmp_path / "samples") == ["step_0000002.png"]
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
    meta = checkpointer.read_meta(2)
    checkpointer.close()
    assert meta["model"]["name"] == "UViT-S/4" and meta["model"]["skip_scaling"] == "ls"
    assert any(k.startswith("skip_calibration") for k in meta["param_shapes"])
