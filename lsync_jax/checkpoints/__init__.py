"""Bringing official PyTorch weights into lsync-jax: the SD-VAE from diffusers, and SiT / LayerSync /
REPA diffusion transformers."""

from lsync_jax.checkpoints.official import convert_state_dict, from_official
from lsync_jax.checkpoints.vae import from_diffusers_state, load_vae

__all__ = ["convert_state_dict", "from_diffusers_state", "from_official", "load_vae"]
