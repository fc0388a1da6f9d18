"""muP (maximal update parametrisation) for SiT: which parameters are hidden matrices, and their
Adam learning-rate factors.

As microsoft/mup's `set_base_shapes` + `MuAdam` (the muP-DiT code, ML-GSAI, trains with them): a
dimension is "infinite" when it grows with the width, found by comparing every parameter's shape
with the same model at the base width. Parameters with two infinite dimensions are hidden matrices
(attention qkv/proj, MLP, adaLN modulation, the timestep MLP's second Linear); their Adam step is
divided by the width multiplier of their fan-in. Everything else (patch and label embeddings, the
timestep MLP's first Linear, the readout, biases, REPA projectors) keeps the base learning rate.
The forward side (initialisers, readout multiplier) is in `layers.py` / `sit.py`; this module is
the one place that decides which leaves are hidden matrices.
"""

from __future__ import annotations

from typing import Any

import jax

from lsync_jax.models.layers import PARAMETRIZATIONS


def check_parametrization(parametrization: str, hidden_size: int, num_heads: int, base_width: int,
                          output_multiplier: float) -> None:
    """Raise a ValueError naming the field for muP settings the model cannot take.

    Width grows by heads at a fixed head dimension, so the base width must be a whole number of
    heads (and a multiple of 4, for the base model's 2-D sin-cos positions)."""
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"model.parametrization={parametrization!r}; expected one of {PARAMETRIZATIONS}")
    if parametrization != "mup":
        return
    head_dim = hidden_size // num_heads
    if base_width < 1 or base_width % head_dim or base_width % 4:
        raise ValueError(f"model.mup_base_width={base_width} must be a positive multiple of the head dimension "
                         f"{head_dim} (hidden_size={hidden_size} / num_heads={num_heads}) and of 4")
    if not output_multiplier > 0:
        raise ValueError(f"model.output_multiplier must be positive, got {output_multiplier}")


def width_multiplier(model: Any) -> float:
    """hidden_size / mup_base_width: how much wider than its base the model is."""
    return model.hidden_size / model.mup_base_width


def base_model(model: Any) -> Any:
    """The same model at its base width (same head dimension, fewer heads)."""
    head_dim = model.hidden_size // model.num_heads
    return model.clone(hidden_size=model.mup_base_width, num_heads=model.mup_base_width // head_dim)


def param_shapes(model: Any) -> Any:
    """The model's parameter shapes, traced on a one-token input (shapes do not depend on it)."""
    small = model.clone(input_size=model.patch_size)
    return jax.eval_shape(lambda: small.init(jax.random.key(0), *small.init_inputs(1)))["params"]


def fan_in_multiplier(shape: tuple[int, ...], base_shape: tuple[int, ...]) -> float:
    """muP's Adam factor for one parameter: base fan-in / fan-in for a hidden matrix, else 1.

    Kernels are (..., fan_in, fan_out), so a hidden matrix is one whose last two axes, and only
    those, grow with the width (microsoft/mup's `ninf() == 2`, its fan-in as the width multiplier)."""
    infinite = [i for i, (a, b) in enumerate(zip(shape, base_shape)) if a != b]
    if len(infinite) < 2:
        return 1.0
    if infinite != [len(shape) - 2, len(shape) - 1]:
        raise ValueError(f"a parameter of shape {shape} (base {base_shape}) grows with the width along axes "
                         f"{infinite}; muP here handles only (fan_in, fan_out) kernels in the last two axes")
    return base_shape[-2] / shape[-2]


def mup_lr_multipliers(model: Any, params_shapes: Any = None) -> Any:
    """Per-parameter Adam learning-rate factors (a pytree like the params), or None for 'sp'.

    `params_shapes`: the model's parameter tree (arrays or ShapeDtypeStructs); traced when None."""
    if getattr(model, "parametrization", "sp") != "mup":
        return None
    check_parametrization(model.parametrization, model.hidden_size, model.num_heads, model.mup_base_width,
                          model.output_multiplier)
    shapes = param_shapes(model) if params_shapes is None else params_shapes
    if model.hidden_size == model.mup_base_width:  # every multiplier is 1 at the base width
        return jax.tree.map(lambda _: 1.0, shapes)
    base = param_shapes(base_model(model))
    return jax.tree.map(lambda p, b: fan_in_multiplier(tuple(p.shape), tuple(b.shape)), shapes, base)
