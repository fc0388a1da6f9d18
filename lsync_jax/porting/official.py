"""Official PyTorch SiT, LayerSync and REPA checkpoints -> `lsync_jax.models.SiT` params.

Files considered (the official code was read for names and layout, not copied):
- willisma/SiT: the released `SiT-XL-2-256x256.pt` (a raw EMA state dict) and the checkpoints of
  its train.py, {"model", "ema", "opt", "args"}.
- vita-epfl/LayerSync: SiT's model code with the same parameter names (it only returns more from
  the forward), SiT's transport and time convention, the same checkpoint dict.
- sihyun-yu/REPA: SiT plus `projectors.{k}.{0,2,4}` (Linear D -> projector_dim -> projector_dim ->
  z_dim with SiLU between, reading the output of block `encoder_depth`), no learn_sigma; train.py
  saves {"model", "ema", "opt", "args", "steps"}, the released `last.pt` is a raw state dict. Its
  older layout (`decoder_blocks.{j}` = `blocks.{j + encoder_depth}`) is renamed as REPA's
  `load_legacy_checkpoints` does. Its `--qk-norm` option (LayerNorms inside attention) is not
  implemented here: such files are refused.

Layout: a Linear weight (out, in) becomes a kernel (in, out), the patch embedding's Conv2d OIHW
becomes HWIO, the label table is kept. Both codes read the final Linear's output features in
(p, q, c) order (official: reshape to (N, h, w, p, p, c), then 'nhwpqc->nchpwq'; ours:
'n (h w) (p q c) -> n (h p) (w q) c'), so it maps without a permutation. `pos_embed` is a frozen
buffer; it must equal our fixed sin-cos table.

Time conventions. SiT and LayerSync: t = 1 is data, x_t = t x + (1 - t) eps, v = x - eps, as in
lsync-jax: weights map one to one. REPA: t_R = 0 is data, x_t = (1 - t_R) x + t_R eps, v_R = eps - x;
with t = 1 - t_R this is the same x_t and v = -v_R. The converter folds that into the weights, so
that the result is a plain lsync-jax model with ours(x, t, y) = -REPA(x, 1 - t, y):
- the timestep features [cos(f t) | sin(f t)] of t_R = 1 - t are a fixed linear map M of those of t
  (cos f(1 - t) = cos f cos ft + sin f sin ft, sin f(1 - t) = sin f cos ft - cos f sin ft: one
  reflection per frequency), so t_embedder's first kernel K becomes M^T K;
- the velocity outputs of the final Linear (kernel columns and bias) are negated.
Block outputs and REPA's projections are unchanged: ours at t equal REPA's at 1 - t.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import pickle
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lsync_jax import storage
from lsync_jax.models import get_model, model_config
from lsync_jax.models.layers import sincos_2d, timestep_frequencies
from lsync_jax.models.sit import SiT
from lsync_jax.porting.vae import read_state_file

CONVENTIONS = ("auto", "sit", "repa")
CHECKPOINT_KEYS = ("ema", "model")
# Added by DistributedDataParallel and torch.compile when a wrapped model's state dict is saved.
_PREFIXES = ("module.", "_orig_mod.")
# REPA's projector MLP is a torch Sequential: Linear at 0, 2, 4 (SiLU between); ours fc_0, fc_1, fc_2.
_PROJECTOR_LINEARS = (0, 2, 4)
# The official class_dropout_prob (SiT, LayerSync and REPA all build the label table with it).
_OFFICIAL_LABEL_DROPOUT = 0.1
# SiT's transport names -> ours (REPA's 'cosine' path, in our time, is SiT's GVP).
_PATHS = {"linear": "linear", "gvp": "gvp", "vp": "vp", "cosine": "gvp"}
_PREDICTIONS = {"velocity": "velocity", "v": "velocity", "score": "score", "noise": "noise"}


@dataclasses.dataclass(frozen=True)
class OfficialCheckpoint:
    """A state dict read from an official file: float32 arrays by official name (prefixes stripped),
    which entry it came from ('ema', 'model' or 'state dict') and the training args saved with it."""

    state: dict[str, np.ndarray]
    source: str
    args: dict[str, Any]


def _require_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading PyTorch .pt/.pth checkpoints needs torch: pip install torch (the CPU wheel is "
                          "enough)") from e
    return torch


def _to_numpy(key: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (bf16/fp16 included)
        value = value.detach().cpu().float().numpy()
    if not isinstance(value, np.ndarray):
        raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
    return value.astype(np.float32, copy=False)


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def unwrap_checkpoint(obj: Mapping[str, Any], which: str = "ema") -> OfficialCheckpoint:
    """A raw state dict, or a training checkpoint {"model", "ema", ...} of which entry `which` is
    taken -> OfficialCheckpoint (float32 numpy arrays, `module.`/`_orig_mod.` prefixes stripped)."""
    if which not in CHECKPOINT_KEYS:
        raise ValueError(f"which={which!r}; expected one of {CHECKPOINT_KEYS}")
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict or a training checkpoint dict, got a {type(obj).__name__}")
    args: Any = {}
    if any(isinstance(obj.get(k), Mapping) for k in CHECKPOINT_KEYS):
        if not isinstance(obj.get(which), Mapping):
            raise ValueError(f"the checkpoint has no {which!r} entry (it has {sorted(obj)}); pick another with which=")
        state, source, args = obj[which], which, obj.get("args") or {}
    else:
        state, source = obj, "state dict"
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        name = _strip_prefixes(key)
        if name in out:
            raise ValueError(f"two entries map to {name!r} once the {_PREFIXES} prefixes are stripped")
        out[name] = _to_numpy(key, value)
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return OfficialCheckpoint(out, source, args)


def read_checkpoint(path: str, which: str = "ema", allow_pickle: bool = False) -> OfficialCheckpoint:
    """Read an official .pt/.pth (torch, weights_only unless `allow_pickle`) or .safetensors file."""
    if storage.is_remote(path):
        if not storage.isfile(path):
            raise FileNotFoundError(f"checkpoint {path} not found")
        with storage.local_copy(path) as local:
            return read_checkpoint(local, which, allow_pickle)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.endswith(".safetensors"):
        return unwrap_checkpoint(read_state_file(path), which)
    torch = _require_torch()
    # Training checkpoints also hold the run's argparse.Namespace ("args"): allowed, and read for hints
    # (torch.serialization.safe_globals is torch >= 2.5; older versions refuse such files without allow_pickle).
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    try:
        with safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext():
            obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds Python objects other than tensors and training args, which "
                         "torch.load(weights_only=True) refuses; if you trust the file, pass allow_pickle=True "
                         f"(--allow_pickle). torch said: {str(e).splitlines()[0]}") from e
    return unwrap_checkpoint(obj, which)


def detect_convention(state: Mapping[str, Any]) -> str:
    """'repa' when the state dict has REPA's projectors, else 'sit' (SiT and LayerSync)."""
    return "repa" if any(k.startswith("projectors.") for k in state) else "sit"


def _need(state: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    if key not in state:
        raise ValueError(f"the checkpoint has no {key!r}: not an official SiT/LayerSync/REPA state dict "
                         f"(first keys: {sorted(state)[:5]})")
    return state[key]


def _indices(state: Mapping[str, Any], prefix: str) -> list[int]:
    return sorted({int(k.split(".")[1]) for k in state if k.startswith(prefix) and k.split(".")[1].isdigit()})


def _check_field(name: str, inferred: Any, overrides: Mapping[str, Any], evidence: str) -> None:
    given = overrides.get(name)
    if name in overrides and (tuple(given) if isinstance(given, (list, tuple)) else given) != inferred:
        raise ValueError(f"{name}={overrides[name]!r} was given but the checkpoint has {name}={inferred!r} "
                         f"({evidence})")


def _drop(state: dict[str, np.ndarray], prefix: str) -> None:
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]


def _label_fields(state: Mapping[str, np.ndarray], overrides: Mapping[str, Any]) -> tuple[int, float]:
    """(num_classes, class_dropout_prob): the label table has a null row iff class_dropout_prob > 0
    (the official 0.1 unless told otherwise)."""
    rows = int(_need(state, "y_embedder.embedding_table.weight").shape[0])
    if "num_classes" in overrides:
        num_classes = int(overrides["num_classes"])
        if rows not in (num_classes, num_classes + 1):
            raise ValueError(f"y_embedder.embedding_table.weight has {rows} rows in the file but num_classes="
                             f"{num_classes} needs {num_classes + 1} (with the null class) or {num_classes}")
        null_row = rows == num_classes + 1
    else:
        null_row = overrides.get("class_dropout_prob", _OFFICIAL_LABEL_DROPOUT) > 0
        num_classes = rows - 1 if null_row else rows
    dropout = float(overrides.get("class_dropout_prob", _OFFICIAL_LABEL_DROPOUT if null_row else 0.0))
    if (dropout > 0) != null_row:
        raise ValueError(f"class_dropout_prob={dropout} but y_embedder.embedding_table.weight has {rows} rows for "
                         f"num_classes={num_classes} ({'with' if null_row else 'without'} the null class)")
    if num_classes < 1:
        raise ValueError("unconditional official checkpoints (num_classes=0) are not supported")
    return num_classes, dropout


def _projector_fields(state: dict[str, np.ndarray], overrides: Mapping[str, Any],
                      encoder_depth: int) -> dict[str, Any]:
    """REPA's z_dims / encoder_depth / projector_dim ({} without projectors); drops them for z_dims=()."""
    projectors = _indices(state, "projectors.")
    if not projectors:
        if overrides.get("z_dims"):
            raise ValueError(f"z_dims={overrides['z_dims']} was given but the checkpoint has no projectors")
        return {}
    if "z_dims" in overrides and not overrides["z_dims"]:
        _drop(state, "projectors.")
        return {"z_dims": ()}
    if projectors != list(range(len(projectors))):
        raise ValueError(f"projectors {projectors} in the file are not numbered 0 ... {len(projectors) - 1}")
    first, last = _PROJECTOR_LINEARS[0], _PROJECTOR_LINEARS[-1]
    z_dims = tuple(int(_need(state, f"projectors.{k}.{last}.weight").shape[0]) for k in projectors)
    if not any(z_dims):  # REPA without an encoder (--enc-type=None) builds one projector to 0 features
        _drop(state, "projectors.")
        return {}
    _check_field("z_dims", z_dims, overrides, f"projectors.*.{last}.weight")
    projector_dim = int(_need(state, f"projectors.0.{first}.weight").shape[0])
    _check_field("projector_dim", projector_dim, overrides, f"projectors.0.{first}.weight")
    return {"z_dims": z_dims, "encoder_depth": encoder_depth, "projector_dim": projector_dim}


def plan_conversion(state: dict[str, np.ndarray], model_name: str, convention: str, args: Mapping[str, Any],
          overrides: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Check the file against `model_name` and infer the rest: (convention, get_model overrides).

    Renames REPA's legacy `decoder_blocks` and drops the projectors when z_dims=() is asked, in place.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r}; expected one of {CONVENTIONS}")
    if convention == "auto":
        convention = detect_convention(state)
    arch = dict(model_config(model_name), **{k: v for k, v in overrides.items() if k in ("depth", "hidden_size")})
    depth, hidden, p = arch["depth"], arch["hidden_size"], arch["patch_size"]

    qk_norm = sorted(k for k in state if ".q_norm." in k or ".k_norm." in k)
    if qk_norm or args.get("qk_norm"):
        raise ValueError("this checkpoint was trained with REPA's --qk-norm (LayerNorms on queries and keys, e.g. "
                         f"{qk_norm[:2]}), which lsync-jax's SiT does not implement")

    encoder_depth = int(overrides.get("encoder_depth", args.get("encoder_depth", 8)))
    legacy = [k for k in state if k.startswith("decoder_blocks.")]
    for key in legacy:  # REPA's older layout, renamed as its load_legacy_checkpoints does
        _, j, rest = key.split(".", 2)
        new = f"blocks.{int(j) + encoder_depth}.{rest}"
        if new in state:
            raise ValueError(f"legacy {key!r} (with encoder_depth={encoder_depth}) collides with {new!r}")
        state[new] = state.pop(key)

    w = _need(state, "x_embedder.proj.weight")
    if w.ndim != 4 or w.shape[0] != hidden or w.shape[2:] != (p, p):
        raise ValueError(f"x_embedder.proj.weight has shape {tuple(w.shape)} in the file but {model_name} expects "
                         f"({hidden}, in_channels, {p}, {p}) (hidden_size={hidden}, patch_size={p}): "
                         "wrong model name or hidden_size")
    in_channels = int(w.shape[1])
    _check_field("in_channels", in_channels, overrides, f"x_embedder.proj.weight {tuple(w.shape)}")

    blocks = _indices(state, "blocks.")
    if blocks != list(range(depth)):
        raise ValueError(f"the file has {len(blocks)} blocks (blocks.{blocks[0] if blocks else '?'} ... "
                         f"blocks.{blocks[-1] if blocks else '?'}) but {model_name} with depth={depth} expects "
                         f"blocks.0 ... blocks.{depth - 1}: wrong model name or depth")

    out = _need(state, "final_layer.linear.weight").shape[0]
    if out not in (p * p * in_channels, 2 * p * p * in_channels):
        raise ValueError(f"final_layer.linear.weight has {out} outputs in the file but patch {p} x {p} with "
                         f"{in_channels} channels gives {p * p * in_channels} (or twice that with learn_sigma)")
    learn_sigma = out == 2 * p * p * in_channels
    _check_field("learn_sigma", learn_sigma, overrides, f"final_layer.linear.weight has {out} outputs")

    num_classes, dropout = _label_fields(state, overrides)

    input_size = overrides.get("input_size")
    if "pos_embed" in state:
        tokens = state["pos_embed"].shape[-2]
        grid = math.isqrt(tokens)
        if grid * grid != tokens:
            raise ValueError(f"pos_embed has {tokens} tokens in the file: not a square grid")
        _check_field("input_size", grid * p, overrides, f"pos_embed {tuple(state['pos_embed'].shape)}")
        input_size = grid * p
    fields = dict(overrides)
    fields.update(input_size=int(input_size or SiT.input_size), in_channels=in_channels, num_classes=num_classes,
                  learn_sigma=learn_sigma, class_dropout_prob=dropout)

    fields.update(_projector_fields(state, overrides, encoder_depth))
    return convention, fields


def _official_names(model: SiT) -> dict[str, tuple[tuple[str, ...], str]]:
    """Official parameter name -> (our parameter path, layout: 'linear', 'conv' or 'plain')."""
    names: dict[str, tuple[tuple[str, ...], str]] = {}

    def linear(official: str, *path: str) -> None:
        names[f"{official}.weight"] = ((*path, "kernel"), "linear")
        names[f"{official}.bias"] = ((*path, "bias"), "plain")

    names["x_embedder.proj.weight"] = (("x_embedder", "kernel"), "conv")
    names["x_embedder.proj.bias"] = (("x_embedder", "bias"), "plain")
    linear("t_embedder.mlp.0", "t_embedder", "mlp_0")
    linear("t_embedder.mlp.2", "t_embedder", "mlp_2")
    names["y_embedder.embedding_table.weight"] = (("y_embedder", "embedding_table", "embedding"), "plain")
    for i in range(model.depth):
        linear(f"blocks.{i}.adaLN_modulation.1", f"blocks_{i}", "adaLN_modulation")
        linear(f"blocks.{i}.attn.qkv", f"blocks_{i}", "attn", "qkv")
        linear(f"blocks.{i}.attn.proj", f"blocks_{i}", "attn", "proj")
        linear(f"blocks.{i}.mlp.fc1", f"blocks_{i}", "mlp", "fc1")
        linear(f"blocks.{i}.mlp.fc2", f"blocks_{i}", "mlp", "fc2")
    for k in range(len(model.z_dims)):
        for j, index in enumerate(_PROJECTOR_LINEARS):
            linear(f"projectors.{k}.{index}", f"projectors_{k}", f"fc_{j}")
    linear("final_layer.adaLN_modulation.1", "final_layer", "adaLN_modulation")
    linear("final_layer.linear", "final_layer", "linear")
    return names


def _official_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "linear":
        return tuple(reversed(shape))
    if layout == "conv":
        h, w, i, o = shape
        return (o, i, h, w)
    return tuple(shape)


def _to_ours(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return value.T
    if layout == "conv":
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    return value


def time_reversal_matrix(dim: int) -> np.ndarray:
    """M with features(1 - t) = M @ features(t) for `timestep_frequencies(t, dim)`, float64.

    Features are [cos(f t) | sin(f t)]; cos f(1 - t) = cos f cos ft + sin f sin ft and
    sin f(1 - t) = sin f cos ft - cos f sin ft. The frequencies come from the features at t = 1.
    """
    half = dim // 2
    at_one = np.asarray(timestep_frequencies(jnp.ones((1,), jnp.float32), dim), np.float64)[0]
    cos, sin = at_one[:half], at_one[half:2 * half]
    m = np.zeros((dim, dim))  # an odd dim's last feature is always zero: its row and column stay zero
    i = np.arange(half)
    m[i, i], m[i, half + i] = cos, sin
    m[half + i, i], m[half + i, half + i] = sin, -cos
    return m


def _fold_time_reversal(flat: dict[tuple[str, ...], np.ndarray], model: SiT) -> None:
    """REPA (t = 0 data, v = eps - x) -> ours (t = 1 data, v = x - eps), in place: see the module doc."""
    kernel = flat[("t_embedder", "mlp_0", "kernel")]
    flat[("t_embedder", "mlp_0", "kernel")] = (time_reversal_matrix(kernel.shape[0]).T
                                              @ kernel.astype(np.float64)).astype(np.float32)
    p, c = model.patch_size, model.in_channels
    for name in ("kernel", "bias"):
        value = flat[("final_layer", "linear", name)]
        features = value.reshape(*value.shape[:-1], p, p, model.out_channels).copy()  # (p, q, c) order
        features[..., :c] *= -1  # the velocity; learn_sigma's second half is left alone
        flat[("final_layer", "linear", name)] = features.reshape(value.shape)


def _check_pos_embed(value: np.ndarray, model: SiT) -> None:
    grid = model.input_size // model.patch_size
    ours = sincos_2d(model.hidden_size, grid, grid)
    if value.shape != (1, *ours.shape):
        raise ValueError(f"pos_embed has shape {tuple(value.shape)} in the file but the model expects "
                         f"{(1, *ours.shape)}")
    diff = float(np.abs(value[0] - ours).max())
    if diff > 1e-5:
        raise ValueError(f"pos_embed in the file differs from the fixed 2-D sin-cos table by up to {diff:.3g}; "
                         "learned position embeddings are not supported")


def convert_state_dict(state_dict: Mapping[str, Any], model_name: str, convention: str = "auto", *,
                       args: Mapping[str, Any] | None = None, **overrides: Any) -> tuple[SiT, dict[str, Any]]:
    """(model, params) from an official state dict (torch tensors or arrays; a {"model", "ema"} dict
    gives its EMA), such that `model.apply({'params': params}, x_nhwc, t, y)` is the official forward
    on x_nchw: the same t for convention 'sit' (SiT, LayerSync), for 'repa' the negated velocity at
    1 - t. 'auto' picks 'repa' when the file has projectors. `overrides` are get_model's: the
    architecture not told by `model_name` (depth, hidden_size, num_heads, ...) and compute options;
    the fields the file tells (input_size, in_channels, num_classes, learn_sigma, class_dropout_prob,
    and REPA's z_dims, projector_dim) are checked against any given and passed to get_model explicitly,
    so that a config naming the same overrides matches. REPA's encoder_depth comes from `overrides`,
    else the training `args`, else 8;
    z_dims=() drops REPA's projectors. Mismatches raise ValueError naming the key and both shapes.
    """
    checkpoint = unwrap_checkpoint(state_dict)
    args = dict(checkpoint.args, **(args or {}))
    state = dict(checkpoint.state)
    convention, fields = plan_conversion(state, model_name, convention, args, overrides)
    model = get_model(model_name, **fields)
    expected = traverse_util.flatten_dict(
        jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs(1))["params"])
    names = _official_names(model)
    if {path for path, _ in names.values()} != set(expected):  # our model and this table must not drift apart
        raise RuntimeError("the official name table does not cover SiT's parameters: "
                           f"{sorted(set(expected) ^ {path for path, _ in names.values()})[:5]}")

    missing = [k for k in names if k not in state]
    unexpected = sorted(k for k in state if k not in names and k != "pos_embed")
    if missing or unexpected:
        more = " ..." if len(missing) > 10 or len(unexpected) > 10 else ""
        raise ValueError(f"the checkpoint does not match {model_name} ({convention} layout): missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}{more}")
    flat, wrong = {}, []
    for key, (path, layout) in names.items():
        want = _official_shape(expected[path].shape, layout)
        if tuple(state[key].shape) != want:
            wrong.append(f"{key} has shape {tuple(state[key].shape)} in the file, {model_name} expects {want}")
        else:
            flat[path] = np.ascontiguousarray(_to_ours(state[key], layout), np.float32)
    if wrong:
        raise ValueError(f"the checkpoint does not match {model_name} with {fields}: " + "; ".join(wrong[:5]))
    if "pos_embed" in state:
        _check_pos_embed(state["pos_embed"], model)
    if convention == "repa":
        _fold_time_reversal(flat, model)
    return model, traverse_util.unflatten_dict(flat)


def from_official(path: str, model_name: str, *, which: str = "ema", convention: str = "auto",
                  allow_pickle: bool = False, **overrides: Any) -> tuple[SiT, dict[str, Any]]:
    """(model, params) from an official SiT / LayerSync / REPA file (.pt, .pth or .safetensors): a
    raw state dict or a training checkpoint, of which `which` ('ema' or 'model') is taken. See
    `convert_state_dict` for `convention` and `overrides`."""
    checkpoint = read_checkpoint(path, which, allow_pickle)
    return convert_state_dict(checkpoint.state, model_name, convention, args=checkpoint.args, **overrides)


def transport_hints(args: Mapping[str, Any]) -> dict[str, str]:
    """Our transport settings for the path and prediction a training run's saved args name."""
    hints = {}
    if str(args.get("path_type", "")).lower() in _PATHS:
        hints["path_type"] = _PATHS[str(args["path_type"]).lower()]
    if str(args.get("prediction", "")).lower() in _PREDICTIONS:
        hints["prediction"] = _PREDICTIONS[str(args["prediction"]).lower()]
    return hints
