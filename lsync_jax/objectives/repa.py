"""REPA: align a block's projected tokens with a pretrained encoder's patch tokens (Yu et al.).

The method is this file (the loss, its config section `objective.repa` and what it needs of the model)
plus its model switch: SiT's `z_dims` / `encoder_depth` / `projector_dim` (`lsync_jax.models.projector`:
Dense-SiLU-Dense-SiLU-Dense on every token of block k's output, sown as `projection_0`). The projection
is pulled towards the frozen encoder's normalised patch tokens of the same image: per token
reg = -cos(proj(h_k), z), averaged over tokens and batch, as REPA's loss
(`-(normalize(z) * normalize(z_tilde)).sum(-1)` mean). The encoder's tokens come in the batch as
`encoder_features` (N, T, D_enc), computed outside the model (by the engine beside the step,
`lsync_jax.train.encoders`, or read precomputed from the latent shards) and never differentiated;
`encoder_tokens_needed` says which (T, D_enc) the model's projector takes, refusing a model REPA cannot
align before anything is loaded or compiled.

The coefficient is `weight`, constant (REPA: 0.5), or, with `half_life` > 0, ERW's decay
weight * 2^(-step / half_life) (ERW's c0 * 2^(-(step - warmup) / 50000), with the step counted
from the start of ERW's second stage).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from lsync_jax.models.projector import projection_name
from lsync_jax.objectives.batch import Batch
from lsync_jax.objectives.layersync import cosine_similarity
from lsync_jax.objectives.registry import register_regularizer

Array = jax.Array
FEATURES_KEY = "encoder_features"  # the Batch field REPA reads (lsync_jax.objectives.batch)


def repa_loss(projected: Array, encoder_tokens: Array) -> Array:
    """-cos(projected, sg(encoder_tokens)) per token, averaged over batch and tokens; (N, T, D) each."""
    if projected.shape != encoder_tokens.shape:
        raise ValueError(f"REPA: the projector gives {projected.shape} but the encoder tokens are "
                         f"{encoder_tokens.shape}; token counts and widths must agree (encoder input = "
                         "SiT token grid x encoder patch size)")
    return -jnp.mean(cosine_similarity(projected, jax.lax.stop_gradient(encoder_tokens)))


def repa_coefficient(weight: float, half_life: float, step: Array | None) -> Array:
    """weight, or weight * 2^(-step / half_life) when half_life > 0 (ERW's schedule)."""
    if half_life <= 0 or step is None:
        return jnp.asarray(weight, jnp.float32)
    return weight * jnp.exp2(-jnp.asarray(step, jnp.float32) / half_life)


@dataclasses.dataclass(frozen=True)
class REPA:
    weight: float = 0.5
    half_life: float = 0.0
    projector: int = 0  # which of the model's projectors (z_dims entries) to align
    name: str = "repa"
    spans_batch: ClassVar[bool] = False  # a mean of per-example (per-token) terms

    @property
    def features_needed(self) -> tuple[str, ...]:
        return (projection_name(self.projector),)

    def __call__(self, features: Mapping[str, Array], batch: Batch) -> tuple[Array, dict[str, Array]]:
        if FEATURES_KEY not in batch:
            raise ValueError(f"REPA needs the encoder's tokens in batch[{FEATURES_KEY!r}]")
        reg = repa_loss(features[projection_name(self.projector)], batch[FEATURES_KEY])
        coefficient = repa_coefficient(self.weight, self.half_life, batch.get("step"))
        return coefficient * reg, {f"{self.name}/cos": -reg, f"{self.name}/coefficient": coefficient}


# Config keys: the loss's own, and the encoder the train loop runs (or whose precomputed tokens it reads).
DEFAULTS: dict[str, Any] = dict(weight=0.5, half_life=0.0, projector=0,
                                encoder="dinov2", encoder_path="", encoder_dtype="bfloat16", precomputed=False)


@register_regularizer("repa", DEFAULTS)
def build_repa(cfg: Mapping[str, Any], *, depth: int, prefix: str = "objective.repa") -> REPA:
    """From config: `weight` (0.5), `half_life` (0: constant), `projector` (0). The encoder keys
    (`encoder`, `encoder_path`, `encoder_dtype`, `precomputed`) are read by the train loop."""
    weight = cfg["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
        raise ValueError(f"{prefix}.weight must be a positive number, got {weight!r}")
    half_life = cfg["half_life"] or 0.0
    if half_life < 0:
        raise ValueError(f"{prefix}.half_life must be >= 0 (0: constant weight), got {half_life}")
    return REPA(float(weight), float(half_life), int(cfg["projector"]))


def encoder_tokens_needed(model: Any, projector: int, model_name: str) -> tuple[int, int]:
    """(tokens, width) of the encoder tokens that `model`'s REPA projector `projector` is aligned with: the
    model's token grid and `z_dims[projector]`. Refuses, naming the keys, a model that takes no images
    (an image encoder's tokens exist only for images) or has no such projector."""
    if model.kind != "image":
        raise ValueError(f"objective.regularizers includes 'repa', which aligns the model with an image encoder "
                         f"(DINOv2); the model {model_name} takes {model.kind} data, for which lsync-jax has no "
                         "encoder. Use LayerSync (no external model) or the diversity loss instead")
    if not model.z_dims or not 0 <= projector < len(model.z_dims):
        raise ValueError("REPA needs the model's projector: set config.model.overrides.z_dims (e.g. (768,) for "
                         "DINOv2-B) and encoder_depth (REPA: 8 for L/XL, 4 for B)"
                         + (f"; objective.repa.projector={projector} is not one of them" if model.z_dims else ""))
    grid = model.input_size // model.patch_size
    return grid * grid, model.z_dims[projector]
