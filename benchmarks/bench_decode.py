"""JPEG decoding: ``load_image`` (one strict libjpeg-turbo decode) against the decoding it
replaced (Pillow's decode, then a strict 1/8-scale libjpeg-turbo pass to catch corrupt data).

Both give the same tensor for every file (checked); the ratio is CPU time per image, medians of
interleaved rounds in one process, one torch thread.

    .venv/bin/python benchmarks/bench_decode.py [--data DIR] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advpurify.images import find_images, load_image  # noqa: E402
from advpurify.paths import shared_data_dir  # noqa: E402


def decode_before(path: Path) -> torch.Tensor:
    """The previous path for an RGB/grey JPEG without EXIF rotation (what the sample holds)."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        colorspace = {"L": "GRAY"}.get(img.mode, "RGB")
        simplejpeg.decode_jpeg(data, colorspace, strict=True, min_height=1, min_width=1)
        array = np.asarray(img.convert("RGB") if img.mode == "L" else img)
    chw = torch.from_numpy(np.require(array, requirements=["C", "W"])).permute(2, 0, 1)
    return torch.empty(chw.shape, dtype=torch.float32).copy_(chw).div_(255.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=shared_data_dir() / "imagenet-sample")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = [p for p in find_images(args.data) if p.suffix.lower() in (".jpg", ".jpeg")]
    if not paths:
        raise SystemExit(f"{args.data}: no JPEG files")
    for path in paths:  # the same tensors, and every file in the page cache
        if not torch.equal(load_image(path), decode_before(path)):
            raise SystemExit(f"{path}: the two decodings differ")
    runs = {"before": decode_before, "load_image": load_image}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, decode in runs.items():
            began = time.process_time()
            for path in paths:
                decode(path)
            times[name].append((time.process_time() - began) / len(paths))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{len(paths)} JPEGs from {args.data}, identical tensors; CPU ms per image (median):")
    for name, value in median.items():
        print(f"  {name:12s} {value * 1000:.2f}")
    print(f"load_image vs before: {median['before'] / median['load_image']:.2f}x faster")


if __name__ == "__main__":
    main()
