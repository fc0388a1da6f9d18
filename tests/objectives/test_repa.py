"""REPA: value against a direct computation, the ERW coefficient schedule, gradients reaching the
projector and the blocks up to the aligned one only, clean inputs, config errors, what REPA needs of the
model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsync_jax.models import get_model
from lsync_jax.objectives import REPA, build_objective, objective_loss, repa_coefficient, repa_loss
from lsync_jax.objectives.repa import encoder_tokens_needed
from lsync_jax.transport import create_transport
from tests.helpers import perturbed


def test_value_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    projected, tokens = rng.standard_normal((2, 3, 5, 16)).astype(np.float32)
    direct = -np.mean(np.sum(projected * tokens, -1)
                      / (np.linalg.norm(projected, axis=-1) * np.linalg.norm(tokens, axis=-1)))
    np.testing.assert_allclose(repa_loss(projected, tokens), direct, rtol=1e-5)
    np.testing.assert_allclose(repa_loss(tokens, tokens), -1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="token counts and widths"):
        repa_loss(projected, tokens[:, :4])
    grad = jax.grad(lambda z: repa_loss(projected, z))(tokens)
    assert not np.any(np.asarray(grad))  # the encoder side is never differentiated


def test_coefficient_is_constant_or_erw_decay():
    assert float(repa_coefficient(0.5, 0.0, jnp.int32(10_000))) == 0.5
    for step, expected in ((0, 6.0), (50_000, 3.0), (100_000, 1.5), (25_000, 6.0 / np.sqrt(2.0))):
        np.testing.assert_allclose(repa_coefficient(6.0, 50_000.0, jnp.int32(step)), expected, rtol=1e-6)
    reg = REPA(weight=6.0, half_life=50_000.0)
    features = {"projection_0": jnp.ones((2, 4, 8))}
    batch = {"encoder_features": jnp.ones((2, 4, 8)), "step": jnp.int32(50_000)}
    term, metrics = reg(features, batch)
    np.testing.assert_allclose(term, -3.0, rtol=1e-6)
    np.testing.assert_allclose(metrics["repa/coefficient"], 3.0, rtol=1e-6)


DEPTH, ALIGNED = 4, 2


@pytest.fixture(scope="module")
def net():
    model = get_model("SiT-S/4", depth=DEPTH, hidden_size=32, num_heads=2, input_size=8, in_channels=1,
                      num_classes=3, learn_sigma=False, z_dims=(16,), encoder_depth=ALIGNED, projector_dim=24)
    params = jax.jit(model.init)(jax.random.key(0), *model.init_inputs(1))["params"]
    params = perturbed(params, 1, 0.1)
    batch = {"x": jax.random.normal(jax.random.key(2), (4, 8, 8, 1)), "y": jnp.array([0, 1, 2, 0]),
             "encoder_features": jax.random.normal(jax.random.key(3), (4, 4, 16))}
    return model, params, batch


def grads_of(net, objective_cfg):
    model, params, batch = net
    objective = build_objective(objective_cfg, create_transport(), depth=DEPTH)
    loss = lambda p: objective_loss(p, model.apply, batch, jax.random.key(4), objective)  # noqa: E731
    (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, metrics, grads


def norm(tree):
    return float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


@pytest.mark.slow
def test_gradients_reach_the_projector_and_blocks_up_to_the_aligned_one_only(net):
    value, metrics, grads = grads_of(net, {"regularizers": ("repa",), "repa": {"weight": 0.5},
                                           "transport_weight": 0.0})
    np.testing.assert_allclose(value, metrics["loss/repa"], rtol=1e-6)
    np.testing.assert_allclose(metrics["loss/repa"], -0.5 * metrics["repa/cos"], rtol=1e-6)
    for name in ("projectors_0", "x_embedder", "t_embedder", "y_embedder", *(f"blocks_{i}" for i in range(ALIGNED))):
        assert norm(grads[name]) > 0, name
    for name in ("final_layer", *(f"blocks_{i}" for i in range(ALIGNED, DEPTH))):
        assert norm(grads[name]) == 0, name
    # with the velocity loss on, later blocks learn from it; REPA adds to blocks <= the aligned one only
    _, _, velocity_only = grads_of(net, {"regularizers": ()})
    _, _, both = grads_of(net, {"regularizers": ("repa",), "repa": {"weight": 0.5}})
    for i in range(DEPTH):
        diff = norm(jax.tree.map(jnp.subtract, both[f"blocks_{i}"], velocity_only[f"blocks_{i}"]))
        assert (diff > 1e-12) == (i < ALIGNED), (i, diff)


def test_clean_input_feeds_the_data_at_t_one(net):
    model, params, batch = net
    objective = build_objective({"regularizers": ("repa",), "repa": {}, "transport_weight": 0.0,
                                 "clean_input": True}, create_transport(), depth=DEPTH)
    _, metrics = objective_loss(params, model.apply, batch, jax.random.key(5), objective)
    _, state = model.apply({"params": params}, batch["x"], jnp.ones(4), batch["y"], mutable=["intermediates"])
    direct = repa_loss(state["intermediates"]["projection_0"][0], batch["encoder_features"])
    np.testing.assert_allclose(metrics["repa/cos"], -direct, rtol=1e-5)
    _, other = objective_loss(params, model.apply, batch, jax.random.key(6), objective)  # no noise, no t draw
    np.testing.assert_allclose(other["repa/cos"], metrics["repa/cos"], rtol=1e-6)


@pytest.mark.parametrize("cfg, match", [
    ({"regularizers": ("repa",), "repa": {"weight": -1.0}}, "weight must be a positive"),
    ({"regularizers": ("repa",), "repa": {"half_life": -5.0}}, "half_life"),
    ({"regularizers": ("repa",), "repa": {"encoder_paht": "x"}}, "objective.repa.encoder_paht"),
    ({"regularizers": (), "transport_weight": 0.0}, "nothing to train"),
])
def test_bad_settings_name_the_key(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_objective(cfg, create_transport(), depth=DEPTH)


def test_encoder_tokens_needed_names_what_repa_needs_of_the_model():
    small = dict(depth=2, hidden_size=32, num_heads=2, input_size=8, num_classes=4)
    assert encoder_tokens_needed(get_model("SiT-S/2", z_dims=(16, 8), encoder_depth=1, **small), 1, "m") == (16, 8)
    with pytest.raises(ValueError, match="REPA needs the model's projector: set config.model.overrides.z_dims"):
        encoder_tokens_needed(get_model("SiT-S/2", **small), 0, "m")
    with pytest.raises(ValueError, match="objective.repa.projector=1 is not one of them"):
        encoder_tokens_needed(get_model("SiT-S/2", z_dims=(16,), encoder_depth=1, **small), 1, "m")
    with pytest.raises(ValueError, match="the model SiT-Seq-S/2 takes sequence data"):
        encoder_tokens_needed(get_model("SiT-Seq-S/2", z_dims=(16,), encoder_depth=1, **small), 0, "SiT-Seq-S/2")
