"""HumanML3D motion, read in the dataset's own layout (no conversion step).

    ROOT/new_joint_vecs/<id>.npy    float (frames, 263): HumanML3D's redundant pose features at 20 fps
    ROOT/Mean.npy, ROOT/Std.npy     (263,): the dataset's normalisation statistics
    ROOT/train.txt, val.txt, test.txt (or any ROOT/<split>.txt): one id per line

Each motion is normalised, (x - Mean) / Std, and made `length` frames long (196 by default, MDM's
max_motion_length): a longer one is cut to a window starting at a random frame (`crop='random'`, drawn from
the example's RNG: deterministic for the run's seed, a new window each time the clip is used, the
same on any number of processes) or at frame 0 (`crop='start'`); a shorter one is zero-padded after
normalisation (zero is the mean pose) and masked. The data has no class labels: `y` is 0 and
`num_classes` 0. The same layout with another feature width (KIT-ML: 251) works with
`feature_dim`.

Every id of the split and every file's header (rank, width, frames) are checked when the source
opens, before anything compiles; a file's values are checked (finite) when it is read.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Mapping

import numpy as np

from lsync_jax import storage
from lsync_jax.data.registry import register_source
from lsync_jax.data.sequences import npy_header, read_npy
from lsync_jax.data.sources import model_classes

FEATURES = 263  # HumanML3D's frame vector: root (4), joints' positions, rotations, velocities, foot contacts
MAX_FRAMES = 196  # MDM's max_motion_length (HumanML3D's motions last at most 10 s, 200 frames)
MOTIONS = "new_joint_vecs"
CROPS = ("random", "start")


class HumanML3DSource:
    """HumanML3D motions for grain: records {'motion': float32 (frames, C) normalised, 'index': int64}.

    `example` gives {'x': float32 (length, C), 'y': int32 0, 'mask': bool (length,), True on real
    frames}. Motion has no mirror image here (HumanML3D already holds mirrored copies, the M-prefixed
    ids): `flip` is refused.
    """

    kind = "sequence"
    what = "motions"
    example_keys = ("x", "y", "mask")
    num_tags = 0
    num_classes = 0
    label_range = None

    def __init__(self, root: str, split: str = "train", length: int = MAX_FRAMES, crop: str = "random",
                 feature_dim: int = FEATURES, num_workers: int = 16):
        if length < 1:
            raise ValueError(f"HumanML3D: length={length}; need at least 1 frame")
        if crop not in CROPS:
            raise ValueError(f"HumanML3D: crop={crop!r}; expected one of {CROPS}")
        storage.check_remote(root)
        self.root = storage.absolute(root)
        if not storage.isdir(self.root):
            raise FileNotFoundError(f"HumanML3D root {self.root} not found (expected {MOTIONS}/, Mean.npy, Std.npy "
                                    "and the split lists train.txt/val.txt/test.txt)")
        self.split, self.length, self.crop, self.channels = split, int(length), crop, int(feature_dim)
        self.mean, self.std = self._statistic("Mean.npy"), self._statistic("Std.npy")
        bad = ~(np.isfinite(self.std) & (self.std > 0))
        if bad.any():
            raise ValueError(f"{storage.join(self.root, 'Std.npy')}: entry {int(np.argmax(bad))} is "
                             f"{self.std[np.argmax(bad)]}; the normalisation divides by it (expected > 0)")
        self.ids = self._split_ids()
        self.files = [storage.join(self.root, MOTIONS, f"{i}.npy") for i in self.ids]
        self.frames = self._scan(num_workers)
        self.name = f"humanml3d/{split}"

    def _statistic(self, name: str) -> np.ndarray:
        path = storage.join(self.root, name)
        if not storage.isfile(path):
            raise FileNotFoundError(f"HumanML3D normalisation file {path} is missing (the dataset ships Mean.npy and "
                                    "Std.npy at its root, made by its motion_representation notebook)")
        value = read_npy(path)
        if value.shape != (self.channels,):
            raise ValueError(f"{path} has shape {value.shape}; expected ({self.channels},), one value per feature "
                             f"(HumanML3D: {FEATURES})")
        return value.astype(np.float32)

    def _split_ids(self) -> list[str]:
        path = storage.join(self.root, f"{self.split}.txt")
        if not storage.isfile(path):
            have = [n[:-4] for n in storage.listdir(self.root) if n.endswith(".txt")]
            raise FileNotFoundError(f"HumanML3D split list {path} is missing (splits present: {have or 'none'}); "
                                    "one motion id per line")
        ids = [line.strip() for line in storage.read_text(path).splitlines() if line.strip()]
        if not ids:
            raise ValueError(f"HumanML3D split list {path} names no motion")
        folder = storage.join(self.root, MOTIONS)
        if not storage.isdir(folder):
            raise FileNotFoundError(f"HumanML3D motion folder {folder} is missing (new_joint_vecs/<id>.npy)")
        present = {n[:-4] for n in storage.listdir(folder) if n.endswith(".npy")}  # one listing for the split
        missing = [i for i in ids if i not in present]
        if missing:
            raise FileNotFoundError(f"HumanML3D split list {path} names {len(missing)} motion(s) with no file, first "
                                    f"{missing[0]!r}: {storage.join(folder, missing[0] + '.npy')} does not exist")
        return ids

    def _scan(self, num_workers: int) -> np.ndarray:
        """Every file's frame count, from its header; wrong rank or width is named before training."""
        with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
            headers = list(pool.map(npy_header, self.files))
        for path, (shape, dtype) in zip(self.files, headers):
            self._check_shape(path, shape)
            if dtype.kind not in "fiu":
                raise ValueError(f"{path} holds {dtype} values; expected float features")
        return np.asarray([shape[0] for shape, _ in headers], np.int64)

    def _check_shape(self, path: str, shape: tuple[int, ...]) -> None:
        if len(shape) != 2 or shape[1] != self.channels:
            what = f"HumanML3D's {FEATURES} features per frame" if self.channels == FEATURES else "feature_dim"
            raise ValueError(f"{path} has shape {shape}; expected (frames, {self.channels}) ({what})")
        if shape[0] < 1:
            raise ValueError(f"{path} holds no frame (shape {shape})")

    def __repr__(self) -> str:
        return (f"HumanML3DSource(root={self.root!r}, split={self.split!r}, motions={len(self)}, "
                f"length={self.length}, crop={self.crop!r})")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[int(index)]
        motion = read_npy(path)
        self._check_shape(path, motion.shape)
        motion = (motion.astype(np.float32) - self.mean) / self.std
        if not np.isfinite(motion).all():
            frame = int(np.argmax(~np.isfinite(motion).all(axis=1)))
            raise ValueError(f"{path}: frame {frame} holds a non-finite value (NaN or inf)")
        return {"motion": motion, "index": np.int64(index)}

    def check_labels(self, num_classes: int) -> None:
        """HumanML3D has no class labels: a class-conditional model is refused (before anything compiles)."""
        raise ValueError(f"HumanML3D ({self.root}) has no class labels, but {model_classes(num_classes)} is "
                         "class-conditional: train an unconditional model (num_classes=0)")

    def check_fields(self, fields: tuple[str, ...], flip: bool) -> None:
        """Refuse, before training, what motion cannot give: extra encoder fields, mirror images."""
        if fields:
            raise ValueError(f"HumanML3D gives no {list(fields)}: extra loader fields (REPA's encoder images and "
                             "features) exist for images and image latents only")
        if flip:
            raise ValueError("HumanML3D motion is not flipped (its M-prefixed ids are the mirrored motions already); "
                             "set --config.data.flip=False")

    def example(self, record: Mapping[str, np.ndarray], rng: np.random.Generator, flip: bool,
                fields: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """{'x': float32 (length, C), 'y': int32 0, 'mask': bool (length,)}: a window of a longer motion
        (random start from `rng`, or frame 0), a shorter one zero-padded."""
        self.check_fields(fields, flip)
        motion = np.asarray(record["motion"])
        frames = len(motion)
        start = int(rng.integers(0, frames - self.length + 1)) if self.crop == "random" and frames > self.length else 0
        steps = min(frames, self.length)
        x = np.zeros((self.length, self.channels), np.float32)
        x[:steps] = motion[start: start + steps]
        return {"x": x, "y": np.int32(0), "mask": np.arange(self.length) < steps}


@register_source("humanml3d")
def humanml3d_source(data: Mapping[str, Any], split: str) -> HumanML3DSource:
    """The split's motions under config.data.dir, cropped or padded to config.data.length frames."""
    if not data["dir"]:
        raise FileNotFoundError("config.data.dir: the HumanML3D root (new_joint_vecs/, Mean.npy, Std.npy, "
                                "train.txt, ...) is needed for data.name='humanml3d'")
    return HumanML3DSource(data["dir"], split, length=int(data["length"]), crop=data["crop"])
