"""The composed objective: velocity loss + registered regularisers, config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsync_jax.builders import build_model
from lsync_jax.configs import tiny
from lsync_jax.objectives import REGULARIZERS, Objective, build_objective, objective_loss
from lsync_jax.objectives.layersync import LayerSync, layersync_loss
from lsync_jax.transport import create_transport
from tests.helpers import perturbed


@pytest.fixture(scope="module")
def setup():
    config = tiny.get_config()
    model = build_model(config)
    transport = create_transport(**config.transport)
    params = jax.jit(model.init)(jax.random.key(0), *model.init_inputs(1))["params"]
    params = perturbed(params, 0)
    batch = {"x": jax.random.normal(jax.random.key(1), (8, 28, 28, 1)), "y": jnp.arange(8) % 10}
    return config, model, transport, params, batch


def test_tiny_config_builds_the_paper_pair_scaled_to_depth(setup):
    _, model, transport, _, _ = setup
    config = tiny.get_config()
    objective = build_objective(config.objective, transport, depth=model.depth)
    assert objective.regularizers == (LayerSync(((1, 2, 0.2),), stop_gradient=True),)
    assert objective.features_needed == ("block_1", "block_2")
    config.objective.layersync.auto_weight = 0.5
    config.objective.layersync.stop_gradient = False
    objective = build_objective(config.objective, transport, depth=model.depth)
    assert objective.regularizers == (LayerSync(((1, 2, 0.5),), stop_gradient=False),)
    config.objective.layersync.pairs = ((1, 3, 0.2), (2, 4, 0.1))  # as --config.objective.layersync.pairs=...
    objective = build_objective(config.objective, transport, depth=model.depth)
    assert objective.regularizers[0].pairs == ((1, 3, 0.2), (2, 4, 0.1))


@pytest.mark.slow
def test_total_is_velocity_plus_weighted_terms(setup):
    _, model, transport, params, batch = setup
    objective = Objective(transport, (LayerSync(((1, 3, 0.2), (2, 4, 0.1))),))
    key = jax.random.key(5)
    loss, metrics = jax.jit(lambda p: objective_loss(p, model.apply, batch, key, objective))(params)
    expected = (metrics["loss/velocity"] + 0.2 * metrics["layersync/block1_block3"]
                + 0.1 * metrics["layersync/block2_block4"])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], loss)
    np.testing.assert_allclose(metrics["loss/layersync"], loss - metrics["loss/velocity"], rtol=1e-5, atol=1e-7)

    # Recompute by hand with the same draws (one key per example, folded in from its index): the
    # velocity term is the transport MSE at those (t, x0), with those examples' labels dropped.
    key_examples, key_model = jax.random.split(key)
    key_examples = jax.random.wrap_key_data(jax.random.bits(key_examples, (2,), jnp.uint32), impl="threefry2x32")
    n = batch["x"].shape[0]
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key_examples, i)))(jnp.arange(n))
    t, x0, xt, ut = transport.prepare_examples(keys[:, 0], batch["x"])  # (transport, dropout) keys
    drop_draws = jax.vmap(jax.random.uniform)(keys[:, 1])
    out, state = model.apply({"params": params}, xt, t, batch["y"], train=True, rngs={"dropout": key_model},
                             drop_draws=drop_draws, mutable=["intermediates"])
    np.testing.assert_allclose(metrics["loss/velocity"], jnp.mean((out - ut) ** 2), rtol=1e-5)
    f = state["intermediates"]
    np.testing.assert_allclose(metrics["layersync/block1_block3"],
                               layersync_loss(f["block_1"][0], f["block_3"][0]), rtol=1e-5)


def test_no_regularisers_is_the_plain_transport_loss(setup):
    _, model, transport, params, batch = setup
    key = jax.random.key(5)
    plain, m = jax.jit(lambda p: objective_loss(p, model.apply, batch, key, Objective(transport)))(params)
    with_ls, m2 = jax.jit(lambda p: objective_loss(p, model.apply, batch, key,
                                                   Objective(transport, (LayerSync(((1, 2, 0.2),)),))))(params)
    assert set(m) == {"loss", "loss/velocity"}
    np.testing.assert_allclose(plain, m2["loss/velocity"], rtol=1e-6)
    assert float(with_ls) != float(plain)


@pytest.mark.slow
def test_objective_gradient_is_finite_and_reaches_every_block(setup):
    config, model, transport, params, batch = setup
    objective = build_objective(config.objective, transport, depth=model.depth)
    grads, _ = jax.jit(jax.grad(lambda p: objective_loss(p, model.apply, batch, jax.random.key(0), objective),
                                has_aux=True))(params)
    for i in range(model.depth):
        g = grads[f"blocks_{i}"]
        assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(g))
        assert sum(float(jnp.abs(l).sum()) for l in jax.tree.leaves(g)) > 0


def test_bad_objective_configs_raise_naming_the_key():
    transport = create_transport()
    with pytest.raises(ValueError, match="objective.regularizers: unknown regulariser 'diversedit'"):
        build_objective({"regularizers": ("diversedit",)}, transport, depth=4)
    with pytest.raises(ValueError, match="objective.layersync.strength"):
        build_objective({"regularizers": ("layersync",), "layersync": {"strength": 1.0}}, transport, depth=4)
    with pytest.raises(ValueError, match="objective.lossweights"):
        build_objective({"regularizers": (), "lossweights": 1.0}, transport, depth=4)
    # the tiny config with an out-of-range override fails at build time, before any tracing
    config = tiny.get_config()
    config.objective.layersync.pairs = ((3, 9, 0.2),)
    with pytest.raises(ValueError, match=r"objective.layersync.pairs\[0\]: strong block 9 is outside 1..4"):
        build_objective(config.objective, transport, depth=config.model.overrides.depth)


def test_layersync_is_registered():
    assert "layersync" in REGULARIZERS
