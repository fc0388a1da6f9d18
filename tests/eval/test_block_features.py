"""Pooled block features: equal to a direct forward, the noise fixed per sample whatever the batch size,
bad requests named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsync_jax.data import SyntheticSource
from lsync_jax.eval.block_features import collect_block_features
from lsync_jax.models import get_model
from lsync_jax.transport.paths import LinearPath
from tests.helpers import perturbed


@pytest.fixture(scope="module")
def setup():
    model = get_model("SiT-S/4", depth=3, hidden_size=32, num_heads=2, input_size=8, in_channels=1, num_classes=4,
                      learn_sigma=False)
    params = perturbed(jax.jit(model.init)(jax.random.key(0), *model.init_inputs(1))["params"], 1, 0.1)
    return model, params, SyntheticSource(10, (8, 8, 1), 4, seed=3)


@pytest.mark.slow
def test_features_equal_a_direct_forward(setup):
    model, params, source = setup
    out = collect_block_features(model, params, LinearPath(), source, 7, (1.0, 0.5), batch_size=4, seed=2)
    assert out["labels"].shape == (7,) and set(out["features"]) == {1.0, 0.5}
    assert set(out["features"][0.5]) == {"block_1", "block_2", "block_3"}
    x = np.stack([source[i]["image"] for i in range(7)]).astype(np.float32) / 127.5 - 1
    y = np.asarray([source[i]["label"] for i in range(7)], np.int32)
    # at t = 1 the input is the data itself, so no noise is involved; by default the model sees its null class
    null = np.full(7, model.null_label, np.int32)
    _, state = model.apply({"params": params}, x, jnp.ones(7), null, mutable=["intermediates"])
    for b in (1, 3):
        direct = np.asarray(state["intermediates"][f"block_{b}"][0]).mean(axis=1)
        np.testing.assert_allclose(out["features"][1.0][f"block_{b}"], direct, rtol=1e-5, atol=1e-6)
    assert not np.allclose(out["features"][0.5]["block_3"], out["features"][1.0]["block_3"])
    np.testing.assert_array_equal(out["labels"], y)
    # condition='label' feeds the true labels, as in training
    labelled = collect_block_features(model, params, LinearPath(), source, 7, (1.0,), batch_size=4, condition="label",
                                      blocks=(3,))
    _, state = model.apply({"params": params}, x, jnp.ones(7), y, mutable=["intermediates"])
    np.testing.assert_allclose(labelled["features"][1.0]["block_3"],
                               np.asarray(state["intermediates"]["block_3"][0]).mean(axis=1), rtol=1e-5, atol=1e-6)


def test_indices_pick_the_examples_and_the_reference_sees_their_images(setup):
    model, params, source = setup
    seen = []

    def reference(images):
        seen.append(images)
        return images.reshape(len(images), -1)[:, :5].astype(np.float32)

    out = collect_block_features(model, params, LinearPath(), source, 0, (1.0,), batch_size=2, indices=[6, 2, 9],
                                 reference=reference, blocks=(1,))
    np.testing.assert_array_equal(out["indices"], [6, 2, 9])
    np.testing.assert_array_equal(out["labels"], [source[i]["label"] for i in (6, 2, 9)])
    expected = np.stack([source[i]["image"] for i in (6, 2, 9)])
    np.testing.assert_array_equal(np.concatenate(seen), expected)
    np.testing.assert_array_equal(out["reference"], expected.reshape(3, -1)[:, :5])
    other = collect_block_features(model, params, LinearPath(), source, 0, (1.0,), indices=[2, 9], blocks=(1,))
    np.testing.assert_allclose(out["features"][1.0]["block_1"][1:], other["features"][1.0]["block_1"], rtol=1e-5,
                               atol=1e-6)


def test_a_model_without_a_null_class_needs_condition_label(setup):
    _, params, source = setup
    model = get_model("SiT-S/4", depth=3, hidden_size=32, num_heads=2, input_size=8, in_channels=1, num_classes=4,
                      learn_sigma=False, class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="without a null class"):
        collect_block_features(model, params, LinearPath(), source, 4, (0.5,))


@pytest.mark.slow
def test_the_batch_size_does_not_change_the_noise_or_the_features(setup):
    model, params, source = setup
    a = collect_block_features(model, params, LinearPath(), source, 9, (0.3,), batch_size=9, seed=1, blocks=(2,))
    b = collect_block_features(model, params, LinearPath(), source, 9, (0.3,), batch_size=4, seed=1, blocks=(2,))
    c = collect_block_features(model, params, LinearPath(), source, 9, (0.3,), batch_size=4, seed=2, blocks=(2,))
    np.testing.assert_allclose(a["features"][0.3]["block_2"], b["features"][0.3]["block_2"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a["features"][0.3]["block_2"], c["features"][0.3]["block_2"])  # the seed matters


@pytest.mark.parametrize("kwargs, match", [(dict(blocks=(0,)), "outside 1..3"), (dict(t_values=(1.5,)), "t=1.5"),
                                           (dict(num_samples=1), "at least 2 samples"),
                                           (dict(indices=[3, 10]), r"indices must lie in \[0, 10\)"),
                                           (dict(condition="none"), "condition must be")])
def test_bad_requests_are_named(setup, kwargs, match):
    model, params, source = setup
    args = dict(num_samples=4, t_values=(0.5,))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        collect_block_features(model, params, LinearPath(), source, args.pop("num_samples"), args.pop("t_values"),
                               **args)
