"""A few training steps of the DiverseDiT and DDAE++ self-conditioning Fashion-MNIST configs: every loss
term is logged and finite, and the checkpoint holds the extra modules."""

import json
import os

import numpy as np
import pytest

from lsync_jax.configs import fashion_mnist_diversedit, fashion_mnist_selfcond
from lsync_jax.recipes import train_and_evaluate
from tests.helpers import quick

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("module, terms, params", [
    (fashion_mnist_diversedit, {"loss/layersync", "loss/diversity", "diversity/dispersion"}, "long_skips_5/"),
    (fashion_mnist_selfcond, {"loss/layersync"}, "self_condition/fc_1/kernel"),
])
def test_method_config_trains(tmp_path, module, terms, params):
    metrics = train_and_evaluate(quick(module.get_config()), str(tmp_path))
    assert terms <= set(metrics) and all(np.isfinite(metrics[k]) for k in terms | {"loss"})
    with open(tmp_path / "checkpoints" / "2" / "meta" / "metadata") as f:
        shapes = json.load(f)["param_shapes"]
    assert any(name.startswith(params) for name in shapes)
    assert os.listdir(tmp_path / "checkpoints") == ["2"]
    assert not os.path.exists(tmp_path / "samples")  # num_grid_samples=0: no grids
