"""Training crops for the Context Encoder: a map-style dataset with one seed per sample.

Sample ``k`` of a run is drawn from its own generator, seeded by ``(seed, k)``: the image, the
crop's scale and position and the flip depend on nothing else. So a ``DataLoader`` may decode
in any number of worker processes, in any order, and a resumed run continues with exactly the
crops an uninterrupted one would have drawn (it starts at sample ``step * batch_size``).

The crop: a random square whose side is a uniform fraction ``min_crop..1`` of the image's
shorter side, flipped horizontally half of the time, resized to 128 x 128 (antialiased when
shrinking). A file that does not decode is skipped: the sample draws again from its own
generator, and the file's error travels with the batch so the main process can warn once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from advpurify.errors import AdvpurifyError
from advpurify.images import ImageDecodeError, load_image
from advpurify.models.context_encoder import FINE_SIZE


class TrainError(AdvpurifyError):
    """Bad training input: no images, an unreadable or mismatched checkpoint."""


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The generator of sample ``index`` of a run seeded ``seed``."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


class CropDataset(Dataset):
    """``dataset[k]`` -> (``3 x 128 x 128`` float32 crop in [0, 1], skipped-file messages).

    Decoded images are kept in memory (uint8) up to ``cache_mb`` per process; beyond that they
    are decoded again when drawn.
    """

    def __init__(
        self, paths: list[Path], seed: int, min_crop: float = 0.3, cache_mb: float = 1024
    ) -> None:
        if not paths:
            raise TrainError("no images to train on")
        self.paths = list(paths)
        self.seed = seed
        self.min_crop = min_crop
        self.cache: dict[int, torch.Tensor] = {}
        self.cache_bytes, self.cache_limit = 0, int(cache_mb * 2**20)
        self.bad: dict[int, str] = {}

    def __len__(self) -> int:  # samples are indexed without end; this bounds a plain loop
        return 2**62

    def _image(self, index: int) -> torch.Tensor | None:
        if index in self.cache:
            return self.cache[index]
        if index in self.bad:
            return None
        try:
            image = load_image(self.paths[index])
        except ImageDecodeError as error:
            self.bad[index] = f"skipping {error}"
            if len(self.bad) == len(self.paths):
                raise TrainError(
                    f"none of the {len(self.paths)} images could be read (the last: {error})"
                ) from None
            return None
        stored = (image * 255).round().to(torch.uint8)
        if self.cache_bytes + stored.numel() <= self.cache_limit:
            self.cache[index] = stored
            self.cache_bytes += stored.numel()
        return stored

    def __getitem__(self, k: int) -> tuple[torch.Tensor, str]:
        generator = sample_generator(self.seed, k)

        def draw(high: int) -> int:
            return int(torch.randint(high, (1,), generator=generator))

        skipped = []
        while True:
            index = draw(len(self.paths))
            new_failure = index not in self.bad
            image = self._image(index)
            if image is not None:
                break
            if new_failure:
                skipped.append(self.bad[index])
        _, height, width = image.shape
        short = min(height, width)
        fraction = self.min_crop + (1 - self.min_crop) * float(torch.rand((), generator=generator))
        side = max(1, min(short, round(fraction * short)))
        top = draw(height - side + 1)
        left = draw(width - side + 1)
        flip = bool(torch.rand((), generator=generator) < 0.5)
        patch = image[:, top : top + side, left : left + side].float().div_(255)[None]
        if flip:
            patch = patch.flip(-1)
        patch = F.interpolate(
            patch,
            size=(FINE_SIZE, FINE_SIZE),
            mode="bilinear",
            align_corners=False,
            antialias=side > FINE_SIZE,
        )
        return patch[0].clamp_(0, 1), "\n".join(skipped)

    def batch(self, start: int, count: int) -> torch.Tensor:
        """Samples ``start .. start + count - 1`` as one batch, in this process."""
        return torch.stack([self[k][0] for k in range(start, start + count)])


class SampleRange(Sampler[int]):
    """Sample indices ``start .. stop - 1`` in order (the run's position is the index)."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)
