"""Random-access image sources for grain: in-memory arrays, tfds ArrayRecord datasets, class-folder
image trees, synthetic data. (Preprocessed VAE latents: `lsync_jax.data.latents`.)

Every source here yields records {'image': uint8 (H, W, C), 'label': int32} and declares the
`DataSource` interface (`lsync_jax.data.registry`) through `ImageRecords`; 'synthetic' and 'tfds'
are registered here.
"""

from __future__ import annotations

import io
import os
from typing import Any, Mapping, Sequence

import numpy as np

from lsync_jax import storage
from lsync_jax.data.registry import register_source
from lsync_jax.extras import require

NULL_CLASS_NOTE = "label num_classes is the model's null class (classifier-free guidance), never a data label"


def check_label_array(labels: np.ndarray, num_classes: int | None, where: str, what: str = "") -> tuple[int, int]:
    """Check every label at once (vectorised): integers in [0, num_classes) (None: only >= 0). Returns
    their (min, max); a bad label is an error naming `where` (the file), its index and the range
    expected (`what` says whose classes those are)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ValueError(f"{where}: no labels")
    if not np.issubdtype(labels.dtype, np.integer):
        fractional = labels != np.round(labels)
        if fractional.any():
            i = int(np.argmax(fractional))
            raise ValueError(f"{where}: label {labels[i]} at index {i} is not a whole class number")
    bad = labels < 0 if num_classes is None else (labels < 0) | (labels >= num_classes)
    if bad.any():
        i, count = int(np.argmax(bad)), int(np.count_nonzero(bad))
        expected = ("labels are class numbers >= 0" if num_classes is None else
                    f"expected 0..{num_classes - 1}{f' ({what})' if what else ''}; {NULL_CLASS_NOTE}")
        raise ValueError(f"{where}: label {labels[i]} at index {i} is out of range: {expected} "
                         f"({count} bad label(s) in all)")
    return int(labels.min()), int(labels.max())


def model_classes(num_classes: int) -> str:
    return f"the model's num_classes={num_classes} (config.model.overrides.num_classes)"


def image_example(record: Mapping[str, Any], rng: np.random.Generator, flip: bool,
                  fields: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """{'x': float32 image in [-1, 1], 'y': label[, 'image': uint8]} of an image record, mirrored with
    p = 1/2 when `flip`."""
    image = np.asarray(record["image"])
    if flip and rng.random() < 0.5:
        image = image[:, ::-1]
    out = {"x": image.astype(np.float32) / 127.5 - 1.0, "y": np.int32(record["label"])}
    if "encoder_features" in fields:
        raise ValueError("precomputed encoder features exist only in latent shards (launch/preprocess.py "
                         "--encoder_path); image data runs the encoder in the step")
    if "image" in fields:
        out["image"] = np.ascontiguousarray(image, np.uint8)
    return out


class ImageRecords:
    """The `DataSource` interface of sources whose records are {'image': uint8 (H, W, C), 'label': int32}:
    a subclass gives `name`, `__len__`, `__getitem__` and `check_labels`, and sets `num_classes` and
    `label_range` where it knows them."""

    kind = "image"
    what = "images"
    example_keys = ("x", "y")
    num_classes = 0
    num_tags = 0
    label_range: tuple[int, int] | None = None
    classes: Sequence[str] = ()  # the class names, where the source knows them (class folders, tfds)
    root: str | None = None  # the folder the images are read from, where there is one

    def example(self, record: Mapping[str, Any], rng: np.random.Generator, flip: bool,
                fields: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        return image_example(record, rng, flip, fields)

    def first_labels(self, count: int) -> np.ndarray | None:
        """The labels of the first `count` records when the source holds them without decoding an image
        (class folders, arrays), else None: what preprocessing records as the label range."""
        return None

    def check_fields(self, fields: tuple[str, ...], flip: bool) -> None:
        """Images give their own crop ('image'); precomputed encoder features exist in latent shards only."""
        if "encoder_features" in fields:
            raise ValueError(f"{self.name}: precomputed encoder features exist only in latent shards "
                             "(launch/preprocess.py --encoder_path); image data runs the encoder in the step")


class ArraySource(ImageRecords):
    """Images and labels held in memory (e.g. Fashion-MNIST). `name` identifies the data in the
    iterator checkpoints (grain checks a restored position against `repr(source)`); `origin` (the
    labels' file) is what errors name. Every label is checked when the source opens."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str = "arrays", origin: str | None = None):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"ArraySource wants uint8 NHWC images, got {images.dtype} {images.shape}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"ArraySource: {images.shape[0]} images but labels of shape {labels.shape}")
        self.origin = origin or name
        self.label_range = check_label_array(labels, None, self.origin)
        self.images, self.labels, self.name = images, labels.astype(np.int32), name

    def check_labels(self, num_classes: int) -> None:
        """Every label against the model's classes (before anything compiles)."""
        check_label_array(self.labels, num_classes, self.origin, model_classes(num_classes))

    def __repr__(self) -> str:
        return f"ArraySource(name={self.name!r}, images={self.images.shape})"

    def first_labels(self, count: int) -> np.ndarray:
        return self.labels[:count]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": self.labels[index]}


class SyntheticSource(ImageRecords):
    """Deterministic random uint8 images of any shape (benchmarks, tests): record i depends on (seed, i) only."""

    def __init__(self, size: int, shape: tuple[int, int, int], num_classes: int, seed: int = 0):
        if size < 1 or len(shape) != 3 or num_classes < 1:
            raise ValueError(f"SyntheticSource: need size >= 1, an (H, W, C) shape and classes >= 1; "
                             f"got {size}, {shape}, {num_classes}")
        self.size, self.shape, self.num_classes, self.seed = size, tuple(shape), num_classes, seed
        self.label_range = (0, num_classes - 1)
        self.name = type(self).__name__  # what FID reference statistics are cached under

    def check_labels(self, num_classes: int) -> None:
        if self.num_classes > num_classes:
            raise ValueError(f"config.data.num_classes={self.num_classes}: the synthetic source draws labels "
                             f"0..{self.num_classes - 1}, but {model_classes(num_classes)} takes 0..{num_classes - 1}; "
                             f"{NULL_CLASS_NOTE}")

    def __repr__(self) -> str:
        return f"SyntheticSource(size={self.size}, shape={self.shape}, classes={self.num_classes}, seed={self.seed})"

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng((self.seed, int(index)))
        return {"image": rng.integers(0, 256, self.shape, dtype=np.uint8),
                "label": np.int32(rng.integers(0, self.num_classes))}


class TfdsSource(ImageRecords):
    """A tfds dataset the user prepared as ArrayRecord (`tfds.data_source`), e.g. cifar10 or imagenet2012.

    Never downloads: a dataset missing from `data_dir` raises with the command that prepares it.
    """

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 image_key: str = "image", label_key: str = "label"):
        tfds = require("tensorflow_datasets", what="a tfds source")  # imported here: only this source needs it

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
        # A ClassLabel feature bounds every label (tfds checks them when it prepares the data); without
        # one, labels are checked as records are read, against `label_limit`.
        self.label_range = (0, len(self.classes) - 1) if self.classes else None
        self.num_classes = len(self.classes)
        self.label_limit: int | None = None
        self.name = type(self).__name__  # what FID reference statistics are cached under

    def check_labels(self, num_classes: int) -> None:
        if self.classes and len(self.classes) > num_classes:
            raise ValueError(f"{self.description}: its {self.label_key!r} feature has {len(self.classes)} classes "
                             f"(labels 0..{len(self.classes) - 1}), but {model_classes(num_classes)} takes "
                             f"0..{num_classes - 1}; {NULL_CLASS_NOTE}")
        self.label_limit = num_classes

    def __repr__(self) -> str:
        return self.description

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.source[index]
        label = int(record[self.label_key])
        if self.label_limit is not None and not 0 <= label < self.label_limit:
            raise ValueError(f"{self.description}: record {index} has label {label}, outside the model's classes "
                             f"0..{self.label_limit - 1}; {NULL_CLASS_NOTE}")
        return {"image": np.asarray(record[self.image_key], np.uint8), "label": np.int32(label)}


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _image_files(folder: str) -> list[str]:
    """The image files under `folder` (recursively, links followed locally), sorted by path."""
    if not storage.is_remote(folder):
        return [os.path.join(d, f) for d, _, files in sorted(os.walk(folder, followlinks=True)) for f in sorted(files)
                if f.lower().endswith(IMAGE_EXTENSIONS)]
    found = [path for path in storage.find(folder) if path.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found, key=lambda path: path.rsplit("/", 1))  # by folder, then name: the local walk's order


class ImageFolderSource(ImageRecords):
    """An ImageNet-style tree `root/<class>/**/<image>` (the `train/` of ILSVRC2012), read as
    torchvision's ImageFolder reads it: classes are the sorted sub-directory names (for ImageNet the
    sorted WordNet ids, the standard label order), files sorted within each class. Images are
    decoded to RGB at their own size."""

    def __init__(self, root: str):
        storage.check_remote(root)
        if not storage.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} not found (expected root/<class>/<images>)")
        self.root = storage.absolute(root)
        self.classes = [n for n in storage.listdir(root) if storage.isdir(storage.join(root, n))]
        self.files: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            self.files += [(path, label) for path in _image_files(storage.join(self.root, name))]
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders under {root!r}")
        self.num_classes = len(self.classes)
        self.label_range = (self.files[0][1], self.files[-1][1])  # files are in label order
        self.name = type(self).__name__  # what FID reference statistics are cached under

    def first_labels(self, count: int) -> np.ndarray:
        return np.asarray([label for _, label in self.files[:count]], np.int32)

    def check_labels(self, num_classes: int) -> None:
        if self.num_classes > num_classes:
            index = next(i for i, (_, label) in enumerate(self.files) if label >= num_classes)
            path, label = self.files[index]
            raise ValueError(f"{self.root}: {self.num_classes} class folders give labels 0..{self.num_classes - 1}, "
                             f"but {model_classes(num_classes)} takes 0..{num_classes - 1}: image {index} ({path}, "
                             f"class folder {self.classes[label]!r}) has label {label}; {NULL_CLASS_NOTE}")

    def __repr__(self) -> str:
        return f"ImageFolderSource(root={self.root!r}, images={len(self)}, classes={len(self.classes)})"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        path, label = self.files[index]
        with Image.open(io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path) as image:
            return {"image": np.asarray(image.convert("RGB")), "label": np.int32(label)}


@register_source("synthetic")
def synthetic_source(data: Mapping[str, Any], split: str) -> SyntheticSource:
    """config.data.synthetic_size records of shape synthetic_shape, labels 0..num_classes-1 (any split)."""
    return SyntheticSource(int(data["synthetic_size"]), tuple(data["synthetic_shape"]), int(data["num_classes"]),
                           seed=0)


@register_source("tfds")
def tfds_source(data: Mapping[str, Any], split: str) -> TfdsSource:
    """config.data.tfds_name, prepared as ArrayRecord in config.data.dir (tfds' default when empty)."""
    return TfdsSource(data["tfds_name"], split=split, data_dir=data["dir"] or None)
