"""The whole results table in one call: clean, adversarial, each purifier on both, adaptive.

For a folder of images and one classifier: attack every image, purify the adversarial AND the
clean images with each method (what a defence costs on clean inputs), classify everything, and,
with ``adaptive``, attack each purifier + classifier with PGD and BPDA + EOT on a seeded subset.
Every stage's images are written losslessly under the report folder and reused on a rerun.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from advpurify import __version__
from advpurify.attacks import AttackConfig, attack
from advpurify.devices import resolve_device
from advpurify.errors import AdvpurifyError
from advpurify.evaluation.accuracy import check_num_classes, topk_accuracy, topk_predictions
from advpurify.evaluation.dataset import Dataset, list_images, load_dataset, to_float
from advpurify.evaluation.labels import SOURCE_CLEAN, resolve_labels
from advpurify.evaluation.stages import Stage
from advpurify.files import check_output_outside
from advpurify.models.classifiers import LoadedClassifier, load_classifier
from advpurify.purifiers import create_purifier, purifier_class
from advpurify.purifiers.base import ParamError, Purifier, image_seed

DEFAULT_BACKEND = "auto"  # ONNX Runtime on the CPU; TensorRT > ORT CUDA on a GPU


@dataclass
class ExperimentConfig:
    data: Path
    out: Path
    classifier: str = "efficientnet-lite0"
    weights: str | None = None
    attack: AttackConfig = field(default_factory=AttackConfig)
    methods: list[str] = field(default_factory=list)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # typed settings
    adaptive: bool = False
    adaptive_n: int = 20
    adaptive_steps: int = 10
    eot: int = 4
    labels_csv: Path | None = None
    device: str = "auto"
    backend: str = DEFAULT_BACKEND
    batch_size: int = 16
    seed: int = 0
    limit: int | None = None
    grid_images: int = 4
    overwrite: bool = False


def parse_methods(text: str | Iterable[str]) -> list[str]:
    names = text.split(",") if isinstance(text, str) else list(text)
    methods = [n.strip() for n in names if n.strip()]
    for name in methods:
        purifier_class(name)  # raises for an unknown method, listing the known ones
    if len(set(methods)) != len(methods):
        raise ParamError(f"--methods {','.join(methods)}: a method is named twice")
    return methods


@dataclass
class Row:
    image_type: str
    kind: str  # clean | adversarial | purified
    method: str | None
    input: str  # clean | adversarial
    metrics: dict[str, float]
    seconds_per_image: float | None = None
    adaptive: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "image_type": self.image_type,
            "kind": self.kind,
            "method": self.method,
            "input": self.input,
            **self.metrics,
            "seconds_per_image": self.seconds_per_image,
        }
        if self.adaptive is not None:
            row.update(self.adaptive)
        return row


@dataclass
class ExperimentResult:
    report: dict[str, Any]
    out: Path

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.report["rows"]


Log = Callable[[str], None]


class _Classify:
    """Classification behind one call (swap the backend in :func:`load_classifier`)."""

    def __init__(self, classifier: LoadedClassifier, batch_size: int) -> None:
        self.classifier = classifier
        self.batch_size = batch_size

    def __call__(self, images_u8: torch.Tensor) -> torch.Tensor:
        """Top-5 predictions (``N x 5``) of an 8-bit batch."""
        logits = self.classifier.logits(to_float(images_u8), batch_size=self.batch_size)
        check_num_classes(logits, self.classifier.name)
        return topk_predictions(logits, 5)


def run_experiment(config: ExperimentConfig, log: Log = lambda message: None) -> ExperimentResult:
    attack_config = config.attack.resolved()
    methods = parse_methods(config.methods)
    # Build every purifier first: a bad parameter fails before any expensive work.
    device = resolve_device(config.device)
    purifiers = {m: create_purifier(m, device=device, **config.params.get(m, {})) for m in methods}
    unknown = set(config.params) - set(methods)
    if unknown:
        raise ParamError(f"parameters given for {', '.join(sorted(unknown))}, not in --methods")
    if config.adaptive and config.adaptive_n < 1:
        raise AdvpurifyError(f"--adaptive-n {config.adaptive_n}: must be >= 1")

    list_images(config.data)  # an empty or missing folder fails before any loading
    out = Path(config.out)
    check_output_outside(config.data, out)  # stage images must not join the data on a rerun
    out.mkdir(parents=True, exist_ok=True)
    log(f"loading classifier {config.classifier} ({config.backend}, {device})")
    classifier = load_classifier(config.classifier, config.backend, device, config.weights)
    model = classifier.module.to(device)
    classify = _Classify(classifier, config.batch_size)

    data = load_dataset(config.data, classifier.prepare, classifier.input_size, config.limit)
    keys = data.keys()
    n = len(keys)
    failed = f", {len(data.failures)} failed to decode" if data.failures else ""
    log(f"{n} images from {data.root}{failed}")
    for failure in data.failures:
        log(f"skipped {failure.path}: {failure.reason}")
    seeds = [image_seed(config.seed, key) for key in keys]

    clean_preds = classify(data.images)
    resolved = resolve_labels(data.paths, data.root, config.labels_csv)
    if resolved.source == SOURCE_CLEAN:
        label_list = [int(p) for p in clean_preds[:, 0]]
    else:
        label_list = [int(i) for i in resolved.indices]
    labels = torch.tensor(label_list)

    # What every stored image depends on. Not the image list: outputs are per image (by
    # relative path), so a rerun with more images reuses the ones already done.
    base_key = {
        "version": __version__,
        "classifier": config.classifier,
        "weights": config.weights,
        "label_source": resolved.source,
        "labels_file": str(config.labels_csv) if config.labels_csv else None,
        "seed": config.seed,
    }
    bs = config.batch_size

    def compute_attack(indices: list[int]) -> torch.Tensor:
        return attack(
            model,
            data.float_images(indices).to(device),
            labels[indices],
            attack_config,
            seeds=[seeds[i] for i in indices],
        )

    log(f"attack: {attack_config.describe()}")
    adv_stage = Stage(
        out / "adversarial", {**base_key, "attack": attack_config.as_dict()}, config.overwrite
    )
    adversarial = adv_stage.run(keys, compute_attack, bs, _progress(log, "adversarial"))
    adv_preds = classify(adversarial)

    rows = [
        Row("Clean", "clean", None, "clean", topk_accuracy(clean_preds, labels)),
        Row(
            f"Adversarial ({attack_config.describe()})",
            "adversarial",
            None,
            "adversarial",
            topk_accuracy(adv_preds, labels),
        ),
    ]
    predictions = {"clean": clean_preds, "adversarial": adv_preds}
    purified_grid: dict[str, torch.Tensor] = {}
    grid_count = min(config.grid_images, n)

    for method, purifier in purifiers.items():
        for source, images in (("adversarial", adversarial), ("clean", data.images)):
            stage_key = {**base_key, "purifier": purifier.config(), "input": source}
            if source == "adversarial":
                stage_key["attack"] = attack_config.as_dict()
            stage = Stage(out / "methods" / method / source, stage_key, config.overwrite)

            def compute_purify(indices: list[int], images=images, purifier=purifier):
                batch = to_float(images[indices]).to(device)
                with torch.no_grad():
                    return purifier(batch, [seeds[i] for i in indices])

            outputs = stage.run(keys, compute_purify, bs, _progress(log, f"{method} on {source}"))
            preds = classify(outputs)
            predictions[f"{method}/{source}"] = preds
            if source == "adversarial":
                purified_grid[method] = outputs[:grid_count]
            rows.append(
                Row(
                    f"{method} on {source}",
                    "purified",
                    method,
                    source,
                    topk_accuracy(preds, labels),
                    stage.seconds_per_image(),
                )
            )

    adaptive_info = None
    if config.adaptive:
        adaptive_info = _adaptive(
            config,
            attack_config,
            purifiers,
            data,
            labels,
            seeds,
            model,
            classify,
            rows,
            predictions,
            base_key,
            device,
            log,
        )

    report = {
        "version": __version__,
        "data": str(data.root),
        "n": n,
        "classifier": classifier.name,
        "backend": classifier.backend,
        "device": str(device),
        "attack": attack_config.as_dict(),
        "attack_description": attack_config.describe(),
        "attack_seconds_per_image": adv_stage.seconds_per_image(),
        "methods": {m: p.config()["params"] for m, p in purifiers.items()},
        "label_source": resolved.source,
        "metric": "agreement with clean prediction" if resolved.is_pseudo else "accuracy",
        "seed": config.seed,
        "adaptive": adaptive_info,
        "failed": [f.as_dict() for f in data.failures],
        "rows": [row.as_dict() for row in rows],
    }
    from advpurify.evaluation import report as report_writer

    report_writer.write_report(
        out, report, data, adversarial[:grid_count], purified_grid, labels, predictions
    )
    _write_predictions(out / "predictions.csv", keys, labels, predictions)
    return ExperimentResult(report, out)


def _adaptive(
    config: ExperimentConfig,
    attack_config: AttackConfig,
    purifiers: dict[str, Purifier],
    data: Dataset,
    labels: torch.Tensor,
    seeds: list[int],
    model: torch.nn.Module,
    classify: _Classify,
    rows: list[Row],
    predictions: dict[str, torch.Tensor],
    base_key: dict[str, Any],
    device: torch.device,
    log: Log,
) -> dict[str, Any]:
    """PGD with BPDA + EOT aimed at each purifier, on a seeded subset of the images."""
    n = len(data)
    subset = sorted(random.Random(config.seed).sample(range(n), min(config.adaptive_n, n)))
    keys = [data.relative(i) for i in subset]
    sub_labels = labels[subset]
    sub_seeds = [seeds[i] for i in subset]
    pgd = AttackConfig(
        name="pgd", eps=attack_config.eps, steps=config.adaptive_steps, eot=config.eot
    ).resolved()
    info = {
        "attack": pgd.as_dict(),
        "attack_description": pgd.describe() + f" BPDA+EOT({config.eot})",
        "n": len(subset),
        "images": keys,
    }
    bs = config.batch_size

    def run_pgd(purifier: Purifier | None, folder: Path) -> torch.Tensor:
        stage_key = {
            **base_key,
            "adaptive_attack": pgd.as_dict(),
            "purifier": purifier.config() if purifier is not None else None,
        }
        stage = Stage(folder, stage_key, config.overwrite)

        def compute(indices: list[int]) -> torch.Tensor:
            images = data.float_images([subset[i] for i in indices]).to(device)
            return attack(
                model,
                images,
                sub_labels[indices],
                pgd,
                purifier=purifier,
                seeds=[sub_seeds[i] for i in indices],
            )

        return stage.run(keys, compute, bs, _progress(log, folder.name + " (adaptive)"))

    # Reference: the same PGD with no purifier, and the non-adaptive rows on the same subset.
    plain = run_pgd(None, Path(config.out) / "adaptive" / "none")
    plain_preds = classify(plain)
    rows[1].adaptive = _adaptive_fields(
        plain_preds, sub_labels, predictions["adversarial"], subset, labels
    )
    for method, purifier in purifiers.items():
        folder = Path(config.out) / "adaptive" / method
        adv = run_pgd(purifier, folder)
        stage = Stage(
            folder / "purified",
            {
                **base_key,
                "adaptive_attack": pgd.as_dict(),
                "purifier": purifier.config(),
            },
            config.overwrite,
        )

        def purify(indices: list[int], adv=adv, purifier=purifier) -> torch.Tensor:
            with torch.no_grad():
                return purifier(to_float(adv[indices]).to(device), [sub_seeds[i] for i in indices])

        purified = stage.run(keys, purify, bs, _progress(log, f"{method} on adaptive"))
        preds = classify(purified)
        for row in rows:
            if row.method == method and row.input == "adversarial":
                row.adaptive = _adaptive_fields(
                    preds, sub_labels, predictions[f"{method}/adversarial"], subset, labels
                )
    return info


def _adaptive_fields(
    adaptive_preds: torch.Tensor,
    sub_labels: torch.Tensor,
    full_preds: torch.Tensor,
    subset: list[int],
    labels: torch.Tensor,
) -> dict[str, float]:
    """Adaptive accuracy, and the same row's non-adaptive accuracy on the same subset."""
    adaptive = topk_accuracy(adaptive_preds, sub_labels, (1, 3))
    baseline = topk_accuracy(full_preds[subset], labels[subset], (1, 3))
    return {
        "adaptive_top1": adaptive["top1"],
        "adaptive_top3": adaptive["top3"],
        "subset_top1": baseline["top1"],
        "subset_top3": baseline["top3"],
        "adaptive_n": len(subset),
    }


def _progress(log: Log, what: str) -> Callable[[int, int], None]:
    """Log a stage's progress: what was reused, then about every fifth of the work."""
    state = {"last": None}

    def report(done: int, total: int) -> None:
        last = state["last"]
        if last is None:
            if done:
                log(f"{what}: reusing {done}/{total} from an earlier run")
        elif done == total or done - last >= max(1, total // 5):
            log(f"{what}: {done}/{total}")
        else:
            return
        state["last"] = done

    return report


def _write_predictions(
    path: Path, keys: list[str], labels: torch.Tensor, predictions: dict[str, torch.Tensor]
) -> None:
    """Per image: label and the top-1 prediction under every image type."""
    import csv

    names = list(predictions)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", *names])
        for i, key in enumerate(keys):
            writer.writerow([key, int(labels[i]), *(int(predictions[k][i, 0]) for k in names)])


__all__ = [
    "ExperimentConfig",
    "ExperimentResult",
    "parse_methods",
    "run_experiment",
]
