"""The pixel convention of the BVLC Caffe ImageNet models, behind the project's [0, 1] RGB.

Caffe ImageNet models see BGR images on a 0..255 scale minus the ILSVRC-2012 mean image. The
mean image itself (``imagenet_mean.binaryproto``) cannot be fetched offline, so its per-channel
average is used: B 104.0, G 116.7, R 122.7 (the values Caffe's own examples use). The mean image
varies by only a few grey levels around those values.
"""

from __future__ import annotations

import torch

ILSVRC_MEAN_BGR = (104.0, 116.7, 122.7)


def mean_bgr(device: torch.device | str | None = None) -> torch.Tensor:
    """The ILSVRC mean as a ``1 x 3 x 1 x 1`` BGR tensor on the 0..255 scale."""
    return torch.tensor(ILSVRC_MEAN_BGR, dtype=torch.float32, device=device).view(1, 3, 1, 1)


def rgb01_to_caffe(images: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> BGR, 0..255, mean subtracted."""
    return images.flip(1) * 255.0 - mean


def caffe_to_rgb01(images: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """BGR, 0..255, mean subtracted -> [0, 1] RGB (clamped)."""
    return ((images + mean) / 255.0).clamp(0.0, 1.0).flip(1)
