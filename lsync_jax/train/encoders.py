"""The pretrained encoder a representation-alignment regulariser (REPA) aligns to, run beside the step.

`build_encoder_features(config, model, mesh)` reads `config.objective.repa` and returns what the loop
needs: the extra loader fields and, unless the tokens were precomputed into the latent shards, a
jitted uint8 images -> tokens function (bfloat16 by default, stop-gradient, the batch split over
every device). Keeping the encoder out of the train step keeps the step one pure function whether
the tokens are computed now or read from disk, and both give the step the same batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from absl import logging

from lsync_jax.data.latents import read_metadata
from lsync_jax.models.encoders.features import encoder_tokens
from lsync_jax.porting.dinov2 import load_encoder
from lsync_jax.sharding import batch_sharding, replicated


@dataclasses.dataclass
class EncoderFeatures:
    fields: tuple[str, ...]  # loader fields: ('image',) (computed here) or ('encoder_features',) (precomputed)
    encode: Callable[[jax.Array], jax.Array] | None  # uint8 images (global, sharded) -> tokens
    description: str

    def add_to(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The step's batch: the encoder's tokens in place of the images they come from."""
        if self.encode is not None:
            batch = dict(batch)
            batch["encoder_features"] = self.encode(batch.pop("image"))
        return batch


def build_encoder_features(config: Any, model: Any, mesh: Any) -> EncoderFeatures | None:
    """None unless REPA is on; checks the model's projector against the encoder before any compile."""
    if "repa" not in tuple(config.objective.regularizers):
        return None
    kind = model.kind
    if kind != "image":  # an image encoder's tokens exist only for images
        raise ValueError(f"objective.regularizers includes 'repa', which aligns the model with an image encoder "
                         f"(DINOv2); the model {config.model.name} takes {kind} data, for which lsync-jax has no "
                         "encoder. Use LayerSync (no external model) or the diversity loss instead")
    repa = config.objective.repa
    projector = int(repa.projector)
    if not model.z_dims or not 0 <= projector < len(model.z_dims):
        raise ValueError("REPA needs the model's projector: set config.model.overrides.z_dims (e.g. (768,) for "
                         "DINOv2-B) and encoder_depth (REPA: 8 for L/XL, 4 for B)"
                         + (f"; objective.repa.projector={projector} is not one of them" if model.z_dims else ""))
    grid = model.input_size // model.patch_size
    tokens_needed = (grid * grid, model.z_dims[projector])
    if repa.precomputed:
        if config.data.name != "imagenet_latents":
            raise ValueError("objective.repa.precomputed=True reads tokens stored in latent shards "
                             "(data.name='imagenet_latents', launch/preprocess.py --encoder_path)")

        stored = {name: shape for name, _, shape in read_metadata(config.data.dir)["fields"]}
        shape = tuple(stored.get("encoder_features", ()))
        if shape != tokens_needed:
            raise ValueError(f"the latents in {config.data.dir} store encoder tokens of shape {shape or None}; the "
                             f"model's projector {projector} needs {tokens_needed} (token grid {grid} x {grid}, "
                             f"z_dims[{projector}]={model.z_dims[projector]})")
        return EncoderFeatures(("encoder_features",), None, f"precomputed tokens {shape} from {config.data.dir}")
    module, params, description = load_encoder(repa.encoder_path, repa.encoder_dtype)
    if module.config.embed_dim != model.z_dims[projector]:
        raise ValueError(f"the REPA encoder ({description}) gives {module.config.embed_dim}-d tokens but the model's "
                         f"projector {projector} has z_dims[{projector}]={model.z_dims[projector]}")
    params = jax.device_put(params, replicated(mesh))
    encode = jax.jit(lambda p, images: encoder_tokens(module, p, images, grid),
                     in_shardings=(replicated(mesh), batch_sharding(mesh)), out_shardings=batch_sharding(mesh))
    logging.info("REPA encoder: %s, %d x %d px input for a %d x %d token grid", description,
                 grid * module.config.patch_size, grid * module.config.patch_size, grid, grid)
    return EncoderFeatures(("image",), lambda images: encode(params, images), description)
