"""Sample grids: model-space images in [-1, 1] -> one uint8 picture, saved as PNG."""

from __future__ import annotations

import math
import os

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] float NHWC -> uint8 NHWC, as ADM sample batches store them."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 (rows * (H + pad) + pad, ..., C) grid, row-major."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return grid


def save_png(path: str, grid: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
