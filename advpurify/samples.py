"""Real photographs shipped inside installed packages, for demos that need no network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from advpurify.images import save_image

# scikit-image's bundled photographs (no download needed) and matplotlib's portrait.
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "retina",
    "hubble_deep_field",
)


def sample_photos() -> dict[str, np.ndarray]:
    """Name -> H x W x 3 uint8 RGB array."""
    import matplotlib.cbook
    import skimage.data
    from PIL import Image

    photos = {}
    for name in SKIMAGE_PHOTOS:
        array = getattr(skimage.data, name)()
        photos[name] = np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with Image.open(path) as img:
        photos["grace_hopper"] = np.asarray(img.convert("RGB"))
    return photos


def write_sample_photos(folder: Path | str) -> list[Path]:
    """Write the sample photographs as PNG files into ``folder``; existing files are kept."""
    folder = Path(folder)
    written = []
    for name, array in sample_photos().items():
        path = folder / f"{name}.png"
        if not path.exists():
            image = torch.from_numpy(np.array(array)).permute(2, 0, 1).float().div(255)
            save_image(image, path)
        written.append(path)
    return written
