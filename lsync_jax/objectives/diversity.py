"""DiverseDiT's representation diversity loss across blocks (arXiv 2603.04239; code unreleased).

The paper names three parts: orthogonality ("independence"), mutual information ("correlation")
and dispersion ("variance"). Its code is not public; the formulas below follow a public research
branch that appears to be the authors' (see REFERENCE.md), with one deliberate change (all pairs).
For block features h_a (N, T, D), in float32, with cos() over channels:

- independence(a, b) = cos(mean_{n,t} h_a, mean_{n,t} h_b): the batch-and-token mean features of
  two blocks should point in different directions.
- correlation(a, b) = | mean_{n,t} cos(h_a[n, t], h_b[n, t]) |: token by token, two blocks should
  be neither aligned nor anti-aligned.
- dispersion = -clip(Var_c(u) / 0.25, 0, 1) over channels c, where for each block h is flattened
  to (N T, D), each channel is L2-normalised over the N T rows, u_b = mean |.| per channel,
  u = mean over blocks of u_b, divided by max_c u. (Rewards unevenly used channels, as the
  branch does; it is one term for all blocks, not per pair.)

loss = min((w_i * mean_pairs independence + w_c * mean_pairs correlation + w_d * dispersion) / 3, cap)
and the objective adds weight * loss. Pairs: every pair of the selected blocks (the branch pairs
one shallow block with the next ten, which looks accidental; all pairs treat every block alike).
Defaults: weight 0.001, all three parts weighted 1, cap 5 (the branch's values). No stop-gradient
and no projector: the loss acts on the raw (post-fusion, with long residuals) block outputs.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp

from lsync_jax.models.sit import block_name
from lsync_jax.objectives.registry import register_regularizer

Array = jax.Array


def dispersion(features: Sequence[Array], eps: float = 1e-12, token_mask: Array | None = None) -> Array:
    """-clip(Var(u) / 0.25, 0, 1) of the blocks' mean channel usage u (module docstring); padded
    tokens (`token_mask` False) are left out."""
    usage = []
    weight = None if token_mask is None else token_mask.astype(jnp.float32).reshape(-1, 1)
    for h in features:
        flat = h.astype(jnp.float32).reshape(-1, h.shape[-1])
        if weight is not None:
            flat = flat * weight
        flat = flat / jnp.maximum(jnp.linalg.norm(flat, axis=0, keepdims=True), eps)
        usage.append(jnp.sum(jnp.abs(flat), axis=0) / (jnp.maximum(jnp.sum(weight), 1.0) if weight is not None
                                                      else flat.shape[0]))
    u = jnp.mean(jnp.stack(usage), axis=0)
    u = u / jnp.maximum(jnp.max(u), eps)
    return -jnp.clip(jnp.var(u) / 0.25, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Diversity:
    """The diversity loss over `blocks` (1-indexed), weighted by `weight`."""

    blocks: tuple[int, ...]
    weight: float = 0.001
    independence_weight: float = 1.0
    correlation_weight: float = 1.0
    dispersion_weight: float = 1.0
    cap: float = 5.0
    name: str = "diversity"
    spans_batch: ClassVar[bool] = True  # the dispersion and correlation terms compare the examples of the batch

    @property
    def features_needed(self) -> tuple[str, ...]:
        return tuple(block_name(b) for b in self.blocks)

    def loss(self, features: Mapping[str, Array], token_mask: Array | None = None) -> tuple[Array, dict[str, Array]]:
        """(the unweighted, capped loss, its parts) from sown features.

        All pairs at once: each block's tokens are normalised once and the (B, B) matrices of mean
        per-token cosines and of pooled-feature cosines come from two einsums (28 blocks make 378
        pairs; pair by pair, the loss cost more than the rest of a SiT-XL/2 step)."""
        hs = [features[block_name(b)] for b in self.blocks]
        stacked = jnp.stack([h.astype(jnp.float32) for h in hs])  # (B, N, T, D)
        eps = 1e-12
        units = stacked / jnp.maximum(jnp.linalg.norm(stacked, axis=-1, keepdims=True), eps)
        if token_mask is None:
            tokens = units.shape[1] * units.shape[2]
            pooled = jnp.mean(stacked, axis=(1, 2))
        else:  # padded tokens count in no average
            weight = token_mask.astype(jnp.float32)[None, :, :, None]
            units, tokens = units * weight, jnp.maximum(jnp.sum(token_mask), 1)
            pooled = jnp.sum(stacked * weight, axis=(1, 2)) / tokens
        token_cos = jnp.einsum("antd,bntd->ab", units, units) / tokens  # mean per-token cosine
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), eps)
        pooled_cos = pooled @ pooled.T
        upper = jnp.triu(jnp.ones((len(hs), len(hs)), bool), k=1)  # each pair once, no self-pairs
        num_pairs = len(hs) * (len(hs) - 1) / 2
        ind = jnp.sum(jnp.where(upper, pooled_cos, 0.0)) / num_pairs
        cor = jnp.sum(jnp.where(upper, jnp.abs(token_cos), 0.0)) / num_pairs
        dis = dispersion(hs, token_mask=token_mask)
        total = (self.independence_weight * ind + self.correlation_weight * cor + self.dispersion_weight * dis) / 3
        total = jnp.minimum(total, self.cap)
        return total, {f"{self.name}/independence": ind, f"{self.name}/correlation": cor,
                       f"{self.name}/dispersion": dis, f"{self.name}/loss": total}

    def __call__(self, features: Mapping[str, Array], batch: Mapping[str, Any]) -> tuple[Array, dict[str, Array]]:
        total, metrics = self.loss(features, batch.get("token_mask"))
        return self.weight * total, metrics


# blocks=None: all blocks 1..depth.
DEFAULTS: dict[str, Any] = dict(blocks=None, weight=0.001, independence_weight=1.0, correlation_weight=1.0,
                                dispersion_weight=1.0, cap=5.0)


@register_regularizer("diversity", DEFAULTS)
def build_diversity(cfg: Mapping[str, Any], *, depth: int, prefix: str = "objective.diversity") -> Diversity:
    """From config: `blocks` (None: all 1..depth; at least 2), `weight` (0.001), the three parts'
    weights (1 each) and `cap` (5)."""
    blocks = cfg["blocks"]
    blocks = tuple(range(1, depth + 1)) if blocks is None else tuple(blocks)
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 1 <= b <= depth:
            raise ValueError(f"{prefix}.blocks: {b!r} is not a block in 1..{depth} (blocks are 1-indexed)")
    if len(set(blocks)) != len(blocks) or len(blocks) < 2:
        raise ValueError(f"{prefix}.blocks must list at least 2 distinct blocks, got {blocks}")
    values = {}
    for key in ("weight", "independence_weight", "correlation_weight", "dispersion_weight", "cap"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
            raise ValueError(f"{prefix}.{key} must be a number >= 0, got {value!r}")
        values[key] = float(value)
    return Diversity(tuple(int(b) for b in blocks), **values)
