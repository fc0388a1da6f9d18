"""Networks: the SiT/DiT and U-ViT backbones and their named configurations.

`get_model('SiT-XL/2', depth=..., ...)` builds one of the twelve official configurations with
overrides named as the official code names them (REPA's for its projectors: `z_dims`,
`encoder_depth`, `projector_dim`). The same sizes over other inputs share the image SiT's blocks
and options: `SiT-Seq-B/1` (1-D sequences (N, L, C), patches of 1 step; `input_size` is L) and
`SiT-Video-S/2x8` (video (N, F, H, W, C), patches of 2 frames x 8 x 8; `num_frames` is F).
`get_model('UViT-H/2', skip_scaling='cs', ...)` builds a U-ViT of the paper's sizes (its `depth`
counts every block: in-blocks + mid + out-blocks) with ScaleLong's long-skip scaling.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar, Protocol, runtime_checkable

from lsync_jax.models.layers import ATTENTION_IMPLS, check_layout, remat_policy
from lsync_jax.models.projector import PROJECTOR_FIELDS, check_projector_fields, projection_name
from lsync_jax.models.sit import SiT, SiTSequence, SiTVideo, block_name
from lsync_jax.models.uvit import UViT


@runtime_checkable
class Backbone(Protocol):
    """What the engine, the evaluation and the builders read of a network: SiT, SiT-Seq, SiT-Video and
    U-ViT declare it. `kind` is the input it takes ('image' (N, H, W, C), 'video' (N, F, H, W, C) or
    'sequence' (N, L, C)); `init_inputs` the zero (x, t, y) of its configured shape; `patch_shape` the
    patch along each input axis; `null_label` the unconditional input of guidance. Its blocks sow their
    outputs as `block_name(i)` for i in 1..depth (and REPA's projections as `projection_name(k)`)."""

    kind: ClassVar[str]
    depth: int
    hidden_size: int
    num_heads: int
    input_size: int
    in_channels: int
    num_classes: int
    dtype: Any
    attention_impl: str
    layout: str

    @property
    def patch_shape(self) -> tuple[int, ...]: ...

    @property
    def null_label(self) -> int: ...

    def init_inputs(self, batch_size: int = 1) -> tuple[Any, Any, Any]: ...


# depth / hidden_size / num_heads of the official sizes.
SIZES: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
PATCH_SIZES = (2, 4, 8)
MODEL_NAMES: tuple[str, ...] = tuple(f"SiT-{s}/{p}" for s in SIZES for p in PATCH_SIZES)
# Sequences: patches of 1, 2, 4 or 8 steps; video: (temporal, spatial) patches.
SEQUENCE_PATCHES = (1, 2, 4, 8)
VIDEO_PATCHES = tuple((a, p) for a in (1, 2, 4) for p in PATCH_SIZES)
SEQUENCE_MODEL_NAMES: tuple[str, ...] = tuple(f"SiT-Seq-{s}/{p}" for s in SIZES for p in SEQUENCE_PATCHES)
VIDEO_MODEL_NAMES: tuple[str, ...] = tuple(f"SiT-Video-{s}/{a}x{p}" for s in SIZES for a, p in VIDEO_PATCHES)
# What the sequence and video models take besides the image SiT's overrides.
CONDITIONING_OVERRIDES = ("num_tags", "tag_dropout_prob")
VIDEO_OVERRIDES = ("num_frames",)

# Overrides every backbone takes (U-ViT refuses learn_sigma=True and z_dims by name).
SHARED_OVERRIDES = (
    "depth",
    "hidden_size",
    "num_heads",
    "input_size",
    "in_channels",
    "num_classes",
    "learn_sigma",
    "class_dropout_prob",
    "mlp_ratio",
    "z_dims",
)
# SiT's overrides named as in the official constructor (REPA's switch: PROJECTOR_FIELDS), plus our compute options.
OFFICIAL_OVERRIDES = SHARED_OVERRIDES + tuple(f for f in PROJECTOR_FIELDS if f not in SHARED_OVERRIDES) + (
    # muP (the muP-DiT code's parametrisation; its `output_mult` and base shapes, see models/mup.py)
    "parametrization",
    "mup_base_width",
    "output_multiplier",
    # DiverseDiT's long residuals and DDAE++ self-conditioning (models/rerouting.py)
    "long_skips",
    "self_condition",
    "self_condition_stop_gradient",
)
# How the model computes, not what: a resume may change them (workdir.check_compatible).
COMPUTE_OVERRIDES = ("dtype", "attention_impl", "remat", "layout")

# U-ViT's sizes (Bao et al., Table 1; the official configs' `depth` + 1): total blocks / hidden /
# heads. Patch 2 for CIFAR-10 (S/2) and 32x32x4 ImageNet-256 latents (L/2, H/2), 4 at 64 px.
UVIT_SIZES: dict[str, dict[str, int]] = {
    "S": dict(depth=13, hidden_size=512, num_heads=8),
    "S-Deep": dict(depth=17, hidden_size=512, num_heads=8),
    "M": dict(depth=17, hidden_size=768, num_heads=12),
    "L": dict(depth=21, hidden_size=1024, num_heads=16),
    "H": dict(depth=29, hidden_size=1152, num_heads=16),
}
UVIT_MODEL_NAMES: tuple[str, ...] = tuple(f"UViT-{s}/{p}" for s in UVIT_SIZES for p in PATCH_SIZES)
UVIT_OVERRIDES = SHARED_OVERRIDES + (
    "mlp_time_embed",
    "pos_embed",
    "final_conv",
    "skip_scaling",
    "skip_kappa",
    "ls_shared",
)


def model_class(name: str) -> type:
    """The module class of a named model."""
    if name in UVIT_MODEL_NAMES:
        return UViT
    if name in SEQUENCE_MODEL_NAMES:
        return SiTSequence
    if name in VIDEO_MODEL_NAMES:
        return SiTVideo
    return SiT


def _allowed(cls: type) -> tuple[str, ...]:
    if cls is UViT:
        return UVIT_OVERRIDES + COMPUTE_OVERRIDES
    extra = CONDITIONING_OVERRIDES + (VIDEO_OVERRIDES if cls is SiTVideo else ())
    return OFFICIAL_OVERRIDES + extra + COMPUTE_OVERRIDES


def model_config(name: str) -> dict[str, int]:
    """The architecture fields (depth, hidden_size, num_heads, patch sizes) of a named model."""
    if name in SEQUENCE_MODEL_NAMES:
        size, patch = name[len("SiT-Seq-") :].split("/")
        return dict(SIZES[size], patch_size=int(patch))
    if name in VIDEO_MODEL_NAMES:
        size, patch = name[len("SiT-Video-") :].split("/")
        temporal, spatial = patch.split("x")
        return dict(SIZES[size], temporal_patch=int(temporal), patch_size=int(spatial))
    if name in UVIT_MODEL_NAMES:
        size, patch = name[len("UViT-") :].split("/")
        return dict(UVIT_SIZES[size], patch_size=int(patch))
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; expected one of {', '.join(MODEL_NAMES + UVIT_MODEL_NAMES)}, "
                         "SiT-Seq-<S|B|L|XL>/<1|2|4|8> or SiT-Video-<S|B|L|XL>/<1|2|4>x<2|4|8>")
    size, patch = name[len("SiT-") :].split("/")
    return dict(SIZES[size], patch_size=int(patch))


def override_types(name: str) -> dict[str, type]:
    """Every field the named model takes as an override, with its plain type (int, float, bool, str,
    tuple; dtypes are given as strings): derived from the model class, so configs list every switch
    without a hand-copied list. The size and patch fields come from the name."""
    model_config(name)  # an unknown name fails here
    cls = model_class(name)
    allowed = _allowed(cls)
    hints = typing.get_type_hints(cls)
    types = {}
    for field in dataclasses.fields(cls):
        if field.name in allowed:
            hint = hints[field.name]
            origin = typing.get_origin(hint) or hint
            types[field.name] = origin if origin in (int, float, bool, str, tuple) else str
    missing = sorted(set(allowed) - set(types))
    if missing:  # the override lists below and the model's fields must agree
        raise TypeError(f"{cls.__name__} has no field(s) {missing} that get_model accepts")
    return types


def get_model(name: str, **overrides: Any) -> SiT:
    """Build the named SiT (e.g. 'SiT-XL/2', 'SiT-Seq-B/1', 'SiT-Video-S/2x8'); overrides replace the
    official defaults.

    Raises ValueError for an unknown name, an unknown override or an inconsistent shape
    (hidden_size not divisible by num_heads or by 4, non-positive sizes), before any compile.
    U-ViT names go to `get_uvit`.
    """
    if name in UVIT_MODEL_NAMES:
        return get_uvit(name, **overrides)
    cls = model_class(name)
    allowed = _allowed(cls)
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown model override(s) {unknown} for {name}; allowed: {', '.join(allowed)}")
    # the class's own defaults, then the named size, then the overrides: every field present below
    fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name in allowed}
    fields.update(model_config(name))
    fields.update(overrides)
    for key in ("depth", "hidden_size", "num_heads", "input_size", "in_channels"):
        if int(fields[key]) < 1:
            raise ValueError(f"model.{key} must be positive, got {fields[key]}")
    if fields["hidden_size"] % fields["num_heads"]:
        raise ValueError(
            f"model.hidden_size={fields['hidden_size']} is not divisible by model.num_heads={fields['num_heads']}"
        )
    if fields["hidden_size"] % 4:
        raise ValueError(f"model.hidden_size={fields['hidden_size']} must be a multiple of 4 (2-D sin-cos positions)")
    if fields["num_classes"] < 0:
        raise ValueError(f"model.num_classes must be >= 0, got {fields['num_classes']}")
    prob = fields["class_dropout_prob"]
    if not 0.0 <= prob < 1.0:
        raise ValueError(f"model.class_dropout_prob must be in [0, 1), got {prob}")
    if fields["attention_impl"] not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl={fields['attention_impl']!r}; expected one of {ATTENTION_IMPLS}")
    check_layout(fields["layout"])
    fields["remat"] = remat_policy(fields["remat"])
    check_projector_fields(fields)  # REPA's projectors (models/projector.py)
    if cls is not SiT:
        for key in ("num_tags", "num_frames"):
            low = 1 if key == "num_frames" else 0
            if key in fields and (isinstance(fields[key], bool) or int(fields[key]) < low):
                raise ValueError(f"model.{key} must be {'positive' if key == 'num_frames' else '>= 0'}, "
                                 f"got {fields[key]}")
        if fields["num_tags"] and fields["num_classes"]:
            raise ValueError(f"model.num_tags={fields['num_tags']} and model.num_classes={fields['num_classes']}: a "
                             "model conditions on tags or on class labels; set num_classes=0 for tags")
        if not 0.0 <= fields["tag_dropout_prob"] < 1.0:
            raise ValueError(f"model.tag_dropout_prob must be in [0, 1), got {fields['tag_dropout_prob']}")
    return cls(**fields)


def get_uvit(name: str, **overrides: Any) -> UViT:
    """Build the named U-ViT (e.g. 'UViT-H/2'); overrides replace its size and `UViT`'s defaults.

    Raises ValueError for an unknown override; `UViT` itself rejects bad values (even depth,
    skip_kappa outside [0.5, 0.95], unknown skip_scaling, ...) naming the field, before any compile.
    """
    fields = model_config(name)
    allowed = UVIT_OVERRIDES + COMPUTE_OVERRIDES
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown model override(s) {unknown} for {name}; allowed: {', '.join(allowed)}")
    fields.update(overrides)
    if "z_dims" in fields:
        fields["z_dims"] = tuple(fields["z_dims"])
    if "remat" in fields:
        fields["remat"] = remat_policy(fields["remat"])
    return UViT(**fields)


__all__ = ["Backbone", "SiT", "SiTSequence", "SiTVideo", "UViT", "get_model", "model_class", "SEQUENCE_MODEL_NAMES",
           "VIDEO_MODEL_NAMES", "get_uvit", "model_config", "block_name", "projection_name", "MODEL_NAMES",
           "SIZES", "UVIT_MODEL_NAMES", "UVIT_SIZES", "override_types"]
