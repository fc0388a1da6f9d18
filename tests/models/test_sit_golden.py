"""The image SiT, pinned: outputs and sown blocks of small models at fixed seeds, captured before the
sequence and video backbones shared its blocks (issue 16), so that the image models stay unchanged.

Regenerate only on purpose: `python -m tests.models.test_sit_golden` rewrites golden/sit.npz."""

import os

import jax
import numpy as np

from lsync_jax.models import get_model

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "sit.npz")
CASES = {
    "plain": dict(depth=3, hidden_size=32, num_heads=2, input_size=8, in_channels=4, num_classes=5,
                  learn_sigma=True),
    "uncond_p4": dict(depth=2, hidden_size=48, num_heads=3, input_size=12, in_channels=1, num_classes=0,
                      learn_sigma=False),  # SiT-S/4
    "repa_proj": dict(depth=3, hidden_size=32, num_heads=2, input_size=8, in_channels=4, num_classes=5,
                      learn_sigma=False, z_dims=(16,), encoder_depth=2, projector_dim=24),
}


def outputs(name: str) -> dict[str, np.ndarray]:
    model = get_model("SiT-S/4" if name == "uncond_p4" else "SiT-S/2", **CASES[name])
    key = jax.random.key(0, impl="threefry2x32")
    variables = jax.jit(model.init)(key, *model.init_inputs(2))
    rng = np.random.default_rng(0)
    size, channels = model.input_size, model.in_channels
    x = rng.standard_normal((2, size, size, channels)).astype(np.float32)
    t = np.array([0.25, 0.8], np.float32)
    y = np.array([1, 3 % max(model.num_classes, 1)], np.int32) if model.num_classes else np.zeros(2, np.int32)
    out, state = jax.jit(lambda v, x, t, y: model.apply(v, x, t, y, mutable=["intermediates"]))(variables, x, t, y)
    leaves = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    result = {f"{name}/out": np.asarray(out), f"{name}/block_1": np.asarray(state["intermediates"]["block_1"][0]),
              f"{name}/param_sums": np.array([float(np.sum(np.asarray(v, np.float64))) for _, v in leaves])}
    if "projection_0" in state["intermediates"]:
        result[f"{name}/projection_0"] = np.asarray(state["intermediates"]["projection_0"][0])
    return result


def test_image_sit_is_unchanged():
    with np.load(GOLDEN) as golden:
        expected = dict(golden)
    got = {}
    for name in CASES:
        got.update(outputs(name))
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-6, err_msg=key)


if __name__ == "__main__":
    arrays = {}
    for case in CASES:
        arrays.update(outputs(case))
    np.savez(GOLDEN, **arrays)
    print(f"wrote {GOLDEN}: {sorted(arrays)}")
