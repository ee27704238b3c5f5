"""Seconds per image per DIP iteration: batch 1 vs batch 8, batched fitter vs a loop over images.

Every configuration is timed in interleaved rounds in one process (medians), so machine load
hits them alike. On the CPU the batched fitter defaults to one conv per network inside the
batched pass (``conv=split``); ``conv=grouped`` (one grouped conv for all, the CUDA default)
is timed beside it.

    .venv/bin/python benchmarks/bench_dip.py [--size 224] [--iterations 6] [--device auto]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from advpurify.devices import resolve_device
from advpurify.purifiers.dip import DipSettings, fit


def seconds_per_image_iteration(images: torch.Tensor, settings: DipSettings, loop: bool) -> float:
    seeds = list(range(images.shape[0]))
    if images.is_cuda:
        torch.cuda.synchronize()
    began = time.perf_counter()
    if loop:
        for i, seed in enumerate(seeds):
            fit(images[i : i + 1], [seed], settings)
    else:
        fit(images, seeds, settings)
    if images.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - began) / settings.iterations / images.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--channels", type=int, default=None)
    parser.add_argument(
        "--reference-channels",
        type=int,
        default=32,
        help="also time batch 1 of the issue's reference net (plain skip net of this width)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    images = torch.rand(
        args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)
    ).to(device)

    def settings(
        conv: str = "auto", iterations: int = args.iterations, channels: int | None = None
    ) -> DipSettings:
        return DipSettings.from_preset(
            args.preset, iterations=iterations, channels=channels or args.channels, conv=conv
        )

    configs = {
        "batch 1": (images[:1], settings(), False),
        f"batch {args.batch}, batched": (images, settings(), False),
        f"batch {args.batch}, loop over images": (images, settings(), True),
    }
    if device.type == "cpu":
        configs[f"batch {args.batch}, batched, one grouped conv"] = (
            images,
            settings("grouped"),
            False,
        )
    else:
        configs[f"batch {args.batch}, batched, one conv per net"] = (
            images,
            settings("split"),
            False,
        )
    reference = f"batch 1, {args.reference_channels}-channel reference net"
    if args.reference_channels:
        configs[reference] = (images[:1], settings(channels=args.reference_channels), False)
    for batch, s, loop in configs.values():  # warm-up: allocator, oneDNN / cuDNN plans
        seconds_per_image_iteration(batch, settings(s.conv, 2, s.channels), loop)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, (batch, s, loop) in configs.items():
            times[name].append(seconds_per_image_iteration(batch, s, loop))
    median = {name: statistics.median(values) for name, values in times.items()}

    s = settings()
    print(
        f"DIP {args.preset} preset ({s.channels} ch, {s.scales} scales), {args.size}x{args.size},"
        f" {device}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}; "
        f"median of {args.rounds} rounds of {args.iterations} iterations"
    )
    for name, value in median.items():
        spread = ", ".join(f"{v:.3f}" for v in times[name])
        print(f"  {name:42s} {value:.4f} s/image/iteration  ({spread})")
    b = args.batch
    batched, loop = median[f"batch {b}, batched"], median[f"batch {b}, loop over images"]
    print(f"batched vs loop (batch {b}): {loop / batched:.2f}x faster per image")
    print(f"batch {b} vs batch 1: {median['batch 1'] / batched:.2f}x faster per image")
    other = [name for name in median if name.startswith(f"batch {b}, batched, ")][0]
    print(f"{other} vs default: {batched / median[other]:.2f}x faster per image")
    if args.reference_channels:
        ratio = median[reference] / median["batch 1"]
        print(f"{s.channels}-channel {args.preset} net vs {reference}: {ratio:.2f}x faster")


if __name__ == "__main__":
    main()
