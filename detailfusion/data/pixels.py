"""Reading the decoded uint8 pixel cache (``pixels.npy``) that ``prepare`` writes.

Training, evaluation and batch retrieval all take images from here (never a PNG decode), so the
few helpers that turn cache rows into model input live next to the cache itself.
"""

from __future__ import annotations

import numpy as np
import torch


def gather_pixels(pixels: np.ndarray, index: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] tensor for the given cache rows (memmap friendly: one sorted read)."""
    index = np.asarray(index, dtype=np.int64)
    uniq, inverse = np.unique(index, return_inverse=True)
    block = np.asarray(pixels[uniq])
    return torch.from_numpy(block[inverse])


def blank_pixels(mean: tuple[float, ...] | list[float], n: int, size: int) -> torch.Tensor:
    """``n`` uint8 images of ``size`` x ``size`` filled with the per-channel ``mean`` (0..1 scale).

    After the model's normalisation they are (near) zero: the "no reference image" input of the
    text-only baseline.
    """
    colour = torch.tensor([int(255 * m) for m in mean], dtype=torch.uint8)
    return colour.view(1, 1, 1, 3).expand(n, size, size, 3).contiguous()
