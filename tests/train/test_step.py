"""The train step: it learns, EMA and step bookkeeping, optimizer config, sharded init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsync_jax.models import get_model
from lsync_jax.objectives import LayerSync, Objective
from lsync_jax.sharding import make_mesh
from lsync_jax.train import create_train_state, make_optimizer, make_train_step
from lsync_jax.transport import create_transport


def tiny():
    return get_model("SiT-S/4", depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=1,
                     num_classes=2, learn_sigma=False)


def data(n=16):
    """Two classes: a bright top half or a bright bottom half."""
    y = np.arange(n) % 2
    top = np.repeat((np.arange(8) < 4)[:, None], 8, axis=1)  # (8, 8): rows 0..3
    x = np.where(y[:, None, None] == 0, top, ~top) * 2.0 - 1.0
    return {"x": jnp.asarray(x[..., None], jnp.float32), "y": jnp.asarray(y, jnp.int32)}


@pytest.mark.slow
def test_steps_reduce_the_loss_and_update_ema_and_step():
    model, mesh = tiny(), make_mesh()
    tx, schedule = make_optimizer({"lr": 3e-3})
    objective = Objective(create_transport(), (LayerSync(((1, 2, 0.2),)),))
    state = create_train_state(model, tx, jax.random.key(0), mesh)
    params0 = jax.tree.map(np.asarray, state.params)
    step = make_train_step(model, objective, tx, schedule, mesh, ema_decay=0.9)
    batch = data()
    losses = []
    for _ in range(40):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss/velocity"]))
    assert int(state.step) == 40
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert set(metrics) >= {"loss", "loss/velocity", "loss/layersync", "grad_norm", "learning_rate"}
    np.testing.assert_allclose(metrics["learning_rate"], 3e-3)
    # EMA: lies between the start and the current weights, closer to the current ones after 40 steps
    for e, p, p0 in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params), jax.tree.leaves(params0)):
        assert np.linalg.norm(np.asarray(e) - np.asarray(p)) <= np.linalg.norm(np.asarray(p0) - np.asarray(p)) + 1e-7


@pytest.mark.slow
def test_ema_is_the_exponential_average_of_the_parameters():
    model, mesh = tiny(), make_mesh()
    tx, schedule = make_optimizer({"lr": 1e-2})
    state = create_train_state(model, tx, jax.random.key(0), mesh)
    step = make_train_step(model, Objective(create_transport()), tx, schedule, mesh, ema_decay=0.5)
    ema = jax.tree.map(np.asarray, state.params)
    for _ in range(3):
        state, _ = step(state, data())
        ema = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * np.asarray(p), ema, state.params)
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(state.ema_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_optimizer_config_errors_and_warmup():
    with pytest.raises(ValueError, match="optimizer.learning_rate"):
        make_optimizer({"learning_rate": 1e-4})
    with pytest.raises(ValueError, match="optimizer.grad_clip"):
        make_optimizer({"grad_clip": 0.0})
    _, schedule = make_optimizer({"lr": 1e-4, "warmup_steps": 10})
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-5, rel=1e-6) and float(schedule(50)) == pytest.approx(1e-4, rel=1e-6)
    with pytest.raises(ValueError, match="ema_decay"):
        make_train_step(tiny(), Objective(create_transport()), *make_optimizer({}), make_mesh(), ema_decay=1.0)


def _accumulation_case(microbatches, objective, model, batch, mu_dtype=None):
    mesh = make_mesh()
    tx, schedule = make_optimizer({"lr": 1e-2, "mu_dtype": mu_dtype})
    state = create_train_state(model, tx, jax.random.key(0), mesh)
    step = make_train_step(model, objective, tx, schedule, mesh, ema_decay=0.5, microbatches=microbatches,
                           batch_size=batch["x"].shape[0])
    for _ in range(2):
        state, metrics = step(state, batch)
    return state, metrics


@pytest.mark.slow
@pytest.mark.parametrize("microbatches", [2, 4])
def test_microbatches_give_the_update_of_the_whole_batch(microbatches):
    """k microbatches draw the whole batch's t, noise and label dropout (per example) and average to the
    whole batch's gradient: the same parameters, EMA (updated once a step) and metrics, LayerSync and
    REPA included."""
    from lsync_jax.objectives import REPA

    model = get_model("SiT-S/4", depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=1,
                      num_classes=2, learn_sigma=False, z_dims=(6,), encoder_depth=1, projector_dim=16,
                      class_dropout_prob=0.5)
    objective = Objective(create_transport(), (LayerSync(((1, 2, 0.2),)), REPA(weight=0.5)))
    batch = dict(data(), encoder_features=jax.random.normal(jax.random.key(3), (16, 4, 6)))
    from lsync_jax.train.step import accumulated_grads

    whole, m1 = _accumulation_case(1, objective, model, batch)
    parts, mk = _accumulation_case(microbatches, objective, model, batch)
    assert int(parts.step) == 2
    # Adam divides by the gradients' scale: a parameter whose gradient is ~0 moves by rounding noise,
    # so the states agree to a fraction of one step (lr 1e-2), the gradients to float32 rounding.
    for a, b in zip(jax.tree.leaves((whole.params, whole.ema_params)), jax.tree.leaves((parts.params,
                                                                                       parts.ema_params))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5)
    grads = [accumulated_grads(whole.params, batch, jax.random.key(9), whole.step, apply_fn=model.apply,
                               objective=objective, microbatches=k)[0] for k in (1, microbatches)]
    for a, b in zip(*map(jax.tree.leaves, grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * max(float(jnp.max(jnp.abs(a))), 1e-3))
    assert set(m1) == set(mk)
    for key in m1:
        np.testing.assert_allclose(m1[key], mk[key], rtol=2e-5, atol=1e-6, err_msg=key)


def test_microbatches_that_do_not_split_the_batch_or_a_batch_wide_term_are_refused():
    from lsync_jax.objectives import build_objective
    from lsync_jax.train.step import microbatch_problem

    assert microbatch_problem(16, 4, 2) == ""
    assert "multiple of microbatches x devices = 3 x 2" in microbatch_problem(16, 3, 2)
    assert "integer >= 1" in microbatch_problem(16, 0, 1)
    diverse = build_objective({"regularizers": ("diversity",), "diversity": {"blocks": (1, 2)}}, create_transport(),
                              depth=2)
    assert "diversity" in microbatch_problem(16, 2, 1, diverse) and microbatch_problem(16, 1, 1, diverse) == ""


def test_bfloat16_first_moments():
    model = tiny()
    tx, _ = make_optimizer({"lr": 1e-3, "mu_dtype": "bfloat16"})
    state = create_train_state(model, tx, jax.random.key(0), make_mesh())
    mu = state.opt_state[0].mu
    assert {a.dtype for a in jax.tree.leaves(mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {a.dtype for a in jax.tree.leaves(state.opt_state[0].nu)} == {jnp.dtype(jnp.float32)}
    with pytest.raises(ValueError, match="optimizer.mu_dtype='int8'"):
        make_optimizer({"lr": 1e-3, "mu_dtype": "int8"})
