"""Bringing official PyTorch weights into lsync-jax (the SD-VAE from diffusers so far)."""

from lsync_jax.checkpoints.vae import from_diffusers_state, load_vae

__all__ = ["from_diffusers_state", "load_vae"]
