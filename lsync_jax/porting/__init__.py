"""Bringing official PyTorch weights into lsync-jax: the SD-VAE from diffusers, SiT / LayerSync /
REPA diffusion transformers, and DINOv2 (torch hub or Hugging Face) for REPA."""

from lsync_jax.porting.dinov2 import load_dinov2
from lsync_jax.porting.official import convert_state_dict, from_official
from lsync_jax.porting.vae import from_diffusers_state, load_vae

__all__ = ["convert_state_dict", "from_diffusers_state", "from_official", "load_dinov2", "load_vae"]
