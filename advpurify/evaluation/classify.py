"""Classify a folder fast: decoding and preprocessing overlap with inference.

Reader threads decode and preprocess (resize the shorter side, centre crop) while the calling
thread runs the backend on the previous batch; Pillow's decoder and resampler release the GIL,
so on a CPU both proceed at once. Decoding and the antialiased resize work on 8-bit data in
Pillow: far less work than decoding to full-size float and resizing in torch, and the same
antialiased bilinear/bicubic filter. An image that already has the crop size (attacked 224x224
crops) is used as is, as the classifier itself does. Files that are not plain 8-bit RGB/grey
JPEGs or PNGs without EXIF rotation (CMYK, 16-bit, alpha, rotated) take the exact path,
``advpurify.images.load_image`` plus the classifier's own torch preprocessing. Memory stays
bounded: at most ``prefetch`` batches of decoded images exist at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from advpurify.errors import AdvpurifyError
from advpurify.images import (
    check_png_data,
    decode_jpeg_rgb,
    load_image,
    read_image_file,
)
from advpurify.models.classifiers import resize_center_crop, resize_crop_box

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize_size``, centre-crop ``crop_size`` (torchvision's)."""

    resize_size: int = 256
    crop_size: int = 224
    interpolation: str = "bilinear"

    @classmethod
    def of(cls, classifier) -> Preprocess:
        """The preprocessing a ``Classifier`` declares (``classifier.preprocessing``)."""
        p = classifier.preprocessing
        return cls(int(p.resize_size), int(p.crop_size), str(p.interpolation))

    def sizes(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(resized height, resized width, top, left), as ``Classifier.prepare`` computes them."""
        if (height, width) == (self.crop_size, self.crop_size):
            return height, width, 0, 0  # already a crop: used as is
        return resize_crop_box(height, width, self.resize_size, self.crop_size)

    def __call__(self, path: Path) -> torch.Tensor:
        fast = self._fast(path)
        return fast if fast is not None else self._exact(path)

    def _fast(self, path: Path) -> torch.Tensor | None:
        try:
            data = read_image_file(path)
            with Image.open(io.BytesIO(data)) as img:
                plain = img.format in ("JPEG", "PNG") and img.mode in ("RGB", "L")
                plain = plain and getattr(img, "n_frames", 1) == 1  # else refused, exactly
                if not plain or img.getexif().get(0x0112, 1) != 1 or "transparency" in img.info:
                    return None
                if img.format == "PNG" and data[24:25] != b"\x08":
                    return None  # not 8 bits per sample (IHDR's bit depth): Pillow would round
                if img.format == "PNG":
                    check_png_data(data)
                width, height = img.size
                new_h, new_w, top, left = self.sizes(height, width)
                if img.format == "JPEG":
                    # Pillow's pixels in one strict decode that refuses corrupt data (Pillow
                    # only warns), faster than Pillow's own decode.
                    img = Image.fromarray(decode_jpeg_rgb(data))
                elif img.mode != "RGB":
                    img = img.convert("RGB")
                if img.size != (new_w, new_h):
                    # Resample only the source region that lands in the crop: the same filter
                    # and pixel grid as resizing everything and cropping, with less work.
                    sx, sy = width / new_w, height / new_h
                    box = (
                        left * sx,
                        top * sy,
                        (left + self.crop_size) * sx,
                        (top + self.crop_size) * sy,
                    )
                    img = img.resize(
                        (self.crop_size, self.crop_size),
                        _RESAMPLE[self.interpolation],
                        box=box,
                        reducing_gap=None,
                    )
                else:
                    img = img.crop((left, top, left + self.crop_size, top + self.crop_size))
                array = np.asarray(img)
        except (AdvpurifyError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return None  # the exact path decodes again and names the problem
        # numpy, not torch: small torch ops in reader threads each start an OpenMP parallel
        # region that competes with inference for the cores (14 ms per op under load, here).
        chw = np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)
        np.divide(chw, 255.0, out=chw)
        return torch.from_numpy(chw)

    def _exact(self, path: Path) -> torch.Tensor:
        image = load_image(path)[None]
        if tuple(image.shape[-2:]) == (self.crop_size, self.crop_size):
            return image[0]  # already a crop: used as is, as by the fast path and the classifier
        return resize_center_crop(image, self.resize_size, self.crop_size, self.interpolation)[0]


@dataclasses.dataclass
class Batch:
    paths: list[Path]
    images: torch.Tensor
    failures: list[tuple[Path, str]]


def iter_batches(
    paths: Sequence[Path],
    prepare: Callable[[Path], torch.Tensor],
    batch_size: int = 16,
    workers: int = 2,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """Batches of prepared images in input order, decoded ahead by ``workers`` threads."""
    if batch_size < 1 or workers < 1:
        raise AdvpurifyError("batch size and workers must be at least 1")

    def load(path: Path) -> torch.Tensor | str:
        try:
            return prepare(path)
        except AdvpurifyError as error:
            return getattr(error, "reason", None) or str(error)  # the path is reported beside

    window = batch_size * (prefetch + 1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="decode", initializer=_lower_priority)
    with pool:
        pending: deque[tuple[Path, Future]] = deque()
        index = 0
        batch_paths: list[Path] = []
        batch_images: list[torch.Tensor] = []
        failures: list[tuple[Path, str]] = []
        while pending or index < len(paths):
            while index < len(paths) and len(pending) < window:
                pending.append((paths[index], pool.submit(load, paths[index])))
                index += 1
            path, future = pending.popleft()
            result = future.result()
            if isinstance(result, str):
                failures.append((path, result))
            else:
                batch_paths.append(path)
                batch_images.append(result)
            if len(batch_images) == batch_size:
                yield Batch(batch_paths, _stack(batch_images), failures)
                batch_paths, batch_images, failures = [], [], []
        if batch_images or failures:
            images = _stack(batch_images) if batch_images else torch.empty(0, 3, 1, 1)
            yield Batch(batch_paths, images, failures)


def _lower_priority() -> None:
    """Readers yield to inference: decoding needs a few percent of the CPU, and a reader that
    preempts one of the inference threads stalls the whole parallel operator (Linux: threads
    have their own nice value; elsewhere this does nothing)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    # One memcpy per image through numpy; no OpenMP region beside a running inference.
    return torch.from_numpy(np.stack([image.numpy() for image in images]))


@dataclasses.dataclass
class FolderResult:
    paths: list[Path]
    logits: torch.Tensor
    failures: list[tuple[Path, str]]
    seconds: float

    @property
    def images_per_s(self) -> float:
        return len(self.paths) / self.seconds if self.seconds > 0 else 0.0


def classify_paths(
    paths: Sequence[Path],
    run: Callable[[torch.Tensor], torch.Tensor],
    prepare: Callable[[Path], torch.Tensor],
    *,
    batch_size: int = 16,
    workers: int = 2,
) -> FolderResult:
    """Logits for every readable file in ``paths`` (``run``: a backend or any batch function)."""
    started = time.perf_counter()
    kept: list[Path] = []
    logits: list[torch.Tensor] = []
    failures: list[tuple[Path, str]] = []
    for batch in iter_batches(paths, prepare, batch_size, workers):
        failures.extend(batch.failures)
        if batch.paths:
            kept.extend(batch.paths)
            logits.append(run(batch.images).float().cpu())
    out = torch.cat(logits) if logits else torch.empty(0, 0)
    return FolderResult(kept, out, failures, time.perf_counter() - started)
