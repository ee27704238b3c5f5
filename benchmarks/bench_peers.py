"""advpurify side by side with its peers on the sample images: speed ratio, max |difference|,
top-1 of each and prediction agreement.

Transforms against ART's preprocessors and the libraries that do the same operation (Pillow,
OpenCV, scipy, scikit-image); FGSM / PGD against torchattacks, on the same classifier. Every
pair is timed in its own interleaved rounds in one process (medians after a warm-up). The peers come
from the ``peers`` extra (``pip install advpurify[peers]``), not a runtime dependency.

    .venv/bin/python benchmarks/bench_peers.py [--n 100] [--attack-n 16] [--threads 2] \
        [--before-after]

``--before-after`` also times the implementations kept in ``benchmarks/transforms_reference.py``
(as they were before issue 15) against the current ones, asserting the same output bits.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from skimage.restoration import denoise_tv_chambolle

from advpurify.attacks import AttackConfig, attack
from advpurify.evaluation.labels import resolve_labels
from advpurify.images import load_image
from advpurify.models.classifiers import load_classifier
from advpurify.paths import shared_data_dir
from advpurify.purifiers import create_purifier

sys.path.insert(0, str(Path(__file__).resolve().parent))

Batch = Callable[[torch.Tensor], torch.Tensor]


def numpy_batch(per_image: Callable[[np.ndarray], np.ndarray]) -> Batch:
    """A peer that works on one H x W x 3 float image at a time, as a batch function."""

    def run(images: torch.Tensor) -> torch.Tensor:
        hwc = images.permute(0, 2, 3, 1).numpy()
        out = np.stack([per_image(image) for image in hwc])
        return torch.from_numpy(out.astype(np.float32)).permute(0, 3, 1, 2)

    return run


def art_batch(preprocessor) -> Batch:
    def run(images: torch.Tensor) -> torch.Tensor:
        out, _ = preprocessor(images.numpy())
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    return run


def pillow_jpeg(quality: int) -> Callable[[np.ndarray], np.ndarray]:
    def run(image: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray((image * 255).round().astype(np.uint8)).save(
            buffer, "JPEG", quality=quality
        )
        with Image.open(buffer) as decoded:
            return np.asarray(decoded, dtype=np.float32) / 255

    return run


def peers(n_tvm: int) -> dict[str, tuple[Batch, dict[str, Batch]]]:
    """advpurify's transform and its peers, per operation."""
    from art.defences.preprocessor import (
        FeatureSqueezing,
        JpegCompression,
        SpatialSmoothing,
        TotalVarMin,
    )

    clip = (0.0, 1.0)
    return {
        "jpeg q75": (
            create_purifier("jpeg", quality=75),
            {
                "ART JpegCompression": art_batch(
                    JpegCompression(clip, quality=75, channels_first=True)
                ),
                "Pillow": numpy_batch(pillow_jpeg(75)),
            },
        ),
        "bitdepth 3": (
            create_purifier("bitdepth", bits=3),
            {
                "ART FeatureSqueezing": art_batch(FeatureSqueezing(clip, bit_depth=3)),
                "numpy": lambda x: torch.from_numpy(np.round(x.numpy() * 7) / 7),
            },
        ),
        "median 3": (
            create_purifier("median", kernel=3),
            {
                "ART SpatialSmoothing (scipy, reflect)": art_batch(
                    SpatialSmoothing(window_size=3, channels_first=True, clip_values=clip)
                ),
                "scipy median_filter (mirror)": lambda x: torch.from_numpy(
                    ndimage.median_filter(x.numpy(), size=(1, 1, 3, 3), mode="mirror")
                ),
                "OpenCV medianBlur (replicate)": numpy_batch(lambda im: cv2.medianBlur(im, 3)),
            },
        ),
        "tvm weight 0.1": (
            create_purifier("tvm", weight=0.1),
            {
                "scikit-image denoise_tv_chambolle": numpy_batch(
                    lambda im: denoise_tv_chambolle(im, weight=0.1, channel_axis=-1)
                ),
                # Another algorithm (random pixel mask + L-BFGS-B): speed only, not the output.
                "ART TotalVarMin": lambda x: art_batch(TotalVarMin(clip_values=clip))(x[:n_tvm]),
            },
        ),
    }


def interleaved(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            began = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - began)
    return {name: statistics.median(v) for name, v in times.items()}


def load_samples(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    folder = shared_data_dir() / "imagenet-sample"
    paths = sorted(p for p in folder.iterdir() if p.is_file())[:n]
    images = torch.cat(
        [F.interpolate(load_image(p)[None], size=(224, 224), mode="area") for p in paths]
    ).clamp(0, 1)
    labels = resolve_labels(paths, folder)
    return images, torch.tensor([int(i) for i in labels.indices])


def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i : i + 16]).argmax(1) for i in range(0, len(images), 16)])


def before_after(images: torch.Tensor, rounds: int) -> None:
    """The pre-issue-15 implementations against the current ones, same output bits."""
    from transforms_reference import tv_chambolle_before

    pairs = {"tvm weight 0.1": (tv_chambolle_before, create_purifier("tvm", weight=0.1))}
    print("| transform | before img/s | after img/s | speed-up | same bits |")
    print("|---|---:|---:|---:|---|")
    for name, (before, after) in pairs.items():
        median = interleaved(
            {"before": lambda b=before: b(images), "after": lambda a=after: a(images)}, rounds
        )
        same = torch.equal(before(images), after(images))
        assert same, f"{name}: the outputs changed"
        print(
            f"| {name} | {len(images) / median['before']:.1f} | "
            f"{len(images) / median['after']:.1f} | {median['before'] / median['after']:.2f}x "
            f"| {same} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="sample images for the transforms")
    parser.add_argument("--attack-n", type=int, default=16, help="sample images for attacks")
    parser.add_argument("--tvm-n", type=int, default=8, help="images for ART's TotalVarMin")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--classifier", default="efficientnet-lite0")
    parser.add_argument("--skip-attacks", action="store_true")
    parser.add_argument("--before-after", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, labels = load_samples(args.n)
    model = load_classifier(args.classifier, "torch", "cpu").module.eval()
    truth = labels
    print(
        f"{len(images)} sample images at 224x224, {torch.get_num_threads()} threads, "
        f"load {os.getloadavg()[0]:.1f}; medians of {args.rounds} interleaved rounds"
    )
    print(
        "| operation | peer | advpurify img/s | peer img/s | speed ratio | max abs diff "
        "| top-1 advpurify | top-1 peer | agreement |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    if args.before_after:
        before_after(images, args.rounds)
    for operation, (ours, theirs) in peers(args.tvm_n).items():
        mine = ours(images)
        mine_top1 = top1(model, mine, truth)
        for name, peer in theirs.items():
            # Each pair in its own rounds: a peer that leaves BLAS threads spinning (ART's
            # TotalVarMin, through scipy) would otherwise slow whatever runs after it.
            median = interleaved(
                {"ours": lambda ours=ours: ours(images), name: lambda peer=peer: peer(images)},
                args.rounds,
            )
            out = peer(images)
            count = len(out)
            diff = float((out - mine[:count]).abs().max())
            peer_top1 = top1(model, out, truth[:count])
            ours_rate = len(images) / median["ours"]
            peer_rate = count / median[name]
            print(
                f"| {operation} | {name} | {ours_rate:.0f} | {peer_rate:.1f} | "
                f"{ours_rate / peer_rate:.2f}x | {diff:.2e} | "
                f"{(mine_top1[:count] == truth[:count]).float().mean():.0%} | "
                f"{(peer_top1 == truth[:count]).float().mean():.0%} | "
                f"{(peer_top1 == mine_top1[:count]).float().mean():.0%} |"
            )
    if args.skip_attacks:
        return
    import torchattacks

    x, y = images[: args.attack_n], truth[: args.attack_n]
    eps = 16 / 255
    pgd = AttackConfig("pgd", 16.0, steps=10, random_start=False).resolved()
    pairs = {
        "FGSM eps 16": (
            AttackConfig("fgsm", 16.0).resolved(),
            torchattacks.FGSM(model, eps=eps),
        ),
        "PGD-10 eps 16 (no random start)": (
            pgd,
            torchattacks.PGD(
                model, eps=eps, alpha=pgd.step_size / 255, steps=10, random_start=False
            ),
        ),
    }
    for operation, (config, peer) in pairs.items():
        median = interleaved(
            {"ours": lambda c=config: attack(model, x, y, c), "peer": lambda p=peer: p(x, y)},
            args.rounds,
        )
        mine, theirs = attack(model, x, y, config), peer(x, y)
        mine_top1, peer_top1 = top1(model, mine, y), top1(model, theirs, y)
        print(
            f"| {operation} | torchattacks | {len(x) / median['ours']:.1f} | "
            f"{len(x) / median['peer']:.1f} | {median['peer'] / median['ours']:.2f}x | "
            f"{float((mine - theirs).abs().max()):.2e} | {(mine_top1 == y).float().mean():.0%} | "
            f"{(peer_top1 == y).float().mean():.0%} | "
            f"{(peer_top1 == mine_top1).float().mean():.0%} |"
        )


if __name__ == "__main__":
    main()
