"""The engine's side of REPA: the frozen encoder whose tokens fill the batch's `encoder_features`, run beside the step.

`build_encoder_features(config, model, mesh)` reads `config.objective.repa` and returns what the loop
needs: the extra loader fields and, unless the tokens were precomputed into the latent shards, a
jitted uint8 images -> tokens function (bfloat16 by default, stop-gradient, the batch split over
every device). Keeping the encoder out of the train step keeps the step one pure function whether
the tokens are computed now or read from disk, and both give the step the same batch. What REPA needs
of the model (its token grid and projector width) is REPA's own (`objectives.repa.encoder_tokens_needed`);
what is here is loading, placing and jitting, which an objective (pure losses) does not do.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from absl import logging

from lsync_jax.data.latents import read_metadata
from lsync_jax.models.encoders.features import encoder_tokens
from lsync_jax.objectives.batch import Batch, make_batch
from lsync_jax.objectives.repa import FEATURES_KEY, encoder_tokens_needed
from lsync_jax.porting.dinov2 import load_encoder
from lsync_jax.sharding import batch_sharding, replicated


@dataclasses.dataclass
class EncoderFeatures:
    fields: tuple[str, ...]  # loader fields: ('image',) (computed here) or ('encoder_features',) (precomputed)
    encode: Callable[[jax.Array], jax.Array] | None  # uint8 images (global, sharded) -> tokens
    description: str

    def add_to(self, batch: Batch) -> Batch:
        """The step's batch: the encoder's tokens in place of the images they come from."""
        if self.encode is not None:
            batch = make_batch(batch, "EncoderFeatures.add_to")
            batch[FEATURES_KEY] = self.encode(batch.pop("image"))
        return batch


def build_encoder_features(config: Any, model: Any, mesh: Any) -> EncoderFeatures | None:
    """None unless REPA is on; checks the model's projector against the encoder before any compile."""
    if "repa" not in tuple(config.objective.regularizers):
        return None
    repa = config.objective.repa
    projector = int(repa.projector)
    tokens_needed = encoder_tokens_needed(model, projector, config.model.name)
    grid = model.input_size // model.patch_size
    if repa.precomputed:
        if config.data.name != "imagenet_latents":
            raise ValueError("objective.repa.precomputed=True reads tokens stored in latent shards "
                             "(data.name='imagenet_latents', launch/preprocess.py --encoder_path)")

        stored = {name: shape for name, _, shape in read_metadata(config.data.dir)["fields"]}
        shape = tuple(stored.get(FEATURES_KEY, ()))
        if shape != tokens_needed:
            raise ValueError(f"the latents in {config.data.dir} store encoder tokens of shape {shape or None}; the "
                             f"model's projector {projector} needs {tokens_needed} (token grid {grid} x {grid}, "
                             f"z_dims[{projector}]={tokens_needed[1]})")
        return EncoderFeatures((FEATURES_KEY,), None, f"precomputed tokens {shape} from {config.data.dir}")
    module, params, description = load_encoder(repa.encoder_path, repa.encoder_dtype)
    if module.config.embed_dim != tokens_needed[1]:
        raise ValueError(f"the REPA encoder ({description}) gives {module.config.embed_dim}-d tokens but the model's "
                         f"projector {projector} has z_dims[{projector}]={tokens_needed[1]}")
    params = jax.device_put(params, replicated(mesh))
    encode = jax.jit(lambda p, images: encoder_tokens(module, p, images, grid),
                     in_shardings=(replicated(mesh), batch_sharding(mesh)), out_shardings=batch_sharding(mesh))
    logging.info("REPA encoder: %s, %d x %d px input for a %d x %d token grid", description,
                 grid * module.config.patch_size, grid * module.config.patch_size, grid, grid)
    return EncoderFeatures(("image",), lambda images: encode(params, images), description)
