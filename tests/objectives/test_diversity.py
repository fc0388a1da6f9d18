"""DiverseDiT's diversity loss: value equals a direct computation, no gradient when switched off, and
minimising it makes blocks less alike on a toy problem."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lsync_jax.objectives import build_objective
from lsync_jax.objectives.diversity import Diversity, build_diversity
from lsync_jax.transport import create_transport


def direct(hs, weights=(1.0, 1.0, 1.0), cap=5.0):
    hs = [np.asarray(h, np.float64) for h in hs]

    def cos(a, b):
        return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))

    pairs = list(itertools.combinations(range(len(hs)), 2))
    ind = np.mean([cos(hs[i].mean((0, 1)), hs[j].mean((0, 1))) for i, j in pairs])
    cor = np.mean([abs(cos(hs[i], hs[j]).mean()) for i, j in pairs])
    usage = []
    for h in hs:
        flat = h.reshape(-1, h.shape[-1])
        usage.append(np.mean(np.abs(flat / np.linalg.norm(flat, axis=0)), axis=0))
    u = np.mean(usage, axis=0)
    u = u / u.max()
    dis = -np.clip(np.var(u) / 0.25, 0, 1)
    return min((weights[0] * ind + weights[1] * cor + weights[2] * dis) / 3, cap), (ind, cor, dis)


def test_value_equals_a_direct_computation():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 5, 16))
    hs = [base + 0.5 * rng.standard_normal((3, 5, 16)) + 0.3 * b for b in range(4)]
    hs[2] = hs[2] * np.linspace(0.1, 3.0, 16)  # uneven channel usage
    reg = Diversity(blocks=(1, 2, 3, 4), weight=0.01, independence_weight=0.5, dispersion_weight=2.0)
    features = {f"block_{i + 1}": jnp.asarray(h, jnp.float32) for i, h in enumerate(hs)}
    term, metrics = reg(features, {})
    expected, (ind, cor, dis) = direct(hs, (0.5, 1.0, 2.0))
    np.testing.assert_allclose(term, 0.01 * expected, rtol=1e-5)
    np.testing.assert_allclose([metrics["diversity/independence"], metrics["diversity/correlation"],
                                metrics["diversity/dispersion"]], [ind, cor, dis], rtol=1e-5, atol=1e-7)
    assert float(Diversity(blocks=(1, 2), cap=0.0).loss(features)[0]) <= 0.0  # the cap applies
    # a subset of blocks: only those
    sub, _ = Diversity(blocks=(2, 4), weight=1.0)(features, {})
    np.testing.assert_allclose(sub, direct([hs[1], hs[3]])[0], rtol=1e-5)


@pytest.mark.slow
def test_zero_weight_gives_no_gradient_and_the_same_total_gradient():
    from lsync_jax.models import get_model
    from lsync_jax.objectives import objective_loss
    from tests.helpers import perturbed

    model = get_model("SiT-S/4", depth=3, hidden_size=32, num_heads=2, input_size=8, in_channels=1, num_classes=4,
                      learn_sigma=False)
    params = perturbed(model.init(jax.random.key(0), *model.init_inputs(1))["params"], 1, 0.1)
    batch = {"x": jax.random.normal(jax.random.key(1), (4, 8, 8, 1)), "y": jnp.arange(4) % 4}
    transport = create_transport()

    def grads(cfg):
        objective = build_objective(cfg, transport, depth=3)
        return jax.grad(lambda p: objective_loss(p, model.apply, batch, jax.random.key(2), objective)[0])(params)

    off = grads({"regularizers": ()})
    zero = grads({"regularizers": ("diversity",), "diversity": {"weight": 0.0}})
    on = grads({"regularizers": ("diversity",), "diversity": {"weight": 1.0}})
    for a, b in zip(jax.tree.leaves(off), jax.tree.leaves(zero)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(off), jax.tree.leaves(on)))


def test_minimising_it_makes_blocks_less_alike():
    # toy: three "blocks" that start nearly identical; gradient steps on the loss alone
    rng = np.random.default_rng(1)
    base = rng.standard_normal((8, 6, 12)).astype(np.float32) + 1.0
    hs = [jnp.asarray(base + 0.05 * rng.standard_normal(base.shape).astype(np.float32)) for _ in range(3)]
    reg = Diversity(blocks=(1, 2, 3), weight=1.0)

    def loss(hs):
        return reg({f"block_{i + 1}": h for i, h in enumerate(hs)}, {})[0]

    def mean_token_cos(hs):
        pair = Diversity(blocks=(1, 2))
        return np.mean([float(pair.loss({"block_1": hs[i], "block_2": hs[j]})[1]["diversity/correlation"])
                        for i, j in itertools.combinations(range(3), 2)])

    before = mean_token_cos(hs)
    tx = optax.adam(0.05)
    state = tx.init(hs)
    step = jax.jit(lambda hs, state: (lambda g: tx.update(g, state, hs))(jax.grad(loss)(hs)))
    for _ in range(100):
        updates, state = step(hs, state)
        hs = optax.apply_updates(hs, updates)
    after = mean_token_cos(hs)
    assert before > 0.9 and after < 0.3 * before


@pytest.mark.parametrize("cfg, match", [({"blocks": (1,)}, "at least 2"), ({"blocks": (0, 2)}, r"1\.\.4"),
                                        ({"weight": -1.0}, "weight"), ({"alpha": 1}, "diversity.alpha"),
                                        ({"blocks": (2, 2)}, "distinct")])
def test_bad_settings_are_named(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_diversity(cfg, depth=4)
