"""Time the OFFICIAL PyTorch LayerSync train step on CPU, for a side-by-side row with lsync-jax's own.

The official code (a checkout of vita-epfl/LayerSync) is imported at run time from a directory the
caller gives, never copied here: its `models.SiT`, its `transport.create_transport(...)
.training_losses(...)`, and `update_ema` / `requires_grad` read from its `train.py` (parsed, not
imported: `train.py` imports diffusers, datasets and wandb at module level). It needs what those files
import: torch, timm (models.py) and torchdiffeq, tqdm (transport/integrators.py).

One step is train.py's loop body (lines 318-331 at commit 4001d6d), with train.py's defaults:

    loss_dict = transport.training_losses(model, x, dict(y=y), loss_type=..., multi_blocks=...)
    loss = loss_dict["loss"].mean() + reg_weight * loss_dict["reg"].mean()
    opt.zero_grad(); loss.backward(); opt.step()      # AdamW(lr=1e-4, weight_decay=0)
    update_ema(ema, model)                            # decay 0.9999, when `ema`
    loss.item(); diff_loss.item(); reg.item()         # train.py's running sums

Left out, as they are no part of a single-process CPU step: DDP (one process, so no gradient
all-reduce; the bare module is what DDP wraps), the SD-VAE encode (x is taken as already-encoded latents
of `in_channels` channels), the data loader, logging, checkpoints and sampling, and the TF32 flags
(CUDA only). The SiT is built with `models.SiT(...)` directly (train.py's `SiT_models[name]` only fixes
depth / hidden / patch / heads) so that any size can be timed; learn_sigma, class_dropout_prob and
mlp_ratio keep the defaults train.py leaves them at (True, 0.1, 4.0).

LayerSync blocks: our "LayerSync W -> S" (weak block W aligned to the detached strong block S, both
1-indexed as the paper counts) is the official `encoder_depth=W, gt_encoder_depth=S`: `SiT.forward_core`
keeps block i's output as `zs` when `i + 1 == encoder_depth` and as `gt_zs` when `i + 1 ==
gt_encoder_depth`, and `loss_type="layer_sync"` (train.py's default) takes
`-cos(zs, gt_zs.detach())` per token. Several pairs use `loss_type="multiple_sync"` with
`multi_blocks=pairs` (also 1-indexed: `all_reps[b - 1]`); note that at 4001d6d its
`proj_loss -= ...` sits after the loop, so only the LAST pair enters the loss. No pairs: "vanilla".
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib
import os
import statistics
import sys
import time
from collections import OrderedDict
from typing import Any, Callable, Iterator, Sequence

OFFICIAL_MODULES = ("models", "transport")
# What a LayerSync checkout must hold for the step (the rest of the repository is not read).
REQUIRED_FILES = ("models.py", "train.py", "transport/__init__.py", "transport/transport.py", "transport/path.py",
                  "transport/utils.py", "transport/integrators.py")
TRAIN_HELPERS = ("update_ema", "requires_grad")
LEARNING_RATE = 1e-4  # train.py: torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)


def _import_torch() -> Any:
    """torch, or an ImportError that says what needs it (torch is a test extra, not a dependency)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError("time_official_step runs the official PyTorch code and needs torch: "
                          "pip install torch (the CPU wheel is enough)") from e
    return torch


def check_checkout(official_dir: str) -> str:
    """The absolute path of `official_dir` once it is a LayerSync checkout; else a clear error naming it."""
    path = os.path.abspath(os.path.expanduser(official_dir))
    if not os.path.isdir(path):
        raise NotADirectoryError(f"official_dir={official_dir!r} ({path}) is not a directory: give a checkout "
                                 "of vita-epfl/LayerSync")
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"{path} is not a LayerSync checkout (vita-epfl/LayerSync): it lacks "
                                f"{', '.join(missing)}")
    return path


def _is_official_name(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in OFFICIAL_MODULES)


@contextlib.contextmanager
def official_modules(path: str) -> Iterator[tuple[Any, Any]]:
    """(models, transport) imported from the checkout at `path`, for the duration of the block only.

    The checkout's top-level names (`models`, `transport`) are generic enough to clash with other code,
    so any such modules already loaded are set aside and put back afterwards, the checkout's are
    removed from sys.modules, and sys.path is restored.
    """
    saved_path = list(sys.path)
    saved = {name: mod for name, mod in sys.modules.items() if _is_official_name(name)}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, path)
    importlib.invalidate_caches()
    try:
        try:
            loaded = tuple(importlib.import_module(m) for m in OFFICIAL_MODULES)
        except ModuleNotFoundError as e:
            if e.name is None or _is_official_name(e.name):
                raise
            raise ImportError(f"the official code in {path} imports {e.name!r}, which is not installed: "
                              "pip install timm torchdiffeq tqdm (models.py imports timm, "
                              "transport/integrators.py torchdiffeq and tqdm)") from e
        except RuntimeError as e:
            if "torchvision::" not in str(e):
                raise
            raise ImportError(f"the official code in {path} imports timm, which imports torchvision, and "
                              f"torchvision failed to load ({e}): a torchvision build that does not match "
                              "torch (e.g. a CUDA wheel beside CPU torch); install the matching one") from e
        for mod in loaded:
            where = os.path.abspath(getattr(mod, "__file__", "") or "")
            if not where.startswith(path + os.sep):
                raise ImportError(f"{mod.__name__!r} was imported from {where or 'nowhere'}, not from {path}")
        yield loaded
    finally:
        for name in [n for n in sys.modules if _is_official_name(n)]:
            del sys.modules[name]
        sys.modules.update(saved)
        sys.path[:] = saved_path
        importlib.invalidate_caches()


def train_helpers(path: str, torch: Any) -> dict[str, Callable[..., Any]]:
    """The checkout's own `update_ema` and `requires_grad`, compiled from train.py's source alone.

    Why not import train.py: its module level imports diffusers, datasets, torchvision and wandb_utils,
    none of which the step uses; the two functions need only torch and OrderedDict.
    """
    source_file = os.path.join(path, "train.py")
    with open(source_file, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=source_file)
    found = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in TRAIN_HELPERS}
    missing = [n for n in TRAIN_HELPERS if n not in found]
    if missing:
        raise ValueError(f"{source_file} defines no {', '.join(missing)}: not the LayerSync train.py this "
                         "tool reads")
    namespace: dict[str, Any] = {"torch": torch, "OrderedDict": OrderedDict}
    module = ast.Module(body=[found[n] for n in TRAIN_HELPERS], type_ignores=[])
    exec(compile(module, source_file, "exec"), namespace)  # the checkout's own code, as trusted as its models.py
    return {n: namespace[n] for n in TRAIN_HELPERS}


def official_sync_args(pairs: Sequence[Sequence[int]], depth: int) -> dict[str, Any]:
    """Our 1-indexed (weak, strong) pairs as the official SiT / training_losses arguments (module docstring).

    encoder_depth / gt_encoder_depth must lie in 1..depth even when unused: forward_core binds `zs` and
    `gt_zs` only at those blocks and fails otherwise (train.py's default 8 needs depth >= 8).
    """
    pairs = tuple(tuple(int(b) for b in p) for p in pairs)
    for p in pairs:
        if len(p) != 2 or not 1 <= p[0] < p[1] <= depth:
            raise ValueError(f"pairs={pairs}: each pair is (weak, strong) with 1 <= weak < strong <= depth={depth} "
                             "(1-indexed blocks, as the paper counts)")
    if not pairs:
        return dict(loss_type="vanilla", encoder_depth=1, gt_encoder_depth=1, multi_blocks=[])
    weak, strong = pairs[0]
    loss_type = "layer_sync" if len(pairs) == 1 else "multiple_sync"
    return dict(loss_type=loss_type, encoder_depth=weak, gt_encoder_depth=strong,
                multi_blocks=[] if len(pairs) == 1 else [list(p) for p in pairs])


def time_official_step(official_dir: str, *, depth: int = 6, hidden_size: int = 192, num_heads: int = 3,
                       input_size: int = 28, patch_size: int = 4, in_channels: int = 1, num_classes: int = 10,
                       batch_size: int = 64, pairs: Sequence[Sequence[int]] = ((2, 4),), reg_weight: float = 0.2,
                       ema: bool = True, steps: int = 10, warmup: int = 2, threads: int | None = None,
                       seed: int = 0) -> dict[str, Any]:
    """Median wall-clock ms of the official train step (module docstring) on CPU, on one random batch.

    x ~ N(0, 1) of shape (batch_size, in_channels, input_size, input_size) and uniform labels in
    [0, num_classes), drawn once (the step itself draws its own noise and t); `warmup` untimed steps, then
    `steps` timed ones. `threads` sets torch.set_num_threads for the run (restored afterwards). The torch
    RNG is seeded with `seed` inside a fork, so the caller's RNG state is untouched. Returns a row with
    the benchmark table's columns (bench, model, variant, dtype, batch, input, tokens, params_m, ms,
    img_per_s) and the step's details.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps}, warmup={warmup}: need steps >= 1 and warmup >= 0")
    if input_size % patch_size:
        raise ValueError(f"input_size={input_size} is not a multiple of patch_size={patch_size}")
    path = check_checkout(official_dir)
    sync = official_sync_args(pairs, depth)
    torch = _import_torch()
    helpers = train_helpers(path, torch)
    previous_threads = torch.get_num_threads()
    with official_modules(path) as (models, transport_mod), torch.random.fork_rng(devices=[]):
        try:
            if threads is not None:
                torch.set_num_threads(int(threads))
            torch.manual_seed(seed)
            model = models.SiT(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                               hidden_size=hidden_size, depth=depth, num_heads=num_heads, num_classes=num_classes,
                               encoder_depth=sync["encoder_depth"], gt_encoder_depth=sync["gt_encoder_depth"])
            # train.py: create_transport(path_type, prediction, loss_weight, train_eps, sample_eps), defaults.
            transport = transport_mod.create_transport("Linear", "velocity", None, None, None)
            ema_model = None
            if ema:
                ema_model = copy.deepcopy(model)
                helpers["requires_grad"](ema_model, False)
            opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0)
            if ema_model is not None:
                helpers["update_ema"](ema_model, model, decay=0)
                ema_model.eval()
            model.train()
            x = torch.randn(batch_size, in_channels, input_size, input_size)
            y = torch.randint(num_classes, size=(batch_size,))

            def step() -> tuple[float, float, float]:
                loss_dict = transport.training_losses(model, x, dict(y=y), loss_type=sync["loss_type"],
                                                      multi_blocks=sync["multi_blocks"])
                diff_loss = loss_dict["loss"].mean()
                reg = loss_dict["reg"].mean()
                loss = diff_loss + reg_weight * reg
                opt.zero_grad()
                loss.backward()
                opt.step()
                if ema_model is not None:
                    helpers["update_ema"](ema_model, model)
                return loss.item(), diff_loss.item(), reg.item()

            for _ in range(warmup):
                step()
            times, losses = [], (float("nan"),) * 3
            for _ in range(steps):
                start = time.perf_counter()
                losses = step()
                times.append(time.perf_counter() - start)
            used_threads = torch.get_num_threads()
            learn_sigma = bool(model.learn_sigma)
            n_params = sum(p.numel() for p in model.parameters())  # as train.py logs it (pos_embed included)
        finally:
            torch.set_num_threads(previous_threads)
    ms = statistics.median(times) * 1e3
    grid = input_size // patch_size
    return dict(
        bench="train_step_torch", name="official PyTorch step", model=f"SiT d{depth} h{hidden_size}/{patch_size}",
        variant="layersync" if pairs else "baseline", dtype="float32", batch=batch_size,
        input=f"{input_size}x{input_size}x{in_channels}", tokens=grid * grid, params_m=round(n_params / 1e6, 3),
        ms=round(ms, 2), img_per_s=round(batch_size / (ms / 1e3), 1),
        ms_per_step=ms, mean_ms=statistics.fmean(times) * 1e3, min_ms=min(times) * 1e3, steps=steps,
        warmup=warmup, threads=used_threads, ema=bool(ema), torch_version=str(torch.__version__),
        last_loss=losses[0], last_diff_loss=losses[1], last_reg=losses[2], official_dir=path,
        config=dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, input_size=input_size,
                    patch_size=patch_size, in_channels=in_channels, num_classes=num_classes, batch_size=batch_size,
                    pairs=[list(p) for p in pairs], reg_weight=reg_weight, learn_sigma=learn_sigma,
                    lr=LEARNING_RATE, weight_decay=0.0, seed=seed, **sync),
    )
