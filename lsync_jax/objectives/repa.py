"""REPA: align a block's projected tokens with a pretrained encoder's patch tokens (Yu et al.).

The model's REPA projector (`SiT(z_dims=(D_enc,), encoder_depth=k)`: Dense-SiLU-Dense-SiLU-Dense
on every token of block k's output, sown as `projection_0`) is pulled towards the frozen encoder's
normalised patch tokens of the same image: per token reg = -cos(proj(h_k), z), averaged over
tokens and batch, as REPA's loss (`-(normalize(z) * normalize(z_tilde)).sum(-1)` mean). The
encoder's tokens come in the batch as `encoder_features` (N, T, D_enc), computed outside the
model (by the train loop, or read precomputed from the latent shards) and never differentiated.

The coefficient is `weight`, constant (REPA: 0.5), or, with `half_life` > 0, ERW's decay
weight * 2^(-step / half_life) (ERW's c0 * 2^(-(step - warmup) / 50000), with the step counted
from the start of ERW's second stage).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from lsync_jax.models.sit import projection_name
from lsync_jax.objectives.layersync import cosine_similarity
from lsync_jax.objectives.registry import register_regularizer

Array = jax.Array
FEATURES_KEY = "encoder_features"


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

    def __call__(self, features: Mapping[str, Array], batch: Mapping[str, Any]) -> tuple[Array, dict[str, Array]]:
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
