"""Context Encoder purification: regenerate image regions from their surroundings.

``center`` is the original experiment: the image is scaled so that its shorter side is ``size``
pixels (aspect kept), the generator inpaints the hole of the central 128 x 128 crop, and the
inpainted hole, scaled back, replaces the centre of the image at its native resolution; every
other pixel is returned untouched. ``size`` 128 (the default) shows the generator the whole
(square) image: the hole covers the central 44% of each side. The released ImageNet model was
trained on 128-pixel crops of images whose shorter side was 350: ``size=350`` shows it objects
at that scale, but its hole then covers only 16% of each side (docs/methods.md).

``tiled`` slides the hole over a grid so that every region is regenerated from its context:
the image is scaled so that its shorter side is ``size`` pixels and reflect-padded, each
56 x 56 hole of the grid is inpainted from its 128 x 128 context, overlapping holes are blended
with a tent window, and the result is scaled back. All windows of all images in a batch go
through the generator together (in chunks of ``batch``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from advpurify.models.context_encoder import (
    CENTER_START,
    DEFAULT_WEIGHTS,
    FINE_SIZE,
    HOLE_END,
    HOLE_START,
    ContextEncoder,
    load_generator,
)
from advpurify.purifiers.base import ParamError, Purifier, Settings, register, setting
from advpurify.runtime.installed import CHOICES as BACKEND_CHOICES

HOLE = HOLE_END - HOLE_START  # 56
PAD = HOLE_START  # context to the left of / above a hole: 36
INNER = slice(HOLE_START - CENTER_START, HOLE_END - CENTER_START)  # the hole in the 64 x 64 output


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize, antialiased when shrinking (so downscaling does not alias)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrink = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def center_view(height: int, width: int, size: int = FINE_SIZE) -> tuple[int, int, int, int]:
    """``center`` mode's working image: shorter side ``size`` (at least 128), aspect kept, and
    the top-left corner of its central 128 x 128 crop: h, w, top, left."""
    scale = max(size, FINE_SIZE) / min(height, width)
    h, w = max(FINE_SIZE, round(height * scale)), max(FINE_SIZE, round(width * scale))
    return h, w, (h - FINE_SIZE) // 2, (w - FINE_SIZE) // 2


def hole_box(height: int, width: int, size: int = FINE_SIZE) -> tuple[int, int, int, int]:
    """The hole [36:92] of the central 128 x 128 crop, in native pixels: y0, y1, x0, x1."""
    h, w, top, left = center_view(height, width, size)
    y0 = min(round((top + HOLE_START) * height / h), height - 1)
    x0 = min(round((left + HOLE_START) * width / w), width - 1)
    # At least one native pixel: a small image (or a large working size) rounds the hole away.
    y1 = max(round((top + HOLE_END) * height / h), y0 + 1)
    x1 = max(round((left + HOLE_END) * width / w), x0 + 1)
    return y0, y1, x0, x1


def grid_starts(length: int, stride: int) -> torch.Tensor:
    """Hole positions along one axis: every ``stride`` pixels, the last flush with the end."""
    starts = list(range(0, length - HOLE + 1, stride))
    if starts[-1] != length - HOLE:
        starts.append(length - HOLE)
    return torch.tensor(starts)


def tent(device: torch.device) -> torch.Tensor:
    """56 x 56 blending weights: highest in the middle of a hole, positive up to its edge."""
    ramp = torch.arange(HOLE, device=device, dtype=torch.float32)
    line = torch.minimum(ramp + 1, HOLE - ramp)
    return line[:, None] * line[None, :]


@dataclass(frozen=True)
class ContextEncoderSettings(Settings):
    mode: str = setting(
        "center", "center: the original experiment; tiled: whole image", choices=("center", "tiled")
    )
    weights: str = setting(
        DEFAULT_WEIGHTS,
        "a checkpoint from `advpurify train context-encoder`, a .safetensors/.t7 file, "
        "or cached weights",
    )
    size: int = setting(
        128,
        "shorter image side at which holes are inpainted (350: the released model's scale)",
        min=HOLE,
        max=4096,
    )
    stride: int = setting(
        28, "tiled: hole spacing in working pixels (<= 56 covers all)", min=1, max=HOLE
    )
    batch: int = setting(256, "most windows per generator call", min=1, max=65536)
    backend: str = setting(
        "torch", "where the generator runs (engine backends)", choices=BACKEND_CHOICES
    )

    def validate(self) -> None:
        if self.mode == "center" and self.size < FINE_SIZE:  # its 128 x 128 crop must fit
            raise ParamError(
                f"parameter size={self.size}: mode=center needs at least {FINE_SIZE} "
                f"(below, only mode=tiled, down to {HOLE})"
            )


@register
class ContextEncoderPurifier(Purifier):
    name = "context-encoder"
    description = (
        "Context Encoder inpainting (Pathak et al. 2016): regenerate the centre (center) or "
        "every region of the image from its surroundings (tiled)"
    )
    Settings = ContextEncoderSettings
    settings: ContextEncoderSettings
    stochastic = False
    differentiable = True  # on the torch backend: resizes, generator and blending all have grads

    def __init__(
        self, settings: ContextEncoderSettings | None = None, *, device: str | torch.device = "cpu"
    ) -> None:
        super().__init__(settings, device=device)
        self.model = ContextEncoder(load_generator(self.settings.weights)).eval().to(self.device)
        self._backend = None
        self._digest: str | None = None
        # Gradients flow through the torch backend only (exported engines are inference-only).
        self.differentiable = self.settings.backend == "torch"
        if self.settings.backend != "torch":
            from advpurify.runtime.backends import create_backend

            self._backend = create_backend(
                self.settings.backend,
                self.model,
                device=str(self.device),
                label="context-encoder",
                sample_shape=(3, FINE_SIZE, FINE_SIZE),
                max_batch=self.settings.batch,
            )

    def config(self) -> dict[str, Any]:
        # The weights' content, not only their path: a checkpoint retrained in place must not
        # be mistaken for the old one by resumable runs and cached experiment stages.
        if self._digest is None:
            from advpurify.runtime.onnx_cache import module_digest

            self._digest = module_digest(self.model.generator)
        return {**super().config(), "generator_sha256": self._digest}

    # ------------------------------------------------------------------ generator
    def inpaint(self, contexts: torch.Tensor) -> torch.Tensor:
        """``T x 3 x 128 x 128`` contexts -> ``T x 3 x 56 x 56`` inpainted holes, in chunks."""
        outputs = []
        for chunk in contexts.split(self.settings.batch):
            if self._backend is not None:
                centre = self._backend(chunk.contiguous())
            else:
                model = self.model.to(chunk.device)
                with torch.set_grad_enabled(torch.is_grad_enabled() and chunk.requires_grad):
                    centre = model(chunk)
            outputs.append(centre[:, :, INNER, INNER])
        return torch.cat(outputs)

    # ------------------------------------------------------------------ modes
    def purify(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        if self.settings.mode == "center":
            return self.purify_center(images)
        return self.purify_tiled(images)

    def purify_center(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        h, w, top, left = center_view(height, width, self.settings.size)
        view = resize(images, (h, w))[..., top : top + FINE_SIZE, left : left + FINE_SIZE]
        holes = self.inpaint(view)
        y0, y1, x0, x1 = hole_box(height, width, self.settings.size)
        patch = resize(holes, (y1 - y0, x1 - x0)).clamp(0, 1)
        # Out of place, so that autograd sees the paste; pixels outside the box are copied.
        keep = torch.ones_like(images[:1, :1])
        keep[..., y0:y1, x0:x1] = 0
        return images * keep + F.pad(patch, (x0, width - x1, y0, height - y1)) * (1 - keep)

    def purify_tiled(self, images: torch.Tensor) -> torch.Tensor:
        n, _, height, width = images.shape
        scale = self.settings.size / min(height, width)
        h, w = max(HOLE, round(height * scale)), max(HOLE, round(width * scale))
        work = resize(images, (h, w))
        padded = F.pad(work, (PAD, FINE_SIZE - HOLE - PAD) * 2, mode="reflect")
        ys, xs = (grid_starts(h, self.settings.stride), grid_starts(w, self.settings.stride))
        ys, xs = ys.to(images.device), xs.to(images.device)
        window = torch.arange(FINE_SIZE, device=images.device)
        rows = (ys[:, None] + window)[:, None, :, None]  # ny x 1 x 128 x 1
        cols = (xs[:, None] + window)[None, :, None, :]  # 1 x nx x 1 x 128
        contexts = padded[:, :, rows, cols]  # N x 3 x ny x nx x 128 x 128
        ny, nx = len(ys), len(xs)
        contexts = contexts.permute(0, 2, 3, 1, 4, 5).reshape(n * ny * nx, 3, FINE_SIZE, FINE_SIZE)
        holes = self.inpaint(contexts).reshape(n, ny, nx, 3, HOLE, HOLE)

        weight = tent(images.device)
        hole = torch.arange(HOLE, device=images.device)
        index = (
            torch.arange(n, device=images.device).view(n, 1, 1, 1, 1, 1),
            torch.arange(3, device=images.device).view(1, 1, 1, 3, 1, 1),
            (ys[:, None] + hole).view(1, ny, 1, 1, HOLE, 1),
            (xs[:, None] + hole).view(1, 1, nx, 1, 1, HOLE),
        )
        total = work.new_zeros(n, 3, h, w).index_put(index, holes * weight, accumulate=True)
        norm = work.new_zeros(1, 1, h, w).index_put(
            (index[0][:1] * 0, index[1][:, :, :, :1] * 0, index[2], index[3]),
            weight.expand(1, ny, nx, 1, HOLE, HOLE),
            accumulate=True,
        )
        return resize(total / norm, (height, width)).clamp(0, 1)
