"""Random-access data sources for grain: in-memory arrays, tfds ArrayRecord datasets, class-folder
image trees, synthetic data. (Preprocessed VAE latents: `lsync_jax.data.latents`.)

Every source here yields records {'image': uint8 (H, W, C), 'label': int32}.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


class ArraySource:
    """Images and labels held in memory (e.g. Fashion-MNIST). `name` identifies the data in the
    iterator checkpoints (grain checks a restored position against `repr(source)`)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str = "arrays"):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"ArraySource wants uint8 NHWC images, got {images.dtype} {images.shape}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"ArraySource: {images.shape[0]} images but labels of shape {labels.shape}")
        self.images, self.labels, self.name = images, labels.astype(np.int32), name

    def __repr__(self) -> str:
        return f"ArraySource(name={self.name!r}, images={self.images.shape})"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": self.labels[index]}


class SyntheticSource:
    """Deterministic random uint8 images of any shape (benchmarks, tests): record i depends on (seed, i) only."""

    def __init__(self, size: int, shape: tuple[int, int, int], num_classes: int, seed: int = 0):
        if size < 1 or len(shape) != 3 or num_classes < 1:
            raise ValueError(f"SyntheticSource: need size >= 1, an (H, W, C) shape and classes >= 1; "
                             f"got {size}, {shape}, {num_classes}")
        self.size, self.shape, self.num_classes, self.seed = size, tuple(shape), num_classes, seed

    def __repr__(self) -> str:
        return f"SyntheticSource(size={self.size}, shape={self.shape}, classes={self.num_classes}, seed={self.seed})"

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng((self.seed, int(index)))
        return {"image": rng.integers(0, 256, self.shape, dtype=np.uint8),
                "label": np.int32(rng.integers(0, self.num_classes))}


class TfdsSource:
    """A tfds dataset the user prepared as ArrayRecord (`tfds.data_source`), e.g. cifar10 or imagenet2012.

    Never downloads: a dataset missing from `data_dir` raises with the command that prepares it.
    """

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 image_key: str = "image", label_key: str = "label"):
        import tensorflow_datasets as tfds  # imported here: only this source needs it

        try:
            builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
            if not builder.is_prepared():
                raise FileNotFoundError
            self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False, try_gcs=False)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"tfds dataset {name!r} is not prepared in data_dir={data_dir!r}. Prepare it once as ArrayRecord "
                f"(`tfds build {name} --file_format=array_record --data_dir=DIR`, which needs TensorFlow and the "
                "dataset's files) and set --config.data.dir=DIR."
            ) from None
        self.image_key, self.label_key = image_key, label_key
        label_feature = builder.info.features[label_key] if label_key in builder.info.features else None
        self.classes = tuple(getattr(label_feature, "names", None) or ())
        self.description = f"TfdsSource(name={name!r}, split={split!r}, data_dir={data_dir!r})"

    def __repr__(self) -> str:
        return self.description

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.source[index]
        return {"image": np.asarray(record[self.image_key], np.uint8),
                "label": np.int32(record[self.label_key])}


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolderSource:
    """An ImageNet-style tree `root/<class>/**/<image>` (the `train/` of ILSVRC2012), read as
    torchvision's ImageFolder reads it: classes are the sorted sub-directory names (for ImageNet the
    sorted WordNet ids, the standard label order), files sorted within each class. Images are
    decoded to RGB at their own size."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} not found (expected root/<class>/<images>)")
        self.root = os.path.abspath(root)
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        self.files: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):  # by path
                self.files += [(os.path.join(folder, f), label) for f in sorted(files)
                               if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders under {root!r}")

    def __repr__(self) -> str:
        return f"ImageFolderSource(root={self.root!r}, images={len(self)}, classes={len(self.classes)})"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        path, label = self.files[index]
        with Image.open(path) as image:
            return {"image": np.asarray(image.convert("RGB")), "label": np.int32(label)}
