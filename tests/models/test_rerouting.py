"""DiverseDiT's long residuals and DDAE++ self-conditioning in SiT: the fused value is LN + Linear of
[x ; mirror], the self-conditioned model equals the baseline at init and conditions only later blocks,
stop-gradient detaches, and the overhead for SiT-B/2 (computed, not timed) is under 2%."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsync_jax.models import get_model
from lsync_jax.models.rerouting import SelfCondition
from lsync_jax.tools.benchmark import hlo_flops
from tests.helpers import perturbed

SMALL = dict(hidden_size=32, num_heads=2, input_size=8, in_channels=1, num_classes=4, learn_sigma=False)


def inputs(n=3, seed=0):
    x = jax.random.normal(jax.random.key(seed), (n, 8, 8, 1))
    return x, jnp.linspace(0.1, 0.9, n), jnp.arange(n) % 4


@pytest.mark.parametrize("depth, fused", [(6, (3, 4, 5)), (7, (4, 5, 6))])
@pytest.mark.slow
def test_long_skips_fuse_each_late_block_with_its_mirror(depth, fused):
    model = get_model("SiT-S/4", depth=depth, long_skips=True, **SMALL)
    params = perturbed(model.init(jax.random.key(0), *model.init_inputs(1))["params"], 1, 0.1)
    assert sorted(k for k in params if k.startswith("long_skips")) == [f"long_skips_{i}" for i in fused]
    (_, state) = model.apply({"params": params}, *inputs(), mutable=["intermediates"], capture_intermediates=True)
    sown = {k: np.asarray(v[0], np.float64) for k, v in state["intermediates"].items() if k.startswith("block_")}
    for i in fused:
        raw = np.asarray(state["intermediates"][f"blocks_{i}"]["__call__"][0], np.float64)  # before fusion
        joined = np.concatenate([raw, sown[f"block_{depth - i}"]], axis=-1)  # the mirror block, 1-indexed
        ln = params[f"long_skips_{i}"]["norm"]
        normed = (joined - joined.mean(-1, keepdims=True)) / np.sqrt(joined.var(-1, keepdims=True) + 1e-6)
        normed = normed * np.asarray(ln["scale"]) + np.asarray(ln["bias"])
        linear = params[f"long_skips_{i}"]["linear"]
        expected = normed @ np.asarray(linear["kernel"]) + np.asarray(linear["bias"])
        np.testing.assert_allclose(sown[f"block_{i + 1}"], expected, rtol=2e-4, atol=2e-5)
    if depth % 2:  # the middle block of an odd depth has no partner: its output is sown unchanged
        mid = depth // 2
        np.testing.assert_array_equal(sown[f"block_{mid + 1}"], state["intermediates"][f"blocks_{mid}"]["__call__"][0])


def test_self_condition_starts_as_the_baseline_and_conditions_only_later_blocks():
    base = get_model("SiT-S/4", depth=5, **SMALL)
    model = get_model("SiT-S/4", depth=5, self_condition=2, **SMALL)
    params = model.init(jax.random.key(0), *model.init_inputs(1))["params"]
    base_params = {k: v for k, v in params.items() if k != "self_condition"}
    base_params = perturbed(base_params, 1, 0.1)
    params = dict(params, **base_params)
    out, state = model.apply({"params": params}, *inputs(), mutable=["intermediates"])
    ref, ref_state = base.apply({"params": base_params}, *inputs(), mutable=["intermediates"])
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)  # the last Linear is zero at init
    # once that Linear is trained, blocks 3..5 change and blocks 1, 2 do not
    params["self_condition"] = perturbed(params["self_condition"], 2, 0.5)
    _, state = model.apply({"params": params}, *inputs(), mutable=["intermediates"])
    for b in (1, 2):
        np.testing.assert_array_equal(state["intermediates"][f"block_{b}"][0],
                                      ref_state["intermediates"][f"block_{b}"][0])
    for b in (3, 5):
        assert not np.allclose(state["intermediates"][f"block_{b}"][0], ref_state["intermediates"][f"block_{b}"][0])


def test_self_condition_stop_gradient_detaches_the_pooled_feature():
    h = jax.random.normal(jax.random.key(0), (2, 4, 8))
    for stop, nonzero in ((False, True), (True, False)):
        module = SelfCondition(8, stop_gradient=stop)
        params = perturbed(module.init(jax.random.key(1), h)["params"], 3, 0.5)
        grad = jax.grad(lambda h: jnp.sum(module.apply({"params": params}, h) ** 2))(h)
        assert bool(jnp.any(grad != 0)) == nonzero


def test_bad_self_condition_block_is_named():
    model = get_model("SiT-S/4", depth=4, self_condition=4, **SMALL)
    with pytest.raises(ValueError, match="self_condition=4 must name a block in 1..3"):
        model.init(jax.random.key(0), *model.init_inputs(1))


def test_self_condition_overhead_for_sit_b2_is_under_two_percent():
    def cost(**extra):
        model = get_model("SiT-B/2", input_size=32, in_channels=4, learn_sigma=False, **extra)
        shapes = jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs(1))["params"]
        count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
        flops = hlo_flops(jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y)),
                          (shapes, *model.init_inputs(8)))
        return count, flops

    base_params, base_flops = cost()
    params, flops = cost(self_condition=7)  # LayerSync's strong block of 12
    assert 1.0 < params / base_params < 1.02 and 1.0 < flops / base_flops < 1.02
    print(f"SiT-B/2 self-conditioning: +{params / base_params - 1:.3%} parameters, +{flops / base_flops - 1:.4%} FLOPs")
