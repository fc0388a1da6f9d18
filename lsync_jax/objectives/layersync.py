"""LayerSync: the network's semantically strong block guides its weaker blocks.

Per token, reg = -cos(h_weak, stop_gradient(h_strong)) over channels, averaged over tokens and
batch; features are the raw residual-stream outputs of the blocks (no projector, no extra norm).
Unlike the official multi-pair mode (which keeps only the last pair), every (weak, strong, weight)
pair contributes weight * reg to the loss.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp

from lsync_jax.models.sit import block_name
from lsync_jax.objectives.registry import register_regularizer

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


def layersync_loss(h_weak: Array, h_strong: Array, stop_gradient: bool = True,
                   token_mask: Array | None = None) -> Array:
    """-cos(h_weak, sg(h_strong)) per token, averaged over batch and tokens; inputs (N, T, D). With
    `token_mask` (N, T) (padded sequences), over the real tokens only."""
    if h_weak.shape != h_strong.shape:
        raise ValueError(f"LayerSync features differ in shape: {h_weak.shape} vs {h_strong.shape}")
    if stop_gradient:
        h_strong = jax.lax.stop_gradient(h_strong)
    cos = cosine_similarity(h_weak, h_strong)
    if token_mask is None:
        return -jnp.mean(cos)
    weight = token_mask.astype(cos.dtype)
    return -jnp.sum(cos * weight) / jnp.maximum(jnp.sum(weight), 1.0)


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
    spans_batch: ClassVar[bool] = False  # a mean of per-example (per-token) terms

    @property
    def features_needed(self) -> tuple[str, ...]:
        return tuple(sorted({block_name(b) for w, s, _ in self.pairs for b in (w, s)}))

    def __call__(self, features: Mapping[str, Array], batch: Mapping[str, Any]) -> tuple[Array, dict[str, Array]]:
        total = jnp.zeros((), jnp.float32)
        metrics = {}
        for weak, strong, weight in self.pairs:
            reg = layersync_loss(features[block_name(weak)], features[block_name(strong)], self.stop_gradient,
                                 batch.get("token_mask"))
            metrics[f"{self.name}/block{weak}_block{strong}"] = reg
            total = total + weight * reg
        return total, metrics


# --- Automatic pairs: the rule, on per-block measurements ---------------------------------------

AUTO = "auto"


def is_auto(pairs: Any) -> bool:
    """`pairs='auto'` (the command line gives ('auto',) for the tuple-typed config field)."""
    return pairs == AUTO or (isinstance(pairs, Sequence) and not isinstance(pairs, str) and tuple(pairs) == (AUTO,))


def middle_band(depth: int, middle: tuple[float, float] = (0.25, 0.75)) -> tuple[int, int]:
    """The blocks a strong block is looked for in: ceil(lo D) .. floor(hi D), never block 1 (a strong
    block needs a block before it); the whole of 2..D when that leaves nothing."""
    lo, hi = middle
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"the middle band must satisfy 0 <= lo <= hi <= 1, got {middle}")
    first, last = max(2, math.ceil(lo * depth)), min(depth, math.floor(hi * depth))
    return (first, last) if first <= last else (2, depth)


def select_pairs(probe_accuracy: Sequence[float], *, middle: tuple[float, float] = (0.25, 0.75), rise: float = 0.5,
                 num_weak: int = 1, weight: float = PAPER_WEIGHT) -> tuple[tuple[tuple[int, int, float], ...], dict]:
    """LayerSync pairs from per-block linear-probe accuracy (block 1 first); returns (pairs, why).

    The rule:
    1. strong s = the block of highest probe accuracy in the middle band (`middle_band`: blocks
       ceil(D/4)..floor(3D/4) by default), ties to the shallower block. The paper finds the
       semantic peak of a diffusion transformer in its middle; the last blocks turn back towards
       predicting velocity, so a peak there is not used to guide (and would leave no block after
       it to benefit from a stronger input).
    2. weak w = the deepest block before s that has made at most `rise` of the probe accuracy's
       climb to s: acc(w) <= acc(s) - rise * (acc(s) - min_{b<s} acc(b)); with `num_weak` > 1, the
       `num_weak` deepest such blocks. The deepest clearly weaker block is guided, not block 1:
       the earliest blocks carry the low-level detail velocity prediction needs, and a nearer
       block is easier to align. For a probe curve that climbs evenly from block 1 to s, the
       default rise = 0.5 gives w = s / 2, the paper's 8 -> 16.
    3. If no block before s is weaker than s (the measurements do not show the premise), the pair
       falls back to the paper's, scaled to the depth (`default_pair`), and `why['fallback']` says so.
    Every returned pair has 1 <= weak < strong <= D and weight `weight`.
    """
    acc = [float(a) for a in probe_accuracy]
    depth = len(acc)
    if depth < 2:
        raise ValueError(f"LayerSync pairs need at least 2 blocks of measurements, got {depth}")
    if not all(math.isfinite(a) for a in acc):
        raise ValueError(f"probe accuracies must be finite numbers, got {acc}")
    if not 0.0 < rise <= 1.0:
        raise ValueError(f"rise must lie in (0, 1], got {rise}")
    if int(num_weak) < 1:
        raise ValueError(f"num_weak must be >= 1, got {num_weak}")
    first, last = middle_band(depth, middle)
    strong = max(range(first, last + 1), key=lambda b: (acc[b - 1], -b))
    floor = min(acc[: strong - 1])
    threshold = acc[strong - 1] - rise * (acc[strong - 1] - floor)
    below = [w for w in range(strong - 1, 0, -1) if acc[w - 1] <= threshold]
    fallback = acc[strong - 1] <= floor
    if fallback:
        weak_default, strong = default_pair(depth)
        weak = [weak_default]
    else:
        weak = sorted(below[: int(num_weak)])
    pairs = tuple((w, strong, float(weight)) for w in weak)
    why = {"rule": f"strong = best probe accuracy in blocks {first}..{last}; weak = the {int(num_weak)} deepest "
                   f"block(s) before it with accuracy <= acc(strong) - {rise} * (acc(strong) - min before it)",
           "strong": strong, "weak": weak, "band": [first, last], "threshold": threshold,
           "strong_accuracy": acc[strong - 1], "weak_accuracy": [acc[w - 1] for w in weak],
           "fallback": bool(fallback), "probe_accuracy": acc}
    return validate_pairs(pairs, depth, "selected pairs"), why


# How `pairs='auto'` measures and chooses (lsync_jax.recipes.auto_pairs; the rule is `select_pairs`).
SELECTION_DEFAULTS: dict[str, Any] = dict(warmup_steps=10_000, num_samples=2048, t_values=(0.25, 0.5, 0.75),
                                          batch_size=256, seed=0, middle=(0.25, 0.75), rise=0.5, num_weak=1,
                                          condition="null")
# pairs=None: the paper's block 8 -> 16 of 28 scaled to the depth, weight auto_weight.
DEFAULTS: dict[str, Any] = dict(pairs=None, auto_weight=PAPER_WEIGHT, stop_gradient=True,
                                selection=SELECTION_DEFAULTS)


@register_regularizer("layersync", DEFAULTS)
def build_layersync(cfg: Mapping[str, Any], *, depth: int, prefix: str = "objective.layersync") -> LayerSync:
    """From config: `pairs` is a list of (weak, strong, weight), or None for the paper's pair scaled
    to `depth` (`default_pair`) with weight `auto_weight` (default 0.2); `stop_gradient` defaults
    to True. `pairs='auto'` is measured and resolved by the training loop
    (`lsync_jax.recipes.auto_pairs`, settings in `selection`) before the objective is built."""
    pairs = cfg["pairs"]
    if is_auto(pairs):
        raise ValueError(f"{prefix}.pairs='auto' is chosen from measurements by the training loop "
                         "(lsync_jax.recipes.auto_pairs.resolve_pairs) before the objective is built")
    if pairs is None:
        weak, strong = default_pair(depth)
        pairs = ((weak, strong, cfg["auto_weight"]),)
    return LayerSync(validate_pairs(pairs, depth, f"{prefix}.pairs"), bool(cfg["stop_gradient"]))
