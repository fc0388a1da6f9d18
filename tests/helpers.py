"""Helpers shared by the tests."""

import contextlib
import os
import shutil
import signal
import sys

import jax
import numpy as np

from lsync_jax.porting import inception as weights

_TORCHVISION_OPS = []  # keeps the placeholder op library of `import_torchvision` alive


def import_torchvision():
    """Import torchvision where PyPI's wheel (a CUDA build) sits next to CPU torch.

    The test extras no longer bring torchvision (a venv made from an older setup.py still has it, and
    transformers, diffusers and timm import it when it is installed). Its compiled ops (_C.so) do not
    load there, and importing it fails registering fake kernels for two of them; declaring those two op
    schemas lets the pure-Python parts (the model definitions pytorch-fid, diffusers and timm import)
    load. Returns None without torchvision.
    """
    try:
        import torchvision
    except ImportError:
        return None
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        import torch

        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        if not _TORCHVISION_OPS:
            library = torch.library.Library("torchvision", "FRAGMENT")
            library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
            _TORCHVISION_OPS.append(library)
        import torchvision
    return torchvision


def perturbed(tree, seed: int, scale: float = 0.05):
    """Add host-RNG noise to every leaf (no compile), so that adaLN-Zero blocks are no longer
    identities and every parameter matters."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda l: np.asarray(l) + scale * rng.standard_normal(l.shape).astype(np.float32), tree)


IMAGE_SIZES = [(40, 50), (70, 33), (32, 32), (100, 64), (45, 45), (90, 130)]  # (H, W), some >= 2x a 32 crop


def make_image_tree(root: str, classes=("n01", "n02", "n03"), per_class: int = 6) -> str:
    """Generated JPEG/PNG images of assorted sizes in ImageNet-style class folders (one nested one),
    plus a non-image file in each; returns `root`."""
    import os

    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        folder = os.path.join(root, name, "sub") if c == 1 else os.path.join(root, name)
        os.makedirs(folder)
        for i in range(per_class):
            h, w = IMAGE_SIZES[i % len(IMAGE_SIZES)]
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"img_{i}.{'png' if i % 2 else 'JPEG'}"))
        with open(os.path.join(folder, "notes.txt"), "w") as f:
            f.write("not an image")
    return root


def quick(config, steps=2):
    """A training config shrunk to `steps` steps of batch 8, one checkpoint, no FID and no sample grid
    (its sampler's compile would cost more than the steps; tests of grids set num_grid_samples)."""
    config.data.batch_size = 8
    config.train.update(dict(num_steps=steps, log_every=1, checkpoint_every=steps, sample_every=0,
                             num_grid_samples=0, async_checkpoints=False))
    config.sampler.num_steps = 2
    config.eval.every = 0
    return config


def seed_inception_cache(cache_dir, inception_npz) -> None:
    """Put the converted default weights where `resolve_weights(None)` looks in `cache_dir`."""
    os.makedirs(cache_dir, exist_ok=True)
    shutil.copyfile(inception_npz, os.path.join(cache_dir, weights.CACHED_NAME))


@contextlib.contextmanager
def alarm(seconds):
    """`with alarm(seconds):` fails a block that would hang (TimeoutError) instead of waiting for it."""
    def fire(signum, frame):
        raise TimeoutError(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
