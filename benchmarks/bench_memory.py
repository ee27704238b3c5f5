"""Peak memory of purify-batch: flat in the image count, bounded by the pixel budget.

Each case runs in a fresh process so that its peak resident memory is its own.

    .venv/bin/python benchmarks/bench_memory.py count [--small 1000] [--large 10000]
    .venv/bin/python benchmarks/bench_memory.py pixels

``count``: 1,000 vs 10,000 small images (queues are bounded: the ratio stays ~1).
``pixels`` (issue 11, item 6): eight 4000 x 4000 PNGs with ``rescale``, the pixel budget off
(every decoded image admitted, as before the budget) vs the default budget; then one
12000 x 12000 JPEG, refused from its header by the default per-image limit vs decoded with the
limit raised above it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

UNBOUNDED = 10**12


def make_small_folder(folder: Path, count: int) -> None:
    """``count`` random 128x96 PNG files, a thousand per sub-folder."""
    rng = np.random.default_rng(0)
    for k in range(count):
        sub = folder / f"{k // 1000:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"{k:05d}.png")


def make_large_folders(root: Path) -> tuple[Path, Path]:
    """Eight 4000 x 4000 PNGs (a few tens of KB each: smooth gradients) and one 12000 x 12000
    JPEG: small files, huge decoded images."""
    pngs, jpeg = root / "png4000", root / "jpeg12000"
    pngs.mkdir()
    jpeg.mkdir()
    ramp = np.linspace(0, 255, 4000, dtype=np.float32)
    for k in range(8):
        pixels = np.stack([np.add.outer(ramp, ramp * 0) * (k + 1) / 8] * 3, axis=2)
        Image.fromarray(pixels.astype(np.uint8)).save(pngs / f"{k}.png")
    Image.new("RGB", (12000, 12000), (90, 120, 150)).save(jpeg / "big.jpg", quality=90)
    return pngs, jpeg


def child(folder: str, out: str, method: str, options_json: str) -> None:
    from advpurify.pipeline.batch import PipelineOptions, run_pipeline
    from advpurify.purifiers import create_purifier

    options = PipelineOptions(**json.loads(options_json))
    summary = run_pipeline(folder, out, create_purifier(method), options)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{summary.done} {summary.failed} {summary.seconds:.2f} {peak_mib:.1f}")


def run_child(folder: Path, out: Path, method: str, **options) -> tuple[int, int, float, float]:
    line = subprocess.check_output(
        [sys.executable, __file__, "--child", str(folder), str(out), method, json.dumps(options)],
        text=True,
    )
    done, failed, seconds, peak = line.split()
    return int(done), int(failed), float(seconds), float(peak)


def bench_count(small: int, large: int) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for count in (small, large):
            folder = Path(tmp) / f"in{count}"
            make_small_folder(folder, count)
            done, _, seconds, peak = run_child(
                folder, Path(tmp) / f"out{count}", "rescale", batch_size=16
            )
            results[count] = peak
            print(f"{done} images of 128x96: {seconds:.1f} s, peak RSS {peak:.0f} MiB")
    ratio = results[large] / results[small]
    print(f"peak memory ratio {large} / {small} images: {ratio:.2f} (flat: ~1.0)")


def bench_pixels() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pngs, jpeg = make_large_folders(Path(tmp))
        cases = [
            ("8 x 4000x4000 PNG, budget off", pngs, dict(pixel_budget=UNBOUNDED)),
            ("8 x 4000x4000 PNG, default budget", pngs, {}),
            ("12000x12000 JPEG, default limit", jpeg, {}),
            ("12000x12000 JPEG, limit 150 MP", jpeg, dict(max_image_pixels=150_000_000)),
        ]
        peaks = []
        for k, (label, folder, options) in enumerate(cases):
            done, failed, seconds, peak = run_child(
                folder, Path(tmp) / f"out{k}", "rescale", workers=2, batch_size=16, **options
            )
            peaks.append(peak)
            print(
                f"{label}: {done} done, {failed} failed, {seconds:.1f} s, peak RSS {peak:.0f} MiB"
            )
        print(
            f"peak memory ratio, 8 x 16 MP, default budget / budget off: {peaks[1] / peaks[0]:.2f}"
        )


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=["count", "pixels"], nargs="?", default="count")
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=10000)
    args = parser.parse_args()
    if args.case == "count":
        bench_count(args.small, args.large)
    else:
        bench_pixels()


if __name__ == "__main__":
    main()
