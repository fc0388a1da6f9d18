"""DINOv2 weights (torch hub or Hugging Face) -> `lsync_jax.models.encoders.DINOv2` params.

Two layouts are read, from local files only (nothing is ever downloaded):

- torch hub (facebookresearch/dinov2, `dinov2_vit{s,b,l,g}14_pretrain.pth`, a raw state dict):
  `cls_token`, `pos_embed` (1, 1 + 37 * 37, D), `mask_token`, `patch_embed.proj.{weight,bias}`,
  `blocks.{i}.norm1`, `attn.qkv`, `attn.proj`, `ls1.gamma`, `norm2`, `mlp.fc1` / `mlp.fc2` (or
  ViT-g's `mlp.w12` / `mlp.w3`), `ls2.gamma`, and `norm.{weight,bias}`.
- Hugging Face `Dinov2Model` (facebook/dinov2-{small,base,large,giant}): a directory holding
  config.json and model.safetensors (or sharded safetensors with their index, or
  pytorch_model.bin) -- a cache snapshot directory or the repo folder above it works -- or one
  such file with its config.json beside it. Keys `embeddings.cls_token`,
  `embeddings.position_embeddings`, `embeddings.patch_embeddings.projection.*`,
  `encoder.layer.{i}.norm1`, `attention.attention.{query,key,value}`, `attention.output.dense`,
  `layer_scale1.lambda1`, `norm2`, `mlp.fc1` / `mlp.fc2` (or `mlp.weights_in` / `mlp.weights_out`),
  `layer_scale2.lambda1`, `layernorm.*`, as on the Hub and as `save_pretrained` writes them; the
  names transformers 5 uses in memory (`attention.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`) are
  read too, and a `dinov2.` prefix (classification models) is stripped.

Both are first renamed to the torch-hub names (HF's separate query/key/value are concatenated in
that order into qkv, gate/up into w12: the layouts of the official fused Linear layers), then mapped
to flax: Linear (out, in) -> kernel (in, out), Conv2d OIHW -> HWIO, LayerNorm weight -> scale.
The configuration is read from the shapes: embed dim, patch size, native grid, depth, FFN type and
width, LayerScale; the number of heads (which no shape shows) from HF's config.json, else from the
released sizes by embed dim (384: 6, 768: 12, 1024: 16, 1536: 24). Every key and shape is checked;
missing or unexpected tensors raise ValueError naming them. DINOv2 with registers (`*_reg4`
files, `Dinov2WithRegistersModel`) is refused: this port implements the registers-free layout.
"""

from __future__ import annotations

import glob
import math
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from lsync_jax import storage
from lsync_jax.models.encoders.dinov2 import CONFIGS, DINOv2, DINOv2Config, random_dinov2
from lsync_jax.porting.vae import read_state_file
from lsync_jax.storage import read_json

__all__ = ["load_dinov2", "random_dinov2", "read_dinov2_state", "from_hub_state", "hf_to_hub_names"]

# Heads of the released widths (no tensor shape shows them).
HEADS_BY_WIDTH = {c.embed_dim: c.num_heads for c in CONFIGS.values()}
_WHERE_TO_GET = ("get torch hub's dinov2_vitb14_pretrain.pth (https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/"
                 "dinov2_vitb14_pretrain.pth) or the Hugging Face facebook/dinov2-base directory (config.json + "
                 "model.safetensors) beforehand; nothing is downloaded here")
_REGISTERS = ("DINOv2 with registers (dinov2_vit*14_reg files, Hugging Face Dinov2WithRegistersModel) is not "
              "supported: this port implements the registers-free layout (dinov2_vit{s,b,l,g}14, REPA's encoders)")
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_HF_INDEX = "model.safetensors.index.json"

# HF name (after the block prefix) -> hub name, for tensors that map one to one.
_HF_BLOCK_RENAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
    "mlp.down_proj": "mlp.w3",
}
_HF_TOP_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "embeddings.register_tokens": "register_tokens",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# Pieces concatenated (in this order, along the output features) into one official fused Linear.
_HF_FUSED = {
    "attn.qkv": (("attention.attention.query", "attention.attention.key", "attention.attention.value"),
                 ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
    "mlp.w12": (("mlp.gate_proj", "mlp.up_proj"),),
}
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")


def _is_hf(state: Mapping[str, Any]) -> bool:
    return any(k.startswith(("embeddings.", "encoder.layer.")) for k in state)


def hf_to_hub_names(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A Hugging Face Dinov2Model state dict -> (the same tensors under torch-hub names, {hub name:
    HF name(s)} for messages). Keys it cannot place are kept under their HF name (later: unexpected)."""
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    pieces: dict[tuple[int, str, str], dict[str, np.ndarray]] = {}  # (layer, fused target, suffix) -> parts

    def put(name, value, source):
        if name in out:
            raise ValueError(f"{source!r} and {origin[name]!r} both map to the official {name!r}")
        out[name], origin[name] = value, source

    for key, value in state.items():
        if key in _HF_TOP_RENAMES:
            put(_HF_TOP_RENAMES[key], value, key)
            continue
        match = _HF_LAYER.match(key)
        if match is None:
            put(key, value, key)
            continue
        layer, module, suffix = int(match[1]), match[2], match[3]
        prefix = f"blocks.{layer}."
        if suffix == "lambda1" and module in ("layer_scale1", "layer_scale2"):
            put(f"{prefix}ls{module[-1]}.gamma", value, key)
        elif module in _HF_BLOCK_RENAMES and suffix != "lambda1":
            put(f"{prefix}{_HF_BLOCK_RENAMES[module]}.{suffix}", value, key)
        else:
            for target, spellings in _HF_FUSED.items():
                if any(module in names for names in spellings):
                    pieces.setdefault((layer, target, suffix), {})[module] = value
                    break
            else:
                put(key, value, key)
    for (layer, target, suffix), parts in sorted(pieces.items()):
        names = next((n for n in _HF_FUSED[target] if set(n) & set(parts)), ())
        sources = [f"encoder.layer.{layer}.{n}.{suffix}" for n in names]
        if set(parts) != set(names):
            missing = [s for s, n in zip(sources, names) if n not in parts]
            raise ValueError(f"Hugging Face DINOv2 state dict: missing {missing} (needed with "
                             f"{sorted(set(sources) - set(missing))})")
        put(f"blocks.{layer}.{target}.{suffix}", np.concatenate([parts[n] for n in names], axis=0), " + ".join(sources))
    return out, origin


def _block_indices(state: Mapping[str, Any]) -> list[int]:
    return sorted({int(m[1]) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))})


def infer_config(state: Mapping[str, np.ndarray], hf_config: Mapping[str, Any] | None = None,
                 num_heads: int | None = None) -> DINOv2Config:
    """DINOv2Config of a torch-hub-named state dict; heads: `num_heads`, else `hf_config`'s, else by width."""
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight")
    if any(k not in state for k in need):
        raise ValueError(f"not a DINOv2 state dict: missing {[k for k in need if k not in state]} "
                         f"(its first keys: {sorted(state)[:6]})")
    hf_config = dict(hf_config or {})
    embed_dim = int(state["cls_token"].shape[-1])
    weight = state["patch_embed.proj.weight"]
    if weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"patch_embed.proj.weight has shape {weight.shape}, not (D, C, p, p)")
    positions = int(state["pos_embed"].shape[-2]) - 1
    native = math.isqrt(positions)
    if native * native != positions:
        raise ValueError(f"pos_embed holds {positions} patch positions, not a square grid (plus the CLS token)")
    blocks = _block_indices(state)
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"DINOv2 blocks must be numbered 0..depth-1, found {blocks}")
    swiglu = "blocks.0.mlp.w12.weight" in state
    heads = num_heads or hf_config.get("num_attention_heads") or HEADS_BY_WIDTH.get(embed_dim)
    if heads is None:
        raise ValueError(f"embed dim {embed_dim} is none of the released DINOv2 widths {sorted(HEADS_BY_WIDTH)} and "
                         "no Hugging Face config.json gives num_attention_heads: the number of heads is unknown "
                         "(pass num_heads=)")
    act = hf_config.get("hidden_act", "gelu")
    if not swiglu and act != "gelu":
        raise ValueError(f"hidden_act={act!r} is not supported (DINOv2 uses the exact GELU, 'gelu')")
    fc1 = state.get("blocks.0.mlp.w3.weight" if swiglu else "blocks.0.mlp.fc1.weight")
    if fc1 is None:
        raise ValueError("no FFN weights in block 0 (blocks.0.mlp.fc1.weight or blocks.0.mlp.w12/w3.weight)")
    hidden = int(fc1.shape[1] if swiglu else fc1.shape[0])
    mlp_ratio = float(hf_config.get("mlp_ratio", 4.0 if swiglu else hidden / embed_dim))
    config = DINOv2Config(embed_dim=embed_dim, depth=len(blocks), num_heads=int(heads), mlp_ratio=mlp_ratio,
                          patch_size=int(weight.shape[-1]), ffn="swiglu" if swiglu else "mlp", native_grid=native,
                          layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-6)),
                          layerscale="blocks.0.ls1.gamma" in state, in_channels=int(weight.shape[1]))
    if config.ffn_hidden != hidden:
        raise ValueError(f"FFN width {hidden} does not follow from embed dim {embed_dim} and mlp_ratio {mlp_ratio} "
                         f"({config.ffn_hidden} for ffn={config.ffn!r})")
    return config


def expected_hub_keys(config: DINOv2Config) -> set[str]:
    """The torch-hub tensor names of a registers-free DINOv2 (without the unused `mask_token`)."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    ffn = ("w12", "w3") if config.ffn == "swiglu" else ("fc1", "fc2")
    for i in range(config.depth):
        for module in ("norm1", "attn.qkv", "attn.proj", "norm2", *(f"mlp.{n}" for n in ffn)):
            keys |= {f"blocks.{i}.{module}.weight", f"blocks.{i}.{module}.bias"}
        if config.layerscale:
            keys |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
    return keys


def from_hub_state(state: Mapping[str, np.ndarray], config: DINOv2Config) -> dict[str, Any]:
    """A torch-hub-named DINOv2 state dict (keys already checked) -> nested flax params (float32)."""
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in state.items():
        value = np.asarray(value, np.float32)
        if key == "mask_token":
            continue  # masked-image-modelling training only
        if key in ("cls_token", "pos_embed"):
            flat[(key,)] = value
            continue
        if key == "patch_embed.proj.weight":
            flat[("patch_embed", "kernel")] = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
            continue
        *module, name = key.split(".")
        if module[0] == "blocks":
            module = [f"blocks_{module[1]}", *module[2:]]
        elif module == ["patch_embed", "proj"]:
            module = ["patch_embed"]
        is_norm = module[-1].startswith("norm")
        if name == "gamma":
            flat[(*module, "gamma")] = value
        elif name == "bias":
            flat[(*module, "bias")] = value
        else:
            flat[(*module, "scale" if is_norm else "kernel")] = value if is_norm else value.T
    return traverse_util.unflatten_dict(flat)


def _read(path: str) -> dict[str, np.ndarray]:
    try:
        state = read_state_file(path)
    except AttributeError as e:  # torch.load gave something else than a flat dict of tensors
        raise ValueError(f"{path} is not a state dict of tensors (a training checkpoint? DINOv2's released files "
                         "are raw state dicts)") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a state dict")
    return state


def read_dinov2_state(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any] | None, str]:
    """(float32 tensors by their names in the file less a `dinov2.` prefix, HF config.json or None, the
    weights file read), from a local or gs:// file or directory."""
    if storage.is_remote(path):
        if not storage.exists(path):
            raise FileNotFoundError(f"DINOv2 weights {path} not found: {_WHERE_TO_GET}")
        with storage.local_copy(path) as local:
            state, config, weights_file = read_dinov2_state(local)
        read = storage.join(path, os.path.relpath(weights_file, local)) if local != weights_file else path
        return state, config, read
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in (_HF_INDEX, *_HF_WEIGHTS) if os.path.isfile(os.path.join(path, n))]
        for name in (_HF_INDEX, *_HF_WEIGHTS):  # a repo cache folder: models--facebook--dinov2-base/snapshots/<hash>
            found = found or sorted(glob.glob(os.path.join(path, "**", name), recursive=True))
        if not found:
            hub = sorted(glob.glob(os.path.join(path, "dinov2_*14*.pth")))
            if len(hub) > 1:
                raise ValueError(f"{path} holds several torch hub files {hub}: pass one of them")
            found = hub
        if not found:
            looked = ", ".join((_HF_INDEX, *_HF_WEIGHTS))
            raise FileNotFoundError(f"no DINOv2 weights under {path} (looked for {looked} and dinov2_*14*.pth): "
                                    f"{_WHERE_TO_GET}")
        weights_file = found[0]
    elif os.path.isfile(path):
        weights_file = path
    else:
        raise FileNotFoundError(f"DINOv2 weights {path} not found: {_WHERE_TO_GET}")
    folder = os.path.dirname(weights_file)
    if weights_file.endswith(".index.json"):
        shards = sorted(set(read_json(weights_file, "the DINOv2 weight index")["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(_read(os.path.join(folder, shard)))
    else:
        state = _read(weights_file)
    state = {k[len("dinov2."):] if k.startswith("dinov2.") else k: v for k, v in state.items()}
    config_file = os.path.join(folder, "config.json")
    hf_config = read_json(config_file, "the DINOv2 config") if _is_hf(state) and os.path.isfile(config_file) else None
    return state, hf_config, weights_file


def load_dinov2(path: str, num_heads: int | None = None, **module_options: Any) -> tuple[DINOv2, dict[str, Any]]:
    """(module, params) of the DINOv2 in a local torch-hub file or Hugging Face directory/file.

    `num_heads` is needed only for a torch-hub file of a width other than the released ones.
    `module_options` go to `DINOv2` (dtype, pos_interpolation -- 'repa' by default --,
    attention_impl). Raises FileNotFoundError for a missing path (saying which files to get) and
    ValueError for register tokens, missing or unexpected tensors and wrong shapes.
    """
    import jax
    import jax.numpy as jnp

    raw, hf_config, weights_file = read_dinov2_state(path)
    if hf_config and (hf_config.get("num_register_tokens") or "registers" in str(hf_config.get("model_type", ""))):
        raise ValueError(f"{weights_file}: {_REGISTERS}")
    if _is_hf(raw):
        state, origin = hf_to_hub_names(raw)
    else:
        state, origin = dict(raw), {k: k for k in raw}
    if "register_tokens" in state:
        raise ValueError(f"{weights_file} has register tokens ({origin['register_tokens']!r}, shape "
                         f"{state['register_tokens'].shape}): {_REGISTERS}")
    config = infer_config(state, hf_config, num_heads)
    expected = expected_hub_keys(config)
    missing = sorted(expected - set(state))
    unexpected = sorted(origin[k] for k in set(state) - expected - {"mask_token"})
    if missing or unexpected:
        raise ValueError(f"{weights_file} does not match DINOv2 {config}: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    module = DINOv2(config, **module_options)
    params = from_hub_state(state, config)
    p = config.patch_size
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, p, p, config.in_channels)))["params"]
    want = {k: v.shape for k, v in traverse_util.flatten_dict(shapes).items()}
    got = {k: v.shape for k, v in traverse_util.flatten_dict(params).items()}
    wrong = sorted(f"{'/'.join(k)}: {got.get(k)} (expected {want.get(k)})" for k in set(want) | set(got)
                   if want.get(k) != got.get(k))
    if wrong:
        raise ValueError(f"{weights_file} does not match DINOv2 {config}: wrong shapes {wrong[:8]}")
    return module, params


# A small randomly initialised DINOv2 for CPU configs and tests ("random:tiny"): NOT a pretrained encoder.
TINY_DINOV2 = dict(embed_dim=64, depth=2, num_heads=2)


def load_encoder(path: str, dtype: Any = jnp.bfloat16) -> tuple[Any, Any, str]:
    """(module, params, description) of DINOv2 from weights (torch hub or Hugging Face files), or
    'random:<vits14|vitb14|vitl14|vitg14|tiny>' for a randomly initialised one (clearly not REPA)."""
    if not path:
        raise FileNotFoundError("config.objective.repa.encoder_path is empty: give DINOv2 weights (torch hub's "
                                "dinov2_vitb14_pretrain.pth or a Hugging Face facebook/dinov2-base directory), or "
                                "'random:tiny' for a randomly initialised encoder (tests and CPU demos only)")
    if path.startswith("random:"):
        name = path.split(":", 1)[1]
        if name != "tiny" and name not in CONFIGS:
            raise ValueError(f"encoder_path={path!r}: expected random:tiny or random:<{'|'.join(CONFIGS)}>")
        config = DINOv2Config(**TINY_DINOV2) if name == "tiny" else CONFIGS[name]
        module, params = random_dinov2(config, seed=0)
        description = f"DINOv2-{name}, RANDOMLY INITIALISED (not pretrained: for tests and CPU demos)"
        logging.warning("REPA encoder: %s", description)
    else:
        module, params = load_dinov2(path)
        description = f"DINOv2 from {path}"
    return module.clone(dtype=jnp.dtype(dtype)), params, description
