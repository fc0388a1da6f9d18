"""configs/fashion_mnist_mup.py trains through train_and_evaluate with muP's Adam learning rates: the
checkpointed optimizer state is the muP chain, and hidden matrices take half-size Adam steps."""

import os

import jax
import numpy as np
import pytest

from lsync_jax.builders import build_model
from lsync_jax.configs import fashion_mnist_mup
from lsync_jax.models.mup import mup_lr_multipliers
from lsync_jax.recipes import train_and_evaluate
from lsync_jax.train.checkpoint import Checkpointer
from lsync_jax.train.state import init_state_fn, make_optimizer
from tests.helpers import quick

pytestmark = pytest.mark.slow


def max_change(after, before):
    return {"/".join(k.key for k in path): float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(after)[0], jax.tree.leaves(before))}


def test_fashion_mnist_mup_config_trains_with_mup_learning_rates(tmp_path):
    config = quick(fashion_mnist_mup.get_config())
    config.model.overrides.depth = 2  # LayerSync block 1 <- 2; the width (2 heads over a 1-head base) is kept
    config.optimizer.warmup_steps = 0  # (the demo's warm-up starts at lr 0)
    metrics = train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(metrics["loss/velocity"]) and np.isfinite(metrics["loss/layersync"])

    model = build_model(config)
    assert model.parametrization == "mup" and model.hidden_size == 2 * model.mup_base_width
    tx, _ = make_optimizer(dict(config.optimizer), lr_multipliers=mup_lr_multipliers(model))
    init = init_state_fn(model, tx)
    checkpointer = Checkpointer(os.path.join(str(tmp_path), "checkpoints"), read_only=True)
    # restoring into muP's optimizer state (an extra chain element) works only if the run used it
    state = checkpointer.restore(2, jax.eval_shape(init, jax.random.key(0)))
    checkpointer.close()
    start = jax.jit(init)(jax.random.key(int(config.seed))).params
    change = max_change(state.params, start)
    factors = dict(zip(change, jax.tree.leaves(mup_lr_multipliers(model))))
    lr = config.optimizer.lr
    # An Adam step moves a coordinate by at most about its learning rate: two steps, 2 * lr * factor.
    # Hidden matrices (factor 1/2) therefore stay within one lr, where sp would move them up to 2 lr.
    assert sorted(n for n, f in factors.items() if f != 1.0) == sorted(
        [f"blocks_{i}/{k}/kernel" for i in range(2) for k in ("adaLN_modulation", "attn/proj", "attn/qkv",
                                                              "mlp/fc1", "mlp/fc2")]
        + ["final_layer/adaLN_modulation/kernel", "t_embedder/mlp_2/kernel"])
    for name, f in factors.items():
        assert change[name] <= 2.01 * f * lr, (name, change[name] / lr, f)
    # and they did move, block 1 (LayerSync's weak block, a gradient at both steps) by about that bound
    assert change["blocks_0/attn/qkv/kernel"] > 0.75 * lr
    assert change["x_embedder/kernel"] > 1.5 * lr  # input layers take full lr steps
