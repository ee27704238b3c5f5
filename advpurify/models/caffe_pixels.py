"""The pixel convention of the BVLC Caffe ImageNet models, behind the project's [0, 1] RGB.

Caffe ImageNet models see BGR images on a 0..255 scale minus the ILSVRC-2012 mean image. The
mean image ships with the package (``data/ilsvrc_2012_mean.npz``: the 256 x 256 x 3 BGR
``image_mean`` of the PPGN code's ``ilsvrc_2012_mean.mat``, stored as float16, 90 KB; float16
is within 0.0625 grey levels of the original). A network with a smaller input sees its centre,
cropped at ``(256 - size) // 2`` as Caffe's and the PPGN code's centre crop do.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

MEAN_FILE = Path(__file__).resolve().parent / "data" / "ilsvrc_2012_mean.npz"
MEAN_SIZE = 256


@lru_cache(maxsize=1)
def _mean_hwc() -> np.ndarray:
    with np.load(MEAN_FILE) as data:
        return data["image_mean"].astype(np.float32)


def crop_offset(size: int, full: int = MEAN_SIZE) -> int:
    """Caffe's centre-crop offset: ``(256 - 227) // 2 = 14``."""
    return (full - size) // 2


def mean_image(size: int = MEAN_SIZE, device: torch.device | str | None = None) -> torch.Tensor:
    """The ILSVRC mean image's ``size`` x ``size`` centre, ``1 x 3 x size x size`` BGR 0..255."""
    if not 0 < size <= MEAN_SIZE:
        raise ValueError(f"mean image size {size}: must be 1..{MEAN_SIZE}")
    o = crop_offset(size)
    crop = _mean_hwc()[o : o + size, o : o + size]
    return torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].contiguous().to(device)


def rgb01_to_caffe(images: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> BGR, 0..255, mean subtracted."""
    return images.flip(1) * 255.0 - mean


def caffe_to_rgb01(images: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """BGR, 0..255, mean subtracted -> [0, 1] RGB (clamped)."""
    return ((images + mean) / 255.0).clamp(0.0, 1.0).flip(1)
