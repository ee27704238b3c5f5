"""DIP accuracy against iterations, beside rescale, on a seeded subset of the sample images.

One fit per image records its output after every checkpoint iteration, so the whole
accuracy-vs-iterations curve costs one run. Adversarial images: FGSM eps=16 against the
classifier, made once, quantized to 8 bits (what a PNG stores).

    .venv/bin/python benchmarks/dip_accuracy.py --n 30 --checkpoints 50,100,...,500 \
        --out bench-results/dip-accuracy.json
    .venv/bin/python benchmarks/dip_accuracy.py --plot bench-results/dip-accuracy.json \
        --png docs/dip-accuracy.png

Results are written after every batch, so a run cut short still reports what it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from advpurify.attacks import AttackConfig, attack
from advpurify.cli.settings import parse_params
from advpurify.evaluation.accuracy import topk_accuracy, topk_predictions
from advpurify.evaluation.dataset import load_dataset
from advpurify.evaluation.labels import resolve_labels
from advpurify.models.classifiers import load_classifier
from advpurify.paths import shared_data_dir
from advpurify.purifiers import create_purifier
from advpurify.purifiers.base import image_seed
from advpurify.purifiers.dip import DeepImagePrior, fit


def predict(classifier, images: torch.Tensor) -> list[list[int]]:
    with torch.no_grad():
        return topk_predictions(classifier.logits(images, batch_size=16), 5).tolist()


def accuracy(preds: list[list[int]], labels: list[int]) -> dict[str, float]:
    acc = topk_accuracy(torch.tensor(preds).view(-1, 5), torch.tensor(labels))
    return {k: float(v) for k, v in acc.items()}


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    classifier = load_classifier(args.classifier, "torch", "cpu")
    data = load_dataset(args.data, classifier.prepare, classifier.input_size)
    gen = torch.Generator().manual_seed(args.seed)
    subset = sorted(torch.randperm(len(data), generator=gen)[: args.n].tolist())
    keys = [data.relative(i) for i in subset]
    labels = torch.tensor(resolve_labels([data.paths[i] for i in subset], data.root).indices)
    clean = data.float_images(subset)
    with torch.enable_grad():
        adversarial = attack(classifier.module, clean, labels, AttackConfig("fgsm", args.eps))
    rescaled = create_purifier("rescale")(adversarial)
    overrides = parse_params("dip", args.param)
    purifier = DeepImagePrior.from_values(
        preset=args.preset, iterations=max(args.checkpoints), **overrides
    )
    settings = purifier.settings.resolve()
    part, parts = (int(x) for x in args.part.split("/"))
    mine = list(range(part, len(subset), parts))
    seeds = [image_seed(args.seed, keys[i]) for i in mine]
    report = {
        "n": len(mine),
        "images": [keys[i] for i in mine],
        "labels": [int(labels[i]) for i in mine],
        "classifier": args.classifier,
        "attack": f"FGSM eps={args.eps:g}",
        "preset": args.preset,
        "settings": dataclasses.asdict(settings),
        "threads": args.threads,
        "batch": args.batch,
        "part": args.part,
        "clean": predict(classifier, clean[mine]),
        "adversarial": predict(classifier, adversarial[mine]),
        "rescale": predict(classifier, rescaled[mine]),
        "load_before": os.getloadavg(),
    }
    checkpoints = sorted(set(args.checkpoints))
    smoothed = {c: torch.zeros_like(adversarial[mine]) for c in checkpoints}
    raw = {c: torch.zeros_like(adversarial[mine]) for c in checkpoints}
    seconds = {c: 0.0 for c in checkpoints}
    final = torch.zeros_like(adversarial[mine])
    final_iterations: list[int] = []
    final_seconds = 0.0
    started = time.perf_counter()
    for start in range(0, len(mine), args.batch):
        stop = min(start + args.batch, len(mine))
        began = time.perf_counter()

        def hook(it, indices, out, avg, start=start, began=began):
            if it in smoothed:
                rows = [start + i for i in indices]
                smoothed[it][rows] = avg.clamp(0, 1).mul(255).round().div(255)
                raw[it][rows] = out.clamp(0, 1).mul(255).round().div(255)
                seconds[it] += time.perf_counter() - began

        result = fit(adversarial[mine[start:stop]], seeds[start:stop], settings, on_step=hook)
        final[start:stop] = result.images.clamp(0, 1).mul(255).round().div(255)
        final_iterations += result.iterations
        final_seconds += time.perf_counter() - began
        report["final"] = {
            "iterations": final_iterations,
            "seconds": final_seconds,
            "preds": predict(classifier, final[:stop]),
        }
        report["done"] = stop
        report["wall_seconds"] = time.perf_counter() - started
        report["dip"] = [
            {
                "iterations": c,
                "seconds": seconds[c],
                "smoothed": predict(classifier, smoothed[c][:stop]),
                "raw": predict(classifier, raw[c][:stop]),
            }
            for c in checkpoints
        ]
        report["load_after"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report))
        print(
            f"{stop}/{len(mine)} images, {seconds[checkpoints[-1]] / stop:.1f} s/image for "
            f"{checkpoints[-1]} its, load {os.getloadavg()[0]:.1f}",
            flush=True,
        )


def summarize(paths: list[Path]) -> dict:
    """Merge the parts of a run and compute the accuracies over the images they finished."""
    parts = [json.loads(p.read_text()) for p in paths]
    first = parts[0]
    labels = [lab for p in parts for lab in p["labels"][: p["done"]]]

    def preds(name: str) -> list[list[int]]:
        return [row for p in parts for row in p[name][: p["done"]]]

    summary = {
        "n": len(labels),
        "images": sorted(key for p in parts for key in p["images"][: p["done"]]),
        "classifier": first["classifier"],
        "attack": first["attack"],
        "preset": first["preset"],
        "settings": first["settings"],
        "wall_seconds": max(p["wall_seconds"] for p in parts),
        "processes": len(parts),
        "threads": first["threads"],
        "load": [p["load_after"] for p in parts],
    }
    for name in ("clean", "adversarial", "rescale"):
        summary[name] = accuracy(preds(name), labels)
    finals = [p["final"] for p in parts if "final" in p]
    iterations = [i for f in finals for i in f["iterations"]]
    summary["final"] = finals and {
        "mean_iterations": sum(iterations) / len(iterations),
        "seconds_per_image": sum(f["seconds"] for f in finals) / len(labels),
        "machine_seconds_per_image": sum(f["seconds"] for f in finals) / len(labels) / len(parts),
        **accuracy([r for f in finals for r in f["preds"]], labels),
    }
    summary["dip"] = []
    for i, row in enumerate(first["dip"]):
        entry = {"iterations": row["iterations"]}
        # Each part is one process fitting its images one after another; the parts run side
        # by side, so the machine spends (time per image in a process) / processes per image.
        entry["seconds_per_image"] = sum(p["dip"][i]["seconds"] for p in parts) / len(labels)
        entry["machine_seconds_per_image"] = entry["seconds_per_image"] / len(parts)
        for kind in ("smoothed", "raw"):
            hits = [r for p in parts for r in p["dip"][i][kind]]
            entry[kind] = accuracy(hits, labels)
        summary["dip"].append(entry)
    return summary


def plot(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["dip"]
    its = [r["iterations"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for k, style in (("top1", "-"), ("top3", "--")):
        ax.plot(
            its,
            [100 * r["smoothed"][k] for r in rows],
            "o" + style,
            color="C0",
            label=f"DIP, averaged output ({k})",
        )
        ax.plot(
            its,
            [100 * r["raw"][k] for r in rows],
            "s" + style,
            color="C1",
            alpha=0.7,
            label=f"DIP, last output ({k})",
        )
        for name, color in (("rescale", "C2"), ("adversarial", "C3")):
            ax.axhline(
                100 * report[name][k],
                color=color,
                linestyle=style,
                linewidth=1,
                label=f"{name} ({k})",
            )
    secs = {r["iterations"]: r["machine_seconds_per_image"] for r in rows}
    top = ax.secondary_xaxis("top", functions=(lambda x: x, lambda x: x))
    top.set_xticks(its[1::2])
    top.set_xticklabels([f"{secs[i]:.0f}s" for i in its[1::2]])
    top.set_xlabel("seconds per image on 2 CPU cores (machine shared, busy: see README)")
    ax.set_xlabel("DIP iterations")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(
        f"{report['classifier']}, {report['attack']}, {report['n']} images, "
        f"preset {report['preset']}",
        fontsize=9,
    )
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=shared_data_dir() / "imagenet-sample")
    parser.add_argument("--classifier", default="efficientnet-lite0")
    parser.add_argument("--n", type=int, default=30, help="images in the seeded subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eps", type=float, default=16.0)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--param", action="append", default=[], help="dip parameter name=value")
    parser.add_argument("--checkpoints", default="50,100,150,200,250,300,350,400,450,500")
    parser.add_argument("--batch", type=int, default=2, help="images fitted at once")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-results/dip-accuracy.json"))
    parser.add_argument("--part", default="0/1", help="i/n: fit every n-th image from i")
    parser.add_argument(
        "--plot", type=Path, nargs="+", help="only merge these part JSONs and draw the figure"
    )
    parser.add_argument("--summary", type=Path, default=Path("bench-results/dip-summary.json"))
    parser.add_argument("--png", type=Path, default=Path("docs/dip-accuracy.png"))
    args = parser.parse_args()
    if args.plot:
        summary = summarize(args.plot)
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=1))
        for name in ("clean", "adversarial", "rescale"):
            acc = summary[name]
            print(f"{name:12s} top-1 {acc['top1']:.0%}  top-3 {acc['top3']:.0%}")
        for row in summary["dip"]:
            print(
                f"dip {row['iterations']:5d} its {row['machine_seconds_per_image']:5.1f} s/img "
                f"({row['seconds_per_image']:5.1f} s in one of {summary['processes']} processes) "
                f"averaged {row['smoothed']['top1']:.0%}/{row['smoothed']['top3']:.0%}  "
                f"last {row['raw']['top1']:.0%}/{row['raw']['top3']:.0%}"
            )
        final = summary["final"]
        if final:
            seconds = final["machine_seconds_per_image"]
            accuracies = f"top-1 {final['top1']:.0%} top-3 {final['top3']:.0%}"
            print(
                f"dip returned ({summary['settings']['stop']} stop): mean "
                f"{final['mean_iterations']:.0f} its, {seconds:.1f} s/img, {accuracies}"
            )
        if args.png.name != "-":
            plot(summary, args.png)
        return
    args.checkpoints = [int(c) for c in args.checkpoints.split(",")]
    run(args)


if __name__ == "__main__":
    main()
