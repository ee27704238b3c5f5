"""Writing an experiment's report: ``report.json``, ``report.md`` and the figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from advpurify.evaluation.dataset import Dataset, to_float
from advpurify.evaluation.labels import is_pseudo_source
from advpurify.files import atomic_output, atomic_write_bytes
from advpurify.models.imagenet import class_name


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f}%"


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if value >= 0.001 else f"{value:.1e}"


def markdown_table(report: dict[str, Any]) -> str:
    """The results table: Image Type | Top-1 | Top-3 | Top-5 | s/image [| adaptive columns]."""
    rows = report["rows"]
    adaptive = report.get("adaptive") is not None
    header = ["Image Type", "Top-1", "Top-3", "Top-5", "s/image"]
    if adaptive:
        header += ["Adaptive Top-1", "Adaptive Top-3", "Top-1 on same subset"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for row in rows:
        cells = [
            row["image_type"],
            _percent(row["top1"]),
            _percent(row["top3"]),
            _percent(row["top5"]),
            _seconds(row.get("seconds_per_image")),
        ]
        if adaptive:
            cells += [
                _percent(row.get("adaptive_top1")),
                _percent(row.get("adaptive_top3")),
                _percent(row.get("subset_top1")),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    pseudo = is_pseudo_source(report["label_source"])
    source = {
        "path": "WordNet ids in the file or folder names",
        "csv": "the labels file",
        "clean-prediction": "none given: the classifier's prediction on each clean image",
        "attack-manifest": "the manifest of the attack that wrote the images",
        "attack-manifest:clean-prediction": "the manifest of the attack that wrote the images "
        "(the classifier's predictions on the images it attacked)",
    }.get(report["label_source"], report["label_source"])
    parts = [
        f"# advpurify experiment: {report['classifier']}, {report['attack_description']}, "
        f"{report['n']} images",
        "",
        f"Data: `{report['data']}`. Labels: {source}. Backend: {report['backend']} on "
        f"{report['device']}.",
    ]
    if pseudo:
        parts.append(
            "Numbers are **agreement with the clean prediction**, not accuracy (no labels)."
        )
    parts += [
        "",
        markdown_table(report),
        "",
        "s/image: purification time per image (the attack took "
        f"{_seconds(report.get('attack_seconds_per_image')) or '?'} s per image). "
        "Purified outputs were stored as lossless PNG before classification.",
    ]
    if report.get("adaptive"):
        info = report["adaptive"]
        parts += [
            "",
            f"Adaptive: {info['attack_description']} aimed at each method (BPDA: identity "
            "gradient for non-differentiable methods; EOT: gradient averaged over random draws "
            f"of stochastic ones), on {info['n']} images chosen with seed {report['seed']}. "
            "On the adversarial row it is the same PGD with no purifier. "
            "'Top-1 on same subset' is that row's non-adaptive top-1 on those images.",
        ]
    params = {m: p for m, p in report["methods"].items() if p}
    if params:
        parts += [
            "",
            "Method parameters: "
            + "; ".join(
                f"{m} " + ", ".join(f"{k}={v}" for k, v in p.items()) for m, p in params.items()
            )
            + ".",
        ]
    if report.get("failed"):
        parts += ["", f"Skipped {len(report['failed'])} unreadable files (see report.json)."]
    parts += ["", "![examples](figures/grid.png)", "", "![accuracy](figures/accuracy.png)", ""]
    return "\n".join(parts)


def write_report(
    out: Path,
    report: dict[str, Any],
    data: Dataset,
    adversarial: torch.Tensor,
    purified: dict[str, torch.Tensor],
    labels: torch.Tensor,
    predictions: dict[str, torch.Tensor],
) -> None:
    out = Path(out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    count = adversarial.shape[0]
    grid_preds = {
        "clean": predictions["clean"][:count, 0],
        "adversarial": predictions["adversarial"][:count, 0],
        **{m: predictions[f"{m}/adversarial"][:count, 0] for m in purified},
    }
    if count:  # --grid 0: no example figure
        image_grid(
            figures / "grid.png",
            data.images[:count],
            adversarial,
            purified,
            labels[:count],
            grid_preds,
            report["attack"]["eps"],
        )
    accuracy_chart(figures / "accuracy.png", report)
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(out / "report.md", markdown(report).encode())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(
    path: Path,
    clean: torch.Tensor,
    adversarial: torch.Tensor,
    purified: dict[str, torch.Tensor],
    labels: torch.Tensor,
    predictions: dict[str, torch.Tensor],
    eps: float,
) -> None:
    """Rows of images: clean | adversarial | perturbation (amplified) | each purified result.

    Under each image its top-1 class, green when it is the label, red otherwise.
    """
    plt = _pyplot()
    rows = clean.shape[0]
    columns = [("clean", clean), ("adversarial", adversarial), ("perturbation", None)]
    columns += [(m, images) for m, images in purified.items()]
    fig, axes = plt.subplots(
        rows, len(columns), figsize=(2.0 * len(columns), 2.3 * rows), squeeze=False
    )
    gain = 255.0 / (2 * eps)
    for r in range(rows):
        for c, (name, images) in enumerate(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if images is None:
                delta = to_float(adversarial[r]) - to_float(clean[r])
                picture = (delta * gain + 0.5).clamp(0, 1)
                ax.set_xlabel(f"x{gain:.0f}", fontsize=7)
            else:
                picture = to_float(images[r])
                pred = int(predictions[name][r])
                ok = pred == int(labels[r])
                ax.set_xlabel(class_name(pred)[:18], fontsize=7, color="green" if ok else "red")
            ax.imshow(picture.permute(1, 2, 0).numpy())
            if r == 0:
                ax.set_title(name, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    """Write a matplotlib figure as PNG through a temporary file (never half a file, never
    through a symlink at the target), and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_output(path) as tmp, open(tmp, "wb") as handle:
            fig.savefig(handle, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def accuracy_chart(path: Path, report: dict[str, Any]) -> None:
    """Bars: top-1 and top-3 per image type; adaptive top-1 as a marker where measured."""
    plt = _pyplot()
    rows = report["rows"]
    names = [row["image_type"] for row in rows]
    series = [("top-1", [row["top1"] for row in rows]), ("top-3", [row["top3"] for row in rows])]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(rows) + 2), 4.2))
    for s, (label, values) in enumerate(series):
        xs = [i + (s - (len(series) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [100 * v for v in values], width, label=label)
    measured = [(i, row["adaptive_top1"]) for i, row in enumerate(rows) if "adaptive_top1" in row]
    if measured:
        ax.plot(
            [i for i, _ in measured],
            [100 * v for _, v in measured],
            "kv",
            markersize=6,
            linestyle="none",
            label="adaptive top-1 (subset)",
        )
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=40, ha="right", fontsize=7)
    metric = "agreement (%)" if is_pseudo_source(report["label_source"]) else "accuracy (%)"
    ax.set_ylabel(metric)
    ax.set_ylim(0, 100)
    ax.set_title(f"{report['classifier']}, {report['attack_description']}", fontsize=9, loc="left")
    ax.legend(fontsize=7, ncol=3, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    save_figure(fig, path)
