"""A folder of images decoded, resized and centre-cropped to a classifier's input size.

Images are held as 8-bit ``N x 3 x S x S`` tensors (what a PNG stores, a quarter of float32's
memory); :meth:`Dataset.float_images` gives the ``[0, 1]`` batch. Files that fail to decode are
recorded as failures and skipped, as ``purify-batch`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from advpurify.errors import AdvpurifyError
from advpurify.images import IMAGE_EXTENSIONS, find_images, load_image_with_profile


@dataclass(frozen=True)
class Failure:
    path: Path
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": str(self.path), "reason": self.reason}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.clamp(0, 1).mul(255).round().to(torch.uint8)


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.to(torch.float32).div(255)


@dataclass
class Dataset:
    root: Path
    paths: list[Path]
    images: torch.Tensor  # N x 3 x S x S uint8
    failures: list[Failure] = field(default_factory=list)
    profiles: list[bytes | None] = field(default_factory=list)
    """Each image's RGB colour profile (None: none), for what is written from it to carry."""

    def profile(self, index: int) -> bytes | None:
        return self.profiles[index] if self.profiles else None

    def __len__(self) -> int:
        return len(self.paths)

    def relative(self, index: int) -> str:
        return relative_key(self.paths[index], self.root)

    def keys(self) -> list[str]:
        return [self.relative(i) for i in range(len(self))]

    def float_images(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        images = self.images if indices is None else self.images[list(indices)]
        return to_float(images)


def relative_key(path: Path, root: Path) -> str:
    """The image's path below the data root (its identity in manifests, seeds and outputs)."""
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        rel = path.name
    return rel if rel != "." else path.name


def list_images(root: Path, left_out: list[Path] | None = None) -> tuple[Path, list[Path]]:
    """``(root, files)``: a folder's images (recursive, sorted) or a single file; what was
    passed over goes to ``left_out`` (see ``find_images``)."""
    root = Path(root)
    if root.is_file():
        return root.parent, [root]
    if not root.is_dir():
        raise AdvpurifyError(f"{root}: no such file or folder")
    left_out = [] if left_out is None else left_out
    paths = find_images(root, left_out)
    if not paths:
        found_by = " ".join(sorted(IMAGE_EXTENSIONS))
        linked = [path.name for path in left_out if path.is_dir()]
        beside = f"; folders reached through a link are not entered: {linked[0]}" if linked else ""
        raise AdvpurifyError(f"{root}: no images found (looked for {found_by}{beside})")
    return root, paths


def load_dataset(
    root: Path,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    size: int,
    limit: int | None = None,
    workers: int = 4,
) -> Dataset:
    """Decode every image under ``root`` and ``prepare`` it (resize + crop to ``size``)."""
    root, paths = list_images(root)
    if limit is not None:
        paths = paths[:limit]

    def load(path: Path) -> tuple[torch.Tensor, bytes | None] | Failure:
        try:
            image, profile = load_image_with_profile(path)
        except AdvpurifyError as error:
            reason = getattr(error, "reason", None) or str(error)
            return Failure(path, reason)
        try:
            with torch.no_grad():
                prepared = prepare(image[None])[0]
        except AdvpurifyError as error:  # too elongated to resize: this image alone
            return Failure(path, str(error))
        if tuple(prepared.shape[-2:]) != (size, size):
            return Failure(path, f"image too small to crop {size}x{size}")
        return to_uint8(prepared), profile

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(load, paths))
    kept = [(p, r) for p, r in zip(paths, results, strict=True) if not isinstance(r, Failure)]
    failures = [r for r in results if isinstance(r, Failure)]
    if not kept:
        detail = (
            f" ({len(failures)} failed to decode, first: {failures[0].path})" if failures else ""
        )
        raise AdvpurifyError(f"{root}: no readable images{detail}")
    return Dataset(
        root=root,
        paths=[p for p, _ in kept],
        images=torch.stack([image for _, (image, _) in kept]),
        failures=failures,
        profiles=[profile for _, (_, profile) in kept],
    )
