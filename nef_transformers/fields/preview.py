"""Preview pictures: fitted fields beside the signals they were fitted to, as one PNG a person can glance at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .render import render_images
from .spec import SirenSpec


def image_pairs_grid(real: np.ndarray, fitted: np.ndarray, columns: int = 8) -> np.ndarray:
    """Interleave real and fitted images into one uint8 grid: each cell is ``[real | fitted]``, 1-pixel gaps.

    Args:
        real, fitted: ``(b, H, W, C)`` floats in ``[0, 1]``.
    """
    if real.shape != fitted.shape:
        raise ValueError(f"real {real.shape} and fitted {fitted.shape} images differ in shape")
    count, height, width, channels = real.shape
    rows = -(-count // columns)
    cell_w = 2 * width + 1
    grid = np.full((rows * (height + 1) + 1, columns * (cell_w + 1) + 1, channels), 1.0, dtype=np.float32)
    for i in range(count):
        top = 1 + (i // columns) * (height + 1)
        left = 1 + (i % columns) * (cell_w + 1)
        grid[top:top + height, left:left + width] = real[i]
        grid[top:top + height, left + width + 1:left + cell_w] = fitted[i]
    return np.round(grid * 255).astype(np.uint8)


def save_image_preview(source, spec: SirenSpec, weights: torch.Tensor, indices, path: str | Path,
                       columns: int = 8) -> Path:
    """Write ``path`` (PNG): each fitted field rendered beside its source image (``indices`` into ``source``)."""
    from PIL import Image

    fitted = render_images(spec, weights, source.image_shape, source.mean, source.std)
    real = source.images[np.asarray(indices)].astype(np.float32) / 255.0
    grid = image_pairs_grid(real, fitted, columns)
    path = Path(path)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    # small images (28 px digits) are scaled up so the picture is readable
    scale = max(1, 512 // picture.width)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    picture.save(path)
    return path
