"""LayerSync: the network's semantically strong block guides its weaker blocks.

Per token, reg = -cos(h_weak, stop_gradient(h_strong)) over channels, averaged over tokens and
batch; features are the raw residual-stream outputs of the blocks (no projector, no extra norm).
Unlike the official multi-pair mode (which keeps only the last pair), every (weak, strong, weight)
pair contributes weight * reg to the loss.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from lsync_jax.models.sit import block_name
from lsync_jax.objectives.registry import check_keys, register_regularizer

Array = jax.Array

# The paper's SiT-XL/2 setting: block 8 guided by block 16 of 28, weight 0.2.
PAPER_DEPTH, PAPER_WEAK, PAPER_STRONG, PAPER_WEIGHT = 28, 8, 16, 0.2


def cosine_similarity(a: Array, b: Array, eps: float = 1e-12) -> Array:
    """Cosine similarity over the last axis, in float32, normalising as torch's F.normalize."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
    return jnp.sum(a * b, axis=-1)


def layersync_loss(h_weak: Array, h_strong: Array, stop_gradient: bool = True) -> Array:
    """-cos(h_weak, sg(h_strong)) per token, averaged over batch and tokens; inputs (N, T, D)."""
    if h_weak.shape != h_strong.shape:
        raise ValueError(f"LayerSync features differ in shape: {h_weak.shape} vs {h_strong.shape}")
    if stop_gradient:
        h_strong = jax.lax.stop_gradient(h_strong)
    return -jnp.mean(cosine_similarity(h_weak, h_strong))


def default_pair(depth: int) -> tuple[int, int]:
    """The paper's 8 -> 16 of 28 blocks, scaled to `depth`: weak = round(2 D / 7), strong = round(4 D / 7).

    Both are clamped so that 1 <= weak < strong <= depth (depth 12 gives 3 -> 7, depth 24 gives
    7 -> 14, depth 28 gives 8 -> 16). Needs depth >= 2.
    """
    if depth < 2:
        raise ValueError(f"LayerSync needs a model with at least 2 blocks, got depth={depth}")
    weak = min(max(1, round(PAPER_WEAK * depth / PAPER_DEPTH)), depth - 1)
    strong = min(max(weak + 1, round(PAPER_STRONG * depth / PAPER_DEPTH)), depth)
    return weak, strong


def validate_pairs(pairs: Sequence[Sequence[Any]], depth: int, key: str) -> tuple[tuple[int, int, float], ...]:
    """Check (weak, strong, weight) triples against a model of `depth` blocks; raise ValueError naming `key`."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or len(pairs) == 0:
        raise ValueError(f"{key} must be a non-empty list of (weak, strong, weight), got {pairs!r}")
    out = []
    for i, pair in enumerate(pairs):
        where = f"{key}[{i}]"
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 3:
            raise ValueError(f"{where} must be (weak_block, strong_block, weight), got {pair!r}")
        weak, strong, weight = pair
        for name, value in (("weak", weak), ("strong", strong)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value:
                raise ValueError(f"{where}: {name} block {value!r} is not an integer")
            if not 1 <= int(value) <= depth:
                raise ValueError(f"{where}: {name} block {value} is outside 1..{depth} (blocks are 1-indexed)")
        if int(weak) >= int(strong):
            raise ValueError(
                f"{where}: weak block {weak} must come before strong block {strong} "
                "(the strong, deeper block guides the weak one; a block aligned to itself is a no-op)"
            )
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not weight > 0:
            raise ValueError(f"{where}: weight must be a positive number, got {weight!r}")
        out.append((int(weak), int(strong), float(weight)))
    if len({(w, s) for w, s, _ in out}) != len(out):
        raise ValueError(f"{key} lists the same (weak, strong) pair twice: {pairs!r}")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class LayerSync:
    """The LayerSync regulariser over validated (weak, strong, weight) pairs (1-indexed blocks)."""

    pairs: tuple[tuple[int, int, float], ...]
    stop_gradient: bool = True
    name: str = "layersync"

    @property
    def features_needed(self) -> tuple[str, ...]:
        return tuple(sorted({block_name(b) for w, s, _ in self.pairs for b in (w, s)}))

    def __call__(self, features: Mapping[str, Array], batch: Mapping[str, Any]) -> tuple[Array, dict[str, Array]]:
        total = jnp.zeros((), jnp.float32)
        metrics = {}
        for weak, strong, weight in self.pairs:
            reg = layersync_loss(features[block_name(weak)], features[block_name(strong)], self.stop_gradient)
            metrics[f"{self.name}/block{weak}_block{strong}"] = reg
            total = total + weight * reg
        return total, metrics


CONFIG_KEYS = ("pairs", "auto_weight", "stop_gradient")


@register_regularizer("layersync")
def build_layersync(cfg: Mapping[str, Any], *, depth: int, prefix: str = "objective.layersync") -> LayerSync:
    """From config: `pairs` is a list of (weak, strong, weight), or None for the paper's pair scaled
    to `depth` (`default_pair`) with weight `auto_weight` (default 0.2); `stop_gradient` defaults
    to True."""
    check_keys(cfg, CONFIG_KEYS, prefix)
    pairs = cfg.get("pairs")
    if pairs is None:
        weak, strong = default_pair(depth)
        weight = cfg.get("auto_weight")
        pairs = ((weak, strong, PAPER_WEIGHT if weight is None else weight),)
    return LayerSync(validate_pairs(pairs, depth, f"{prefix}.pairs"), bool(cfg.get("stop_gradient", True)))
