"""Input-transformation purifiers, batched in torch so they run on the GPU as well as the CPU.

rescale (the seed experiment's baseline), jpeg, bitdepth, median (Guo et al. 2018 and feature
squeezing), tvm (total-variation minimisation) and randpad (Xie et al. 2018).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from advpurify.purifiers.base import (
    ImageError,
    ParamError,
    Purifier,
    Settings,
    generators,
    register,
    setting,
)

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area")


class _ClipToUnit(torch.autograd.Function):
    """``clamp(0, 1)`` whose gradient is the identity. The clip only removes rounding (a sum of
    weights 1 over white pixels gives 1.0000001) and bicubic's overshoot; clamp's own zero
    gradient there would freeze every saturated pixel of an attack through the resize."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def resize(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize with antialiasing when shrinking (where torch supports it), clipped to [0, 1]."""
    if mode in ("bilinear", "bicubic"):
        out = F.interpolate(images, size=size, mode=mode, align_corners=False, antialias=True)
    else:
        out = F.interpolate(images, size=size, mode=mode)
    return _ClipToUnit.apply(out)


def _quantized(images: torch.Tensor) -> torch.Tensor:
    """Float pixels rounded to the 8-bit levels 0..255 (still float, one new tensor)."""
    return images.clamp(0, 1).mul_(255).round_()


def to_bytes(images: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` float images as uint8, rounding half to even."""
    return _quantized(images).to(torch.uint8)


@dataclass(frozen=True)
class RescaleSettings(Settings):
    factor: float = setting(0.5, "scale of the intermediate image", min=0.05, max=1.0)
    mode: str = setting("bilinear", "interpolation", choices=INTERPOLATIONS)


@dataclass(frozen=True)
class JpegSettings(Settings):
    quality: int = setting(75, "JPEG quality", min=1, max=100)


@dataclass(frozen=True)
class BitDepthSettings(Settings):
    bits: int = setting(3, "bits per channel", min=1, max=8)


@dataclass(frozen=True)
class MedianSettings(Settings):
    kernel: int = setting(3, "window side (odd)", min=3, max=15)

    def validate(self) -> None:
        if self.kernel % 2 == 0:
            raise ParamError(f"parameter kernel={self.kernel}: must be odd")


@dataclass(frozen=True)
class TotalVariationSettings(Settings):
    weight: float = setting(0.1, "denoising weight: larger removes more", min=1e-6, max=10.0)
    eps: float = setting(2e-4, "relative change of the energy that stops a channel", min=0.0)
    iterations: int = setting(200, "maximum iterations", min=1, max=10000)


@dataclass(frozen=True)
class RandomResizePadSettings(Settings):
    max_scale: float = setting(
        331 / 299,
        "padded canvas size relative to the input (Xie et al.: 331/299)",
        min=1.0,
        max=2.0,
    )
    mode: str = setting("bilinear", "interpolation", choices=INTERPOLATIONS)


@register
class Rescale(Purifier):
    name = "rescale"
    description = "Shrink by a factor and enlarge back (224 -> 112 -> 224 by default)."
    Settings = RescaleSettings
    settings: RescaleSettings
    differentiable = True

    def purify(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        height, width = images.shape[-2:]
        factor, mode = self.settings.factor, self.settings.mode
        small = (max(1, round(height * factor)), max(1, round(width * factor)))
        return resize(resize(images, small, mode), (height, width), mode)


@register
class Jpeg(Purifier):
    name = "jpeg"
    description = "JPEG compression round trip (Guo et al. 2018), libjpeg 4:2:0 on every device."
    Settings = JpegSettings
    settings: JpegSettings

    def purify(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        # One codec for every device: nvJPEG encodes 4:4:4 chroma where libjpeg (OpenCV) uses
        # 4:2:0, so a GPU run would be a weaker defence than a CPU run of the same command.
        # Only the 8-bit planes cross to the host and back (1 byte per value).
        decoded = self._libjpeg(to_bytes(images).cpu())
        return decoded.to(images.device).permute(0, 3, 1, 2).to(images.dtype).div_(255)

    def _libjpeg(self, planes: torch.Tensor) -> torch.Tensor:
        """``N x 3 x H x W`` uint8 RGB -> ``N x H x W x 3`` uint8 RGB after a JPEG round trip.

        libjpeg-turbo through OpenCV. The planes are interleaved in OpenCV's BGR order by
        cv2.merge and decoded straight to RGB into one buffer: no float round trips or strided
        float copies around the codec (they cost more than the codec did)."""
        n, _, h, w = planes.shape
        bgr = np.empty((h, w, 3), dtype=np.uint8)
        decoded = np.empty((n, h, w, 3), dtype=np.uint8)
        params = [cv2.IMWRITE_JPEG_QUALITY, self.settings.quality]
        for i, (r, g, b) in enumerate(planes.numpy()):
            cv2.merge([b, g, r], dst=bgr)
            ok, buffer = cv2.imencode(".jpg", bgr, params)
            if not ok:
                raise RuntimeError("JPEG encoding failed")
            decoded[i] = cv2.imdecode(buffer, cv2.IMREAD_COLOR_RGB)
        return torch.from_numpy(decoded)


@register
class BitDepth(Purifier):
    name = "bitdepth"
    description = "Reduce every channel to a few bits (feature squeezing, Xu et al. 2018)."
    Settings = BitDepthSettings
    settings: BitDepthSettings

    def purify(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        levels = 2**self.settings.bits - 1
        return images.clamp(0, 1).mul_(levels).round_().div_(levels)  # one new tensor


@register
class Median(Purifier):
    name = "median"
    description = "Median filter over a square window (spatial smoothing), reflect-padded."
    Settings = MedianSettings
    settings: MedianSettings

    def purify(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        k = self.settings.kernel
        height, width = images.shape[-2:]
        if min(height, width) <= k // 2:  # reflection needs more pixels than the window reaches
            raise ImageError(
                f"median kernel {k}: a {width} x {height} image is too small "
                f"(needs at least {k // 2 + 1} pixels per side)"
            )
        return median_filter(images, k)


def median_graph(images: torch.Tensor, kernel: int) -> torch.Tensor:
    """Median over ``kernel`` x ``kernel`` windows, reflect-padded, in torch on any device.

    The one torch definition, also the exported graph (``export/fused.py``): the middle of k*k
    values is the largest of the (k*k + 1) / 2 smallest, TopK being an ONNX operator where
    ``torch.median`` is not. It unfolds every window (k*k copies of the batch).
    """
    k = kernel
    n, c, h, w = images.shape
    padded = F.pad(images, (k // 2,) * 4, mode="reflect")
    windows = F.unfold(padded, kernel_size=k).view(n, c, k * k, h, w)
    return windows.topk(k * k // 2 + 1, dim=2, largest=False).values[:, :, -1]


def median_filter(images: torch.Tensor, kernel: int) -> torch.Tensor:
    """:func:`median_graph`'s values; on the CPU through OpenCV's ``medianBlur`` where it takes
    float32 (3 x 3 and 5 x 5 windows), one plane at a time, with no unfold.

    ``medianBlur`` replicates borders, so each plane is padded first with ``BORDER_REFLECT_101``
    (torch's ``reflect``) and cropped back: the same windows, the same middle value.
    """
    tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    if images.device.type != "cpu" or kernel not in (3, 5) or tracing:
        return median_graph(images, kernel)
    p = kernel // 2
    n, c, h, w = images.shape
    source = images.detach().contiguous().numpy().reshape(n * c, h, w)
    out = np.empty_like(source)
    for plane, result in zip(source, out, strict=True):
        padded = cv2.copyMakeBorder(plane, p, p, p, p, cv2.BORDER_REFLECT_101)
        result[...] = cv2.medianBlur(padded, kernel)[p : p + h, p : p + w]
    return torch.from_numpy(out).view(n, c, h, w)


@register
class TotalVariation(Purifier):
    name = "tvm"
    description = "Total-variation minimisation (Chambolle's projection, as scikit-image's)."
    Settings = TotalVariationSettings
    settings: TotalVariationSettings

    def purify(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        s = self.settings
        return tv_chambolle(images, s.weight, s.eps, s.iterations)


# On the CPU, channels are denoised a few at a time: enough to amortise torch's per-op cost,
# few enough that the working set (about 8 arrays of this many floats) stays in cache.
_TV_CHUNK_PIXELS = 400_000


def tv_chambolle(
    images: torch.Tensor, weight: float = 0.1, eps: float = 2e-4, iterations: int = 200
) -> torch.Tensor:
    """``skimage.restoration.denoise_tv_chambolle(..., channel_axis=...)``, batched.

    Each image channel is denoised on its own and stops on its own criterion, exactly as
    scikit-image does channel by channel. On the CPU a few channels advance together and a
    channel that has converged leaves the working set; on CUDA all advance together.
    """
    shape = images.shape
    if images.numel() == 0:
        return images.detach().clone()
    planes = images.detach().reshape(-1, *shape[-2:])  # one row per channel of every image
    if planes.is_cuda:
        return _tv_planes(planes, weight, eps, iterations, compact=False).reshape(shape)
    # At least 2 rows per chunk: a sum with a single output is split across threads, and so
    # rounds differently with the thread count (with 2 or more, each row is summed serially).
    chunk = max(2, _TV_CHUNK_PIXELS // (shape[-2] * shape[-1]))
    starts = list(range(0, planes.shape[0], chunk))
    if len(starts) > 1 and planes.shape[0] - starts[-1] == 1:
        starts.pop()  # no chunk of one row: the last row joins the chunk before it
    ends = [*starts[1:], planes.shape[0]]
    parts = [
        _tv_planes(planes[a:b], weight, eps, iterations, compact=True)
        for a, b in zip(starts, ends, strict=True)
    ]
    return torch.cat(parts).reshape(shape)


def _tv_planes(
    x: torch.Tensor, weight: float, eps: float, iterations: int, compact: bool
) -> torch.Tensor:
    """Chambolle's projection on ``rows x H x W`` planes; ``compact``: drop converged rows
    (keeping at least 2 rows while any is left, for the summation order; see above)."""
    result = torch.empty_like(x)
    rows = torch.arange(x.shape[0], device=x.device)
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    tau = 0.25  # 1 / (2 * ndim) for 2-D channels; a power of two, so tau * g is exact
    p = torch.zeros((2, *x.shape), dtype=x.dtype, device=x.device)
    g = torch.zeros_like(p)
    pixels = float(x.shape[-2] * x.shape[-1])
    out = x
    e_init = e_prev = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)  # set at i = 0
    for i in range(iterations):
        if i > 0:
            # minus_d = -d, the divergence of p: rounding is symmetric under negation, so
            # x - minus_d and minus_d^2 are bit for bit scikit-image's x + d and d^2.
            minus_d = p.sum(0)
            minus_d[:, 1:, :] -= p[0, :, :-1, :]
            minus_d[:, :, 1:] -= p[1, :, :, :-1]
            out = x - minus_d
            energy = minus_d.square().sum((-2, -1))
        else:
            out = x
            energy = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        torch.sub(out[:, 1:, :], out[:, :-1, :], out=g[0, :, :-1, :])
        torch.sub(out[:, :, 1:], out[:, :, :-1], out=g[1, :, :, :-1])
        norm = g[0].square().add_(g[1].square()).sqrt_()  # = g.square().sum(0), bit for bit
        energy = (energy + weight * norm.sum((-2, -1))) / pixels
        p.sub_(g, alpha=tau).div_(norm.mul_(tau / weight).add_(1.0))
        if i == 0:
            e_init = e_prev = energy
            continue
        converged = active & ((e_prev - energy).abs() < eps * e_init)
        e_prev = energy
        if not bool(converged.any()):
            continue
        result[rows[converged]] = out[converged]
        active &= ~converged
        if not bool(active.any()):
            return result
        if compact:
            keep = active.clone()
            if int(keep.sum()) < 2:  # a finished row rides along (its result is already taken)
                keep[(~active).nonzero()[0]] = True
            x, p, g, out, rows = x[keep], p[:, keep], g[:, keep], out[keep], rows[keep]
            active, e_init, e_prev = active[keep], e_init[keep], e_prev[keep]
    result[rows[active]] = out[active]
    return result


@register
class RandomResizePad(Purifier):
    name = "randpad"
    description = (
        "Random resize and random zero padding (Xie et al. 2018), then back to the input size."
    )
    Settings = RandomResizePadSettings
    settings: RandomResizePadSettings
    stochastic = True
    differentiable = True

    def purify(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        height, width = images.shape[-2:]
        max_scale, mode = self.settings.max_scale, self.settings.mode
        canvas_h, canvas_w = round(height * max_scale), round(width * max_scale)
        outputs = []
        # The draws differ per image, so each image is its own small resize; draws come from a
        # CPU generator per seed so the result is the same on every device.
        for image, gen in zip(images, generators(seeds, torch.device("cpu")), strict=True):
            scale = 1.0 + (max_scale - 1.0) * float(torch.rand((), generator=gen))
            new_h = min(canvas_h, max(height, int(height * scale)))
            new_w = min(canvas_w, max(width, int(width * scale)))
            top = int(torch.randint(0, canvas_h - new_h + 1, (), generator=gen))
            left = int(torch.randint(0, canvas_w - new_w + 1, (), generator=gen))
            resized = resize(image[None], (new_h, new_w), mode)
            padded = F.pad(
                resized, (left, canvas_w - new_w - left, top, canvas_h - new_h - top), value=0.0
            )
            outputs.append(resize(padded, (height, width), mode))
        return torch.cat(outputs)
