"""Moving Fashion-MNIST: video that needs no download, made from the real Fashion-MNIST images.

The standard bouncing-items construction (Srivastava et al. 2015's Moving MNIST, with Fashion-MNIST
items): each of `items` images starts at a uniformly random position on a black `canvas` x `canvas`
frame and moves in a uniformly random direction at `speed` pixels per frame, bouncing off the
canvas edges (a mirror reflection; the position is rounded to whole pixels for drawing); the items
are composited by their pixel-wise maximum. A clip is `frames` frames, uint8 (F, H, W, 1).

Clip i depends on (seed, split, i) only: any clip is reproducible in any order and any process, and
nothing is stored. The split picks the source images (Fashion-MNIST's 60k train or 10k test
images); `num_clips` is the dataset's length. The clip's label is the class of its first item (the
only item by default).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from lsync_jax.data.fashion_mnist import CLASSES, DEFAULT_DIR, load_fashion_mnist
from lsync_jax.data.registry import register_source
from lsync_jax.data.sources import NULL_CLASS_NOTE, model_classes

ITEM_SIZE = 28  # Fashion-MNIST's images are 28 x 28
_SPLIT_CODE = {"train": 0, "test": 1}  # part of each clip's seed, so the splits' trajectories differ too


def bounce(position: np.ndarray, room: float) -> np.ndarray:
    """Unbounded 1-D positions folded into [0, room], as a point moving in a straight line there and
    reflecting off both ends would be (a triangle wave; exact for any speed, however many bounces)."""
    if room <= 0:
        return np.zeros_like(position)
    return room - np.abs(np.mod(position, 2 * room) - room)


class MovingFashionMNISTSource:
    """Bouncing Fashion-MNIST clips for grain: records {'video': uint8 (F, H, W, 1), 'label': int32}.

    `example` gives {'x': float32 (F, H, W, 1) in [-1, 1], 'y': int32}, mirrored left-right as a whole
    clip with p = 1/2 when `flip`. `item_size` < 28 shrinks the items (a box filter) so that they have
    room to move on a small canvas: 28 px items on the default 32 px canvas move within 4 px.
    """

    kind = "video"
    what = "clips"
    example_keys = ("x", "y")
    num_tags = 0

    def __init__(self, num_clips: int = 10_000, split: str = "train", data_dir: str = DEFAULT_DIR, *,
                 canvas: int = 32, items: int = 1, frames: int = 8, speed: float = 1.0,
                 item_size: int = ITEM_SIZE, seed: int = 0):
        if split not in _SPLIT_CODE:
            raise ValueError(f"Moving Fashion-MNIST split {split!r}: expected one of {sorted(_SPLIT_CODE)} "
                             "(the Fashion-MNIST images the clips are made from)")
        if num_clips < 1:
            raise ValueError(f"Moving Fashion-MNIST: num_clips={num_clips}; need at least 1 clip")
        if frames < 1:
            raise ValueError(f"Moving Fashion-MNIST: frames={frames}; a clip needs at least 1 frame")
        if items < 1:
            raise ValueError(f"Moving Fashion-MNIST: items={items}; a clip needs at least 1 item (its label)")
        if not 1 <= item_size <= ITEM_SIZE:
            raise ValueError(f"Moving Fashion-MNIST: item_size={item_size}; items are 1..{ITEM_SIZE} px "
                             f"(Fashion-MNIST's {ITEM_SIZE} px images, optionally shrunk)")
        if canvas < item_size:
            raise ValueError(f"Moving Fashion-MNIST: canvas={canvas} is smaller than the {item_size}x{item_size} "
                             f"items: use a canvas of at least {item_size} px"
                             + (f", or item_size <= {canvas}" if canvas >= 1 else ""))
        if not (math.isfinite(speed) and speed >= 0):
            raise ValueError(f"Moving Fashion-MNIST: speed={speed}; expected pixels per frame >= 0")
        self.images, self.labels = load_fashion_mnist(split, data_dir)  # labels checked against the 10 classes
        self.images = self.images[..., 0]
        self.num_clips, self.split, self.data_dir, self.seed = int(num_clips), split, data_dir, int(seed)
        self.canvas, self.items, self.frames, self.speed = int(canvas), int(items), int(frames), float(speed)
        self.item_size = int(item_size)
        self.frame_shape = (self.canvas, self.canvas, 1)
        self.classes = CLASSES
        self.num_classes = len(CLASSES)
        self.label_range = (0, self.num_classes - 1)
        self.name = f"moving_fashion_mnist/{split}"

    def __repr__(self) -> str:
        return (f"MovingFashionMNISTSource(split={self.split!r}, clips={self.num_clips}, canvas={self.canvas}, "
                f"items={self.items}, item_size={self.item_size}, frames={self.frames}, speed={self.speed}, "
                f"seed={self.seed})")

    def __len__(self) -> int:
        return self.num_clips

    def trajectory(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(the source images' indices (items,), their float (top, left) in each frame (items, frames, 2))
        of clip `index`: positions lie in [0, canvas - item_size]; drawing rounds them to whole pixels."""
        index = int(index)
        if not 0 <= index < self.num_clips:
            raise IndexError(f"{self!r}: clip {index} out of range 0..{self.num_clips - 1}")
        rng = np.random.default_rng((self.seed, _SPLIT_CODE[self.split], index))
        picks = rng.integers(0, len(self.images), self.items)
        room = self.canvas - self.item_size
        start = rng.uniform(0, room, (self.items, 1, 2))
        angle = rng.uniform(0, 2 * np.pi, (self.items, 1, 1))
        velocity = self.speed * np.concatenate([np.sin(angle), np.cos(angle)], axis=-1)  # (dy, dx) per frame
        t = np.arange(self.frames, dtype=np.float64)[None, :, None]
        return picks, bounce(start + velocity * t, room)

    def _item(self, pick: int) -> np.ndarray:
        image = self.images[pick]
        if self.item_size == ITEM_SIZE:
            return image
        from PIL import Image  # only shrunk items need it

        return np.asarray(Image.fromarray(image).resize((self.item_size,) * 2, resample=Image.BOX))

    def __getitem__(self, index: int) -> dict[str, Any]:
        picks, positions = self.trajectory(int(index))
        video = np.zeros((self.frames, self.canvas, self.canvas), np.uint8)
        corners = np.rint(positions).astype(np.int64)
        s = self.item_size
        for pick, track in zip(picks, corners):
            item = self._item(int(pick))
            for frame, (top, left) in zip(video, track):
                window = frame[top: top + s, left: left + s]
                np.maximum(window, item, out=window)
        return {"video": video[..., None], "label": np.int32(self.labels[picks[0]])}

    def check_labels(self, num_classes: int) -> None:
        """The clips carry Fashion-MNIST's 10 classes: the model must take them all."""
        if self.num_classes > num_classes:
            raise ValueError(f"{self!r}: clips are labelled with Fashion-MNIST's {self.num_classes} classes "
                             f"(0..{self.num_classes - 1}), but {model_classes(num_classes)} takes "
                             f"0..{num_classes - 1}; {NULL_CLASS_NOTE}")

    def check_fields(self, fields: tuple[str, ...], flip: bool) -> None:
        """Refuse, before training, extra fields video cannot give (no image encoder for clips)."""
        if fields:
            raise ValueError(f"Moving Fashion-MNIST clips give no {list(fields)}: extra loader fields (REPA's "
                             "encoder images and features) exist for images and image latents only")

    def example(self, record: Mapping[str, np.ndarray], rng: np.random.Generator, flip: bool,
                fields: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """{'x': float32 (F, H, W, 1) in [-1, 1], 'y': int32}; the whole clip mirrored with p = 1/2 when `flip`."""
        self.check_fields(fields, flip)
        video = np.asarray(record["video"])
        if flip and rng.random() < 0.5:
            video = video[:, :, ::-1]
        return {"x": video.astype(np.float32) / np.float32(127.5) - np.float32(1.0), "y": np.int32(record["label"])}


@register_source("moving_fmnist")
def moving_fmnist_source(data: Mapping[str, Any], split: str) -> MovingFashionMNISTSource:
    """config.data.num_clips clips of the split's Fashion-MNIST images (config.data.dir; '': Debian's)."""
    return MovingFashionMNISTSource(int(data["num_clips"]), split, data["dir"] or DEFAULT_DIR,
                                    canvas=int(data["canvas"]), items=int(data["items"]), frames=int(data["frames"]),
                                    speed=float(data["speed"]), item_size=int(data["item_size"]), seed=0)
