"""Peak memory of purify-batch on 1,000 vs 10,000 images: flat, since queues are bounded.

Each size runs in a fresh process so that its peak resident memory is its own.

    .venv/bin/python benchmarks/bench_memory.py [--small 1000] [--large 10000]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def make_folder(folder: Path, count: int) -> None:
    """``count`` random 128x96 PNG files, a thousand per sub-folder."""
    rng = np.random.default_rng(0)
    for k in range(count):
        sub = folder / f"{k // 1000:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"{k:05d}.png")


def child(folder: str, out: str) -> None:
    from advpurify.pipeline.batch import PipelineOptions, run_pipeline
    from advpurify.purifiers import create_purifier

    summary = run_pipeline(folder, out, create_purifier("rescale"), PipelineOptions(batch_size=16))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{summary.done} {summary.seconds:.2f} {peak_mib:.1f}")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=10000)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for count in (args.small, args.large):
            folder = Path(tmp) / f"in{count}"
            make_folder(folder, count)
            line = subprocess.check_output(
                [sys.executable, __file__, "--child", str(folder), str(Path(tmp) / f"out{count}")],
                text=True,
            )
            done, seconds, peak = line.split()
            results[count] = float(peak)
            print(f"{done} images of 128x96: {float(seconds):.1f} s, peak RSS {peak} MiB")
    ratio = results[args.large] / results[args.small]
    print(f"peak memory ratio {args.large} / {args.small} images: {ratio:.2f} (flat: ~1.0)")


if __name__ == "__main__":
    main()
