"""The sequence and video SiTs: shapes, patches, the shared blocks, tags, and padding masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsync_jax.models import SiTSequence, SiTVideo, get_model
from lsync_jax.objectives.objective import build_objective, objective_loss
from lsync_jax.transport import create_transport

SMALL = dict(depth=3, hidden_size=32, num_heads=2, learn_sigma=False)


def init(model, batch=2):
    return jax.jit(model.init)(jax.random.key(0, impl="threefry2x32"), *model.init_inputs(batch))


def test_video_model_maps_clips_to_clips_with_the_image_blocks():
    model = get_model("SiT-Video-S/2x4", input_size=8, in_channels=1, num_classes=3, num_frames=4, **SMALL)
    assert isinstance(model, SiTVideo) and model.patch_shape == (2, 4, 4)
    variables = init(model)
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8, 1)).astype(np.float32)
    out, state = model.apply(variables, x, jnp.array([0.2, 0.7]), jnp.array([0, 2]), mutable=["intermediates"])
    assert out.shape == x.shape
    tokens = 2 * 2 * 2  # (4 / 2) frames x (8 / 4)^2 patches
    assert [state["intermediates"][f"block_{i}"][0].shape for i in (1, 2, 3)] == [(2, tokens, 32)] * 3
    # the blocks are the image SiT's: the same parameter tree below the embedding
    image = get_model("SiT-S/4", input_size=8, in_channels=1, num_classes=3, **SMALL)
    image_params = init(image)["params"]
    assert jax.tree.structure(image_params["blocks_0"]) == jax.tree.structure(variables["params"]["blocks_0"])
    assert variables["params"]["x_embedder"]["kernel"].shape == (2, 4, 4, 1, 32)
    # any frame count and size the patch divides; others are named
    longer = np.zeros((1, 6, 12, 12, 1), np.float32)
    assert model.apply(variables, longer, jnp.zeros(1), jnp.zeros(1, jnp.int32)).shape == longer.shape
    with pytest.raises(ValueError, match=r"video of 5 frames of 8x8 is not divisible by the patch \(2, 4, 4\)"):
        model.apply(variables, np.zeros((1, 5, 8, 8, 1), np.float32), jnp.zeros(1), jnp.zeros(1, jnp.int32))
    with pytest.raises(ValueError, match="rank 5"):
        model.apply(variables, np.zeros((1, 8, 8, 1), np.float32), jnp.zeros(1), jnp.zeros(1, jnp.int32))


def test_sequence_model_takes_any_length_the_patch_divides():
    model = get_model("SiT-Seq-S/4", input_size=16, in_channels=7, num_classes=0, **SMALL)
    assert isinstance(model, SiTSequence)
    variables = init(model)
    for length in (16, 24):
        x = np.ones((2, length, 7), np.float32)
        assert model.apply(variables, x, jnp.zeros(2), jnp.zeros(2, jnp.int32)).shape == x.shape
    with pytest.raises(ValueError, match="sequence length 18 is not divisible by patch_size=4"):
        model.apply(variables, np.ones((2, 18, 7), np.float32), jnp.zeros(2), jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="in_channels=7"):
        model.apply(variables, np.ones((2, 16, 5), np.float32), jnp.zeros(2), jnp.zeros(2, jnp.int32))


def test_tags_are_a_multi_hot_vector_and_zeros_are_the_null_input():
    model = get_model("SiT-Seq-S/2", input_size=8, in_channels=3, num_classes=0, num_tags=5, **SMALL)
    assert model.null_label == 0
    variables = init(model)
    x = np.random.default_rng(1).standard_normal((2, 8, 3)).astype(np.float32)
    tags = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], np.float32)
    out = model.apply(variables, x, jnp.array([0.5, 0.5]), tags)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match=r"tags of width num_tags=5: .* got shape \(2, 4\)"):
        model.apply(variables, x, jnp.array([0.5, 0.5]), tags[:, :4])
    with pytest.raises(ValueError, match="num_classes=0 for tags"):
        get_model("SiT-Seq-S/2", num_classes=10, num_tags=5)


def test_padding_changes_nothing_about_the_real_steps():
    model = get_model("SiT-Seq-S/2", input_size=12, in_channels=4, num_classes=0, **SMALL)
    variables = init(model)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 12, 4)).astype(np.float32)
    mask = np.arange(12)[None, :] < np.array([[8], [12]])
    other = x.copy()
    other[0, 8:] = 100.0  # different padding
    t, y = jnp.array([0.3, 0.6]), jnp.zeros(2, jnp.int32)
    a, state = model.apply(variables, x, t, y, mask=mask, mutable=["intermediates"])
    b = model.apply(variables, other, t, y, mask=mask)
    np.testing.assert_allclose(a[0, :8], b[0, :8], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(state["intermediates"]["token_mask"][0].sum(axis=1), [4, 6])
    # the objective ignores padded steps too: loss and regularisers
    transport = create_transport()
    objective = build_objective({"regularizers": ("layersync", "diversity"), "layersync": {"pairs": ((1, 2, 0.2),)}},
                                transport, depth=3)
    key = jax.random.key(3, impl="threefry2x32")
    loss_a, metrics_a = objective_loss(variables["params"], model.apply, {"x": x, "y": y, "mask": mask}, key,
                                       objective)
    loss_b, metrics_b = objective_loss(variables["params"], model.apply, {"x": other, "y": y, "mask": mask}, key,
                                       objective)
    for k in metrics_a:
        np.testing.assert_allclose(metrics_a[k], metrics_b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    unmasked, _ = objective_loss(variables["params"], model.apply, {"x": other, "y": y}, key, objective)
    assert abs(float(unmasked) - float(loss_a)) > 1e-3  # without the mask the padding counts
