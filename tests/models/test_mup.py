"""muP for SiT: initialisation, readout multiplier, Adam learning-rate factors, and the coordinate check
(under muP activations stay flat across a 4x width range; under sp with the same lr they grow)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lsync_jax.models import get_model
from lsync_jax.models.mup import mup_lr_multipliers
from lsync_jax.tools.coord_check import (
    CoordCheckSetup,
    coord_check,
    format_table,
    plot_coord_check,
    width_growth,
    write_json,
)
from lsync_jax.train.state import make_optimizer

HIDDEN_KERNELS = {"adaLN_modulation/kernel", "attn/qkv/kernel", "attn/proj/kernel", "mlp/fc1/kernel",
                  "mlp/fc2/kernel"}


def small(width=128, **overrides):
    kw = dict(depth=2, hidden_size=width, num_heads=width // 32, input_size=8, in_channels=4, num_classes=10,
              learn_sigma=False, parametrization="mup", mup_base_width=32)
    kw.update(overrides)
    return get_model("SiT-S/2", **kw)


def flat(tree):
    return {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def init(model):
    return jax.jit(model.init)(jax.random.key(0), *model.init_inputs(2))["params"]


def inputs():
    return jax.random.normal(jax.random.key(1), (2, 8, 8, 4)), jnp.array([0.2, 0.7]), jnp.array([1, 3])


@pytest.fixture(scope="module")
def mup_params():
    return init(small(128))


def test_mup_initialisation_follows_the_mup_dit_code(mup_params):
    params = flat(mup_params)
    checked = 0
    for name, w in params.items():
        w = np.asarray(w)
        if name.endswith("bias"):
            assert not np.any(w), name
        elif name.startswith("blocks_") or name in ("final_layer/adaLN_modulation/kernel", "t_embedder/mlp_0/kernel",
                                                    "t_embedder/mlp_2/kernel", "x_embedder/kernel"):
            fan_in = math.prod(w.shape[:-1])  # kernels are (..., fan_in, fan_out); the patch conv (p, p, C, D)
            assert abs(np.std(w) * math.sqrt(fan_in) - 1) < 0.06, (name, np.std(w) * math.sqrt(fan_in))
            assert abs(np.mean(w)) < 5 / math.sqrt(w.size * fan_in), name
            checked += 1
    assert checked == 2 * 5 + 4
    # adaLN is a hidden layer under muP, not zero (adaLN-Zero is sp's)
    assert np.std(params["blocks_0/adaLN_modulation/kernel"]) > 0.05
    # label table: an input layer at torch's default N(0, 1); the readout zero
    assert abs(np.std(params["y_embedder/embedding_table/embedding"]) - 1) < 0.1
    assert not np.any(params["final_layer/linear/kernel"])


def test_sp_is_the_default_and_ignores_the_mup_fields(mup_params):
    model = small(128, parametrization="sp")
    default = get_model("SiT-S/2", depth=2, hidden_size=128, num_heads=4, input_size=8, in_channels=4,
                        num_classes=10, learn_sigma=False)
    # the default is sp, whose initialisation is the official one (tests/models/test_sit.py)
    assert default.parametrization == "sp" and default == model.clone(mup_base_width=288)
    # output_multiplier and the base width do not touch the sp forward (any weights will do)
    other = small(128, parametrization="sp", output_multiplier=3.0, mup_base_width=64)
    variables = {"params": jax.tree.map(lambda p: p + 0.01, mup_params)}
    a, b = jax.jit(lambda v, *xs: (default.apply(v, *xs), other.apply(v, *xs)))(variables, *inputs())
    assert float(jnp.abs(a).mean()) > 0.01
    np.testing.assert_array_equal(a, b)


def test_mup_readout_input_is_scaled_by_output_multiplier_over_width_multiplier(mup_params):
    params = jax.tree.map(lambda p: p, mup_params)
    kernel = params["final_layer"]["linear"]["kernel"]
    params["final_layer"]["linear"]["kernel"] = jax.random.normal(jax.random.key(3), kernel.shape)
    models = (small(128), small(128, output_multiplier=2.0), small(128, mup_base_width=64))
    out, doubled, half_as_wide = jax.jit(lambda v, *xs: [m.apply(v, *xs) for m in models])({"params": params},
                                                                                           *inputs())
    # width 128 over base 32: the readout sees 1/4 of its input; output_multiplier 2 doubles it, and so
    # does a base of 64 (1/2)
    assert float(jnp.abs(out).mean()) > 0.01
    np.testing.assert_allclose(doubled, 2 * out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(half_as_wide, 2 * out, rtol=1e-5, atol=1e-6)


def test_lr_multipliers_divide_hidden_matrices_by_the_width_multiplier():
    mult = flat(mup_lr_multipliers(small(128)))
    hidden = {n for n in mult if n.split("/", 1)[-1] in HIDDEN_KERNELS} | {"t_embedder/mlp_2/kernel"}
    assert len(hidden) == 2 * 5 + 2  # blocks' five kernels, the final adaLN, the timestep MLP's hidden Linear
    for name, m in mult.items():
        assert m == (0.25 if name in hidden else 1.0), (name, m)
    # REPA's projectors read the width but write a fixed size: base learning rate, as MuAdam
    with_projector = flat(mup_lr_multipliers(small(128, z_dims=(16,), encoder_depth=1, projector_dim=8)))
    assert {n: m for n, m in with_projector.items() if n.startswith("projectors_")} == {
        f"projectors_0/fc_{i}/{k}": 1.0 for i in range(3) for k in ("kernel", "bias")}
    assert set(jax.tree.leaves(mup_lr_multipliers(small(32)))) == {1.0}  # at the base width
    assert mup_lr_multipliers(small(128, parametrization="sp")) is None


def test_bad_mup_settings_fail_naming_the_field():
    for overrides, match in [(dict(parametrization="MuP"), "model.parametrization"),
                             (dict(mup_base_width=48), "model.mup_base_width"),  # not whole heads of 32
                             (dict(output_multiplier=0.0), "model.output_multiplier")]:
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(small(128, **overrides).init, jax.random.key(0), *small(128).init_inputs(1))


def test_optimizer_scales_only_the_adam_step_of_the_marked_parameters():
    params = {"hidden": jnp.full((3, 3), 0.5), "vector": jnp.full((3,), 0.5)}
    grads = {"hidden": jnp.array([[1.0, -2.0, 3.0]] * 3), "vector": jnp.array([0.1, -0.2, 0.3])}
    cfg = {"lr": 0.1, "weight_decay": 0.2}
    plain, _ = make_optimizer(cfg)
    scaled, _ = make_optimizer(cfg, lr_multipliers={"hidden": 0.25, "vector": 1.0})
    ones, _ = make_optimizer(cfg, lr_multipliers={"hidden": 1.0, "vector": 1.0})
    base, _ = plain.update(grads, plain.init(params), params)
    mup, _ = scaled.update(grads, scaled.init(params), params)
    same, _ = ones.update(grads, ones.init(params), params)
    for k in params:
        np.testing.assert_array_equal(same[k], base[k])  # factors of 1: exactly optax.adamw
    np.testing.assert_array_equal(mup["vector"], base["vector"])
    # first Adam step: sign(g); AdamW adds wd * p; muP scales the Adam part only (lr * wd unchanged)
    adam = optax.scale_by_adam().update(grads, optax.scale_by_adam().init(params))[0]["hidden"]
    np.testing.assert_allclose(mup["hidden"], -0.1 * (0.25 * adam + 0.2 * 0.5), rtol=1e-6)
    np.testing.assert_allclose(base["hidden"], -0.1 * (adam + 0.2 * 0.5), rtol=1e-6)


@pytest.fixture(scope="module")
def coord_records():
    # 4 Adam steps on one batch, widths 32 and 128 (2 and 8 heads of 16), 3 seeds; lr 2e-2, twice the
    # launcher's, so that sp's blow-up shows within 4 steps over this short width range
    return coord_check((32, 128), ("sp", "mup"), num_steps=4, num_seeds=3, setup=CoordCheckSetup(lr=2e-2))


@pytest.mark.slow
def test_coordinate_check_mup_is_flat_in_the_width_and_sp_is_not(coord_records):
    last = "block_2"
    table = format_table(coord_records)
    for step in range(5):
        assert 0.5 < width_growth(coord_records, "mup", last, step) < 2.0, table
    for step in range(1, 5):
        assert 0.5 < width_growth(coord_records, "mup", "final_layer", step) < 2.0, table
    # sp with the same lr: the readout's first Adam step already grows with the width (~ width), and
    # once the updates reach the adaLN gates (its blocks start as the identity) the blocks blow up
    assert width_growth(coord_records, "sp", "final_layer", 1) > 3.0, table
    assert width_growth(coord_records, "sp", last, 4) > 4.0, table


@pytest.mark.slow
def test_coordinate_check_writes_a_plot_and_json(coord_records, tmp_path):
    plot_coord_check(coord_records, str(tmp_path / "coord.png"))
    write_json(coord_records, CoordCheckSetup(), str(tmp_path / "coord.json"))
    assert (tmp_path / "coord.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "coord.json").read_text())
    assert len(saved["records"]) == 2 * 2 * 3 * 5 * 6  # params x widths x seeds x steps x layers
    assert {r["layer"] for r in saved["records"]} == {"x_embedder", "t_embedder", "y_embedder", "block_1",
                                                      "block_2", "final_layer"}
