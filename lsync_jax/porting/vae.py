"""diffusers `AutoencoderKL` weights (sd-vae-ft-ema / -mse) -> `lsync_jax.models.vae` params.

Reads a local `diffusion_pytorch_model.safetensors` (no torch needed) or `.bin` (torch), or a
directory holding one of them and diffusers' `config.json` (a Hugging Face cache snapshot
directory works). Nothing is downloaded.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from lsync_jax import storage
from lsync_jax.extras import require
from lsync_jax.models.vae import AutoencoderKL, VAEConfig
from lsync_jax.storage import read_json

# Older diffusers files (the original sd-vae-ft-* uploads) name the attention projections thus.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}


def _module_path(tokens: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in ("down_blocks", "up_blocks"):  # flattened: down_blocks_0_resnets_1
            out.append(f"{tok}_{tokens[i + 1]}_{tokens[i + 2]}_{tokens[i + 3]}")
            i += 4
        elif tok in ("resnets", "attentions", "to_out"):
            out.append(f"{tok}_{tokens[i + 1]}")
            i += 2
        else:
            out.append(_LEGACY_ATTENTION.get(tok, tok))
            i += 1
    return out


def from_diffusers_state(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """A diffusers AutoencoderKL state dict -> nested flax params (NHWC kernels)."""
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in state.items():
        value = np.asarray(value, np.float32)
        *module, name = key.split(".")
        path = _module_path(module)
        if name == "bias":
            flat[(*path, "bias")] = value
        elif name != "weight":
            raise ValueError(f"unexpected VAE tensor {key!r}")
        elif value.ndim == 4 and path[-1] in set(_LEGACY_ATTENTION.values()):
            flat[(*path, "kernel")] = value[:, :, 0, 0].T  # legacy 1x1-conv attention projections
        elif value.ndim == 4:
            flat[(*path, "kernel")] = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif value.ndim == 2:
            flat[(*path, "kernel")] = value.T
        else:
            flat[(*path, "scale")] = value  # GroupNorm
    return traverse_util.unflatten_dict(flat)


def read_state_file(path: str) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors file (no torch needed) or a torch .bin/.pt state dict, as float32 numpy."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except Exception as e:  # safetensors raises its own SafetensorError on a damaged file
            raise ValueError(f"weights file {path} is damaged or not safetensors: {e}") from None
    torch = require("torch", what=f"reading the PyTorch file {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}


def load_vae(path: str) -> tuple[AutoencoderKL, dict[str, Any]]:
    """(module, params) from a diffusers VAE file or directory (local or gs://); checked against the
    module's shapes."""
    with storage.local_copy(path) as local:
        return _load_vae(local, path)


def _load_vae(path: str, named: str) -> tuple[AutoencoderKL, dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "**", "diffusion_pytorch_model.safetensors"), recursive=True)
                       or glob.glob(os.path.join(path, "**", "diffusion_pytorch_model.bin"), recursive=True))
        if not found:
            raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors or .bin under {path}")
        weights_file = found[0]
    elif os.path.isfile(path):
        weights_file = path
    else:
        raise FileNotFoundError(f"VAE weights {named} not found (a diffusers file or directory, e.g. "
                                "stabilityai/sd-vae-ft-ema downloaded beforehand)")
    config_file = os.path.join(os.path.dirname(weights_file), "config.json")
    config = (VAEConfig.from_diffusers(read_json(config_file, "the VAE config")) if os.path.isfile(config_file)
              else VAEConfig())
    module = AutoencoderKL(config)
    params = from_diffusers_state(read_state_file(weights_file))
    expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, config.in_channels)))["params"]
    want = {k: v.shape for k, v in traverse_util.flatten_dict(expected).items()}
    got = {k: v.shape for k, v in traverse_util.flatten_dict(params).items()}
    if want != got:
        missing = sorted("/".join(k) for k in set(want) - set(got))[:5]
        extra = sorted("/".join(k) for k in set(got) - set(want))[:5]
        shapes = sorted("/".join(k) for k in set(want) & set(got) if want[k] != got[k])[:5]
        raise ValueError(f"{weights_file} does not match the VAE config ({config}): missing {missing}, "
                         f"unexpected {extra}, wrong shapes {shapes}")
    return module, params
