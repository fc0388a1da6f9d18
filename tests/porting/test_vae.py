"""The Flax SD-VAE reproduces diffusers' PyTorch AutoencoderKL (small random configuration,
weights converted from its state dict, saved the way diffusers saves them)."""

import json

import jax
import numpy as np
import pytest

from lsync_jax.models.vae import SCALE_FACTOR, VAEConfig
from lsync_jax.porting import load_vae
from tests.helpers import import_torchvision

pytestmark = pytest.mark.torch_parity

torch = pytest.importorskip("torch", reason="torch runs the diffusers reference VAE")
CONFIG = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
              up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[32, 64, 64], layers_per_block=2,
              latent_channels=4, norm_num_groups=8, sample_size=32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A diffusers AutoencoderKL with random weights (norms and biases too), saved as diffusers does."""
    import_torchvision()  # diffusers imports torchvision; PyPI's CUDA build needs a hand next to CPU torch
    diffusers = pytest.importorskip("diffusers", reason="diffusers defines the reference AutoencoderKL")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**CONFIG).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("sd-vae")
    vae.save_pretrained(str(directory), safe_serialization=True)
    return vae, str(directory)


def test_config_and_weights_load_from_a_diffusers_directory(reference):
    _, directory = reference
    module, params = load_vae(directory)
    assert module.config == VAEConfig.from_diffusers(json.load(open(f"{directory}/config.json")))
    assert module.config.block_out_channels == (32, 64, 64)


@pytest.mark.slow
def test_encode_and_decode_match_diffusers(reference):
    vae, directory = reference
    module, params = load_vae(directory)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 24, 3)).astype(np.float32)
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
        ref_mean = posterior.mean.numpy().transpose(0, 2, 3, 1)
        ref_std = posterior.std.numpy().transpose(0, 2, 3, 1)
        z = posterior.mean * 1.0
        ref_image = vae.decode(z).sample.numpy().transpose(0, 2, 3, 1)
    mean, std = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode))(params, x)
    image = jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode))(params, ref_mean)
    assert mean.shape == (2, 8, 6, 4)  # two downsamplings of 32 x 24
    for ours, ref in ((mean, ref_mean), (std, ref_std), (image, ref_image)):
        err = np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()
        print(f"relative error {err:.2e}")
        assert err < 1e-4, err
    assert SCALE_FACTOR == 0.18215


def test_missing_or_mismatched_weights_are_named(reference, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_vae(str(tmp_path / "nope.safetensors"))
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model"):
        load_vae(str(tmp_path))
    _, directory = reference
    config = json.load(open(f"{directory}/config.json"))
    config["block_out_channels"] = [32, 64, 128]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    import shutil

    shutil.copy(f"{directory}/diffusion_pytorch_model.safetensors", tmp_path / "bad")
    with pytest.raises(ValueError, match="does not match the VAE config"):
        load_vae(str(tmp_path / "bad"))


def test_legacy_attention_names_convert_alike(reference):
    """Older diffusers files (the original sd-vae-ft-* uploads) call the projections query/key/value/proj_attn."""
    from flax import traverse_util

    from lsync_jax.porting import from_diffusers_state

    vae, _ = reference
    state = {k: v.numpy() for k, v in vae.state_dict().items()}
    legacy = {}
    for key, value in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    assert legacy.keys() != state.keys()
    a = traverse_util.flatten_dict(from_diffusers_state(state))
    b = traverse_util.flatten_dict(from_diffusers_state(legacy))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
