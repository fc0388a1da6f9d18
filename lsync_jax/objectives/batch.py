"""The batch: the one declared set of keys a training batch may hold, and who fills each.

A batch is a dict of arrays (a pytree that jit takes as it is), typed `Batch`. It is the objective's
input (`objective_loss(params, apply_fn, batch, ...)`, the regularisers' `reg(features, batch)`), so it is
declared here, beside the objective; the data layer fills most of it but sits below `objectives` (and
`configs` imports `objectives`, so this module imports nothing heavier than `typing`). The places that
build a batch go through `make_batch`, which refuses a key that is not declared (a KeyError naming it):
`objective_loss` (at trace time, so every key set that reaches the train step is checked once per
compile, whatever filled it), its regularisers' batch, and the encoder's `add_to`. A misspelt key fails
where it is written instead of being silently ignored downstream; tests/test_batch_contract.py checks
every key read or written on a batch anywhere in the package's source.

| field              | filled by                                                                     |
|--------------------|-------------------------------------------------------------------------------|
| `x`                | data: every source's example (images in [-1, 1], scaled latents, sequences,    |
|                    | video), float32 (N, *axes, C)                                                 |
| `y`                | data: int32 (N,) class labels (0 where the data has none)                     |
| `tags`             | data: sequence shards with tags, float32 multi-hot (N, num_tags)              |
| `mask`             | data: padded sequences (HumanML3D, sequence shards), bool (N, L), True = real |
| `image`            | data: the loader field 'image', uint8 (N, H, W, C), for an encoder run beside |
|                    | the step; `train/encoders.py` replaces it with `encoder_features`             |
| `encoder_features` | `train/encoders.py` (`EncoderFeatures.add_to`, from `image`), or data (latent |
|                    | shards with precomputed tokens): float32 (N, T, D), REPA's target             |
| `step`             | `objectives/objective.py` (`objective_loss`): the optimizer step, for         |
|                    | scheduled weights; in the regularisers' batch only                            |
| `token_mask`       | `objectives/objective.py`, copied from the model's sown 'token_mask': bool    |
|                    | (N, T), real tokens of padded sequences; in the regularisers' batch only      |
"""

# No `from __future__ import annotations`: TypedDict reads Required[...] from evaluated annotations.
from typing import Any, Mapping, Required, TypedDict


class Batch(TypedDict, total=False):
    """A training batch; see the module docstring for each field's shape and who fills it."""

    x: Required[Any]
    y: Required[Any]
    tags: Any
    mask: Any
    image: Any
    encoder_features: Any
    step: Any
    token_mask: Any


FIELDS: frozenset[str] = Batch.__required_keys__ | Batch.__optional_keys__
FILLED_BY: dict[str, str] = {
    "x": "data", "y": "data", "tags": "data", "mask": "data", "image": "data",
    "encoder_features": "train/encoders.py (or data: precomputed in latent shards)",
    "step": "objectives/objective.py", "token_mask": "objectives/objective.py (sown by the model)",
}


def check_fields(keys: Any, where: str) -> None:
    """Raise a KeyError naming any key in `keys` that `Batch` does not declare."""
    unknown = sorted(set(keys) - FIELDS)
    if unknown:
        raise KeyError(f"{where} puts undeclared key(s) {unknown} into a batch; a batch holds "
                       f"{sorted(FIELDS)} (lsync_jax.objectives.batch.Batch)")


def make_batch(fields: Mapping[str, Any], where: str) -> Batch:
    """`fields` as a `Batch` (a new dict), refusing undeclared keys (`where` names the caller in the error)."""
    check_fields(fields, where)
    return Batch(**fields)
