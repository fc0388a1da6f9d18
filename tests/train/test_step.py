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
