"""purify-batch --method rescale over the sample images vs the I/O floor, in one run.

The I/O floor is a plain serial loop that only decodes and re-encodes the same files (same
decoder, same PNG encoder, same atomic write). The pipeline does more work (it also purifies);
overlapping decode, purify and encode in threads should make it no slower than that loop.

    .venv/bin/python benchmarks/bench_pipeline.py [--repeats 3] [--data DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from advpurify.files import atomic_write_bytes
from advpurify.images import encode_image, find_images, load_image
from advpurify.paths import shared_data_dir
from advpurify.pipeline.batch import PipelineOptions, run_pipeline
from advpurify.purifiers import create_purifier


def io_floor(files: list[Path], out: Path) -> float:
    started = time.perf_counter()
    for path in files:
        atomic_write_bytes(out / f"{path.stem}.png", encode_image(load_image(path)))
    return time.perf_counter() - started


def pipeline(folder: Path, out: Path, workers: int, batch_size: int) -> float:
    options = PipelineOptions(workers=workers, batch_size=batch_size)
    started = time.perf_counter()
    summary = run_pipeline(folder, out, create_purifier("rescale"), options)
    elapsed = time.perf_counter() - started
    assert summary.failed == 0 and summary.done == len(find_images(folder))
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=shared_data_dir() / "imagenet-sample")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    files = find_images(args.data)
    floors, pipes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats + 1):  # the first round warms caches and is dropped
            floor_out, pipe_out = Path(tmp) / "floor", Path(tmp) / "pipe"
            floor_out.mkdir()
            floor = io_floor(files, floor_out)
            pipe = pipeline(args.data, pipe_out, args.workers, args.batch_size)
            shutil.rmtree(floor_out)
            shutil.rmtree(pipe_out)
            if repeat:
                floors.append(floor)
                pipes.append(pipe)
    floor, pipe = statistics.median(floors), statistics.median(pipes)
    n = len(files)
    print(f"images: {n} from {args.data}, workers {args.workers}, batch {args.batch_size}")
    print(f"I/O floor (serial decode + PNG encode): {floor:.2f} s  {n / floor:.1f} img/s")
    print(f"purify-batch --method rescale:          {pipe:.2f} s  {n / pipe:.1f} img/s")
    print(f"ratio pipeline/floor throughput: {floor / pipe:.2f}x (target >= 1.0)")


if __name__ == "__main__":
    main()
