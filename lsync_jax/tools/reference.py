"""ADM-style reference batches from your own images: `arr_0` uint8 NHWC (and `arr_1` labels) with the
FID statistics ADM's evaluator reads (`mu`, `sigma` of Inception's pool features, `mu_s`, `sigma_s` of
its spatial ones), computed once with lsync-jax's FID Inception.

Sources: a class-folder tree (cropped with ADM's centre crop), the uint8 crops that
`launch/preprocess.py --store_images` keeps beside the latents, a tfds split (centre-cropped when
`image_size` is given), or any config's data section. Which images: the first `num` in the source's
order, or (`order='random'`) a seeded random subset, as ADM's VIRTUAL_* batches are random training
images; a class-folder tree's first images are all of its first class.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from lsync_jax import storage
from lsync_jax.builders import build_source
from lsync_jax.data.latents import LatentSource
from lsync_jax.data.sources import ImageFolderSource, TfdsSource
from lsync_jax.eval.evaluator import STAT_KEYS, InceptionEvaluator, iter_npz_batches
from lsync_jax.host import Progress
from lsync_jax.porting import inception as inception_weights
from lsync_jax.storage import check_writable, write_adm_batch
from lsync_jax.tools.preprocess import center_crop_adm

ORDERS = ("random", "first")


def open_source(*, images: str = "", latents: str = "", tfds: str = "", tfds_dir: str = "", split: str = "train",
                config: Any = None) -> tuple[Any, str]:
    """(the source, its description) of exactly one of the four kinds."""
    given = [k for k, v in (("images", images), ("latents", latents), ("tfds", tfds), ("config", config)) if v]
    if len(given) != 1:
        raise ValueError("give exactly one source of images: --images=DIR (class folders), --latents=DIR "
                         "(launch/preprocess.py --store_images output), --tfds=NAME or --config=FILE"
                         + (f"; got {', '.join('--' + g for g in given)}" if given else ""))
    if images:
        return ImageFolderSource(images), f"class folders {images}"
    if latents:
        source = LatentSource(latents)
        if "image" not in source.codec.fields:
            raise ValueError(f"the latents in {latents} hold no images: preprocess with --store_images to keep the "
                             "uint8 crops, or build the reference from the image folders (--images=DIR)")
        return source, f"the stored crops of {latents}"
    if tfds:
        return TfdsSource(tfds, split=split, data_dir=tfds_dir or None), f"tfds {tfds}/{split}"
    return build_source(config.data, split=split), f"config data {config.data.name}/{split}"


def choose(total: int, num: int, order: str, seed: int) -> np.ndarray:
    """The indices of the images taken: the first `num`, or a seeded random subset in index order."""
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: expected one of {ORDERS}")
    if num < 2:
        raise ValueError(f"num={num}: FID statistics need at least 2 images")
    if num > total:
        raise ValueError(f"num={num}, but the source has {total} images")
    if order == "first":
        return np.arange(num)
    return np.sort(np.random.default_rng(seed).choice(total, num, replace=False))


def make_reference_batch(out: str, source: Any, *, num: int, image_size: int | None = None, order: str = "random",
                         seed: int = 0, weights_path: str | None = None, batch_size: int = 256,
                         overwrite: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write OUT (.npz): `num` images of `source` (ADM's centre crop to `image_size` when given), their
    labels and their FID statistics. Every input is checked before an image is read: the output, the
    Inception weights, the count, and the first image's shape (all images must share it). An existing
    OUT (perhaps a downloaded ADM batch) is replaced only with `overwrite`."""
    if not str(out).endswith(".npz"):
        raise ValueError(f"the reference batch {out} must be an .npz file")
    if storage.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; it is kept. Choose another --out, or pass --overwrite to replace it")
    indices = choose(len(source), int(num), order, seed)
    check_writable(str(storage.path(out).parent))
    weights = inception_weights.resolve_weights(weights_path)

    def read(index: int) -> tuple[np.ndarray, int]:
        record = source[int(index)]
        if "image" not in record:
            raise ValueError(f"{source!r} gives no 'image' in its records (keys: {sorted(record)})")
        pixels = np.asarray(record["image"], np.uint8)
        label = int(np.asarray(record["label"])) if "label" in record else -1
        return (center_crop_adm(pixels, image_size) if image_size else pixels), label

    shape = read(indices[0])[0].shape
    if len(shape) != 3 or shape[-1] not in (1, 3):
        raise ValueError(f"image {int(indices[0])} of {source!r} has shape {shape}; expected (H, W, 1 or 3)"
                         + ("" if image_size else ": pass --image_size to crop images of several sizes"))
    progress = Progress(f"reference batch {out}", len(indices), log=log)

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(indices), batch_size):
            chunk = [read(i) for i in indices[start:start + batch_size]]
            for i, (x, _) in zip(indices[start:start + batch_size], chunk):
                if x.shape != shape:
                    raise ValueError(f"image {int(i)} of {source!r} has shape {x.shape}, the first {shape}: pass "
                                     "--image_size=S to centre-crop them all to S x S")
            progress.update(len(chunk))
            yield np.stack([x for x, _ in chunk]), np.asarray([y for _, y in chunk], np.int32)

    evaluator = InceptionEvaluator(weights, batch_size=batch_size)

    def statistics(local_npz: str) -> dict[str, np.ndarray]:
        log("reference batch: Inception statistics of the written images")
        stats = evaluator.statistics(iter_npz_batches(local_npz, "arr_0", batch_size))
        return {k: getattr(stats, k) for k in STAT_KEYS}

    write_adm_batch(out, batches(), extra=statistics)
    seconds = progress.finish()
    log(f"wrote {out}: {len(indices):,} images {shape} with {', '.join(STAT_KEYS)}")
    return {"path": out, "num": int(len(indices)), "shape": list(shape), "seconds": round(seconds, 1),
            "inception_weights": weights}

