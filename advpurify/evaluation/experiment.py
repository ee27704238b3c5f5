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
from advpurify.evaluation.dataset import list_images, load_dataset, to_float
from advpurify.evaluation.labels import resolve_labels
from advpurify.evaluation.stages import Stage
from advpurify.files import atomic_output, check_output_outside, sha256_file
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
    methods = [n.strip() for n in names]
    if "" in methods and any(methods):
        raise ParamError(f"--methods {','.join(methods)}: an empty name between commas")
    methods = [n for n in methods if n]
    for name in methods:
        purifier_class(name)  # raises for an unknown method, listing the known ones
    if len(set(methods)) != len(methods):
        raise ParamError(f"--methods {','.join(methods)}: a method is named twice")
    return methods


# What another command keeps in its output folder: an experiment never writes beside them.
FOREIGN_RECORDS = {
    "manifest.jsonl": "an attack's or a purify-batch run's outputs",
    "run.json": "a purify-batch run",
}


def check_experiment_folders(data: Path, out: Path) -> None:
    """Before anything is written: images to use, and a report folder outside the data that
    holds no other command's outputs (its images would be mixed with the experiment's, and
    ``--overwrite`` would clear them)."""
    list_images(data)  # an empty or missing folder fails before any loading
    check_output_outside(data, out)  # stage images must not join the data
    for name, what in FOREIGN_RECORDS.items():
        if (Path(out) / name).exists():
            raise AdvpurifyError(f"report folder {out} holds {what} ({name}); choose another")


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


class Experiment:
    """One run of the results table, one method per stage; :meth:`run` calls them in order.

    Construction builds every purifier and checks every setting, so a bad parameter fails
    before any expensive work. Rows are kept by name (``clean``, ``adversarial``,
    ``METHOD/adversarial``, ``METHOD/clean``), the same names as the predictions.
    """

    def __init__(self, config: ExperimentConfig, log: Log = lambda message: None) -> None:
        self.config = config
        self.log = log
        self.attack_config = config.attack.resolved()
        methods = parse_methods(config.methods)
        self.device = resolve_device(config.device)
        self.purifiers: dict[str, Purifier] = {
            m: create_purifier(m, device=self.device, **config.params.get(m, {})) for m in methods
        }
        unknown = set(config.params) - set(methods)
        if unknown:
            raise ParamError(f"parameters given for {', '.join(sorted(unknown))}, not in --methods")
        if config.adaptive and config.adaptive_n < 1:
            raise AdvpurifyError(f"--adaptive-n {config.adaptive_n}: must be >= 1")
        check_experiment_folders(config.data, config.out)
        self.out = Path(config.out)
        self.rows: dict[str, Row] = {}
        self.predictions: dict[str, torch.Tensor] = {}
        self.purified_grid: dict[str, torch.Tensor] = {}
        self.adaptive_info: dict[str, Any] | None = None

    # ------------------------------------------------------------------ stages
    def run(self) -> ExperimentResult:
        self.load()
        self.label()
        self.open_stages()  # a stage holding other settings is refused before any work
        self.attack_images()
        for method in self.purifiers:
            self.purify(method)
        if self.config.adaptive:
            self.adaptive()
        return self.write()

    def load(self) -> None:
        """The classifier and the images (decode failures are logged and reported)."""
        config, log = self.config, self.log
        log(f"loading classifier {config.classifier} ({config.backend}, {self.device})")
        self.classifier = load_classifier(
            config.classifier, config.backend, self.device, config.weights
        )
        self.model = self.classifier.module.to(self.device)
        self.classify = _Classify(self.classifier, config.batch_size)
        self.data = load_dataset(
            config.data, self.classifier.prepare, self.classifier.input_size, config.limit
        )
        self.keys = self.data.keys()
        self.out.mkdir(parents=True, exist_ok=True)  # once classifier and images are there
        failed = f", {len(self.data.failures)} failed to decode" if self.data.failures else ""
        log(f"{len(self.keys)} images from {self.data.root}{failed}")
        for failure in self.data.failures:
            log(f"skipped {failure.path}: {failure.reason}")
        self.seeds = [image_seed(config.seed, key) for key in self.keys]
        self.grid_count = min(config.grid_images, len(self.keys))

    def label(self) -> None:
        """Labels (path, CSV, or the clean predictions) and the clean row."""
        config = self.config
        clean_preds = self.classify(self.data.images)
        self.resolved = resolve_labels(self.data.paths, self.data.root, config.labels_csv)
        self.labels = torch.tensor(self.resolved.or_clean_predictions(clean_preds[:, 0].tolist()))
        # What every stored image depends on. Not the image list: outputs are per image (by
        # relative path), so a rerun with more images reuses the ones already done.
        self.base_key = {
            "version": __version__,
            "classifier": config.classifier,
            "weights": config.weights,
            "label_source": self.resolved.source,
            "labels_file": str(config.labels_csv) if config.labels_csv else None,
            "seed": config.seed,
        }
        # Per image: its file's contents and its label, which every stored output depends on.
        self.sources = {
            key: f"{sha256_file(path)}:{int(label)}"
            for key, path, label in zip(self.keys, self.data.paths, self.labels, strict=True)
        }
        self._add_row("clean", Row("Clean", "clean", None, "clean", {}), clean_preds)

    def attack_images(self) -> None:
        """The adversarial images (the attack the table is about) and their row."""
        description = self.attack_config.describe()
        self.log(f"attack: {description}")

        def compute(indices: list[int]) -> torch.Tensor:
            return attack(
                self.model,
                self.data.float_images(indices).to(self.device),
                self.labels[indices],
                self.attack_config,
                seeds=[self.seeds[i] for i in indices],
            )

        self.adv_stage = self._adversarial_stage()
        self.adversarial = self.adv_stage.run(
            self.keys, compute, self.config.batch_size, _progress(self.log, "adversarial")
        )
        row = Row(f"Adversarial ({description})", "adversarial", None, "adversarial", {})
        self._add_row("adversarial", row, self.classify(self.adversarial))

    def purify(self, method: str) -> None:
        """One purifier on the adversarial and on the clean images: two rows."""
        purifier = self.purifiers[method]
        for source, images in (("adversarial", self.adversarial), ("clean", self.data.images)):
            stage = self._method_stage(method, source)

            def compute(indices: list[int], images=images) -> torch.Tensor:
                batch = to_float(images[indices]).to(self.device)
                with torch.no_grad():
                    return purifier(batch, [self.seeds[i] for i in indices])

            outputs = stage.run(
                self.keys,
                compute,
                self.config.batch_size,
                _progress(self.log, f"{method} on {source}"),
            )
            if source == "adversarial":
                self.purified_grid[method] = outputs[: self.grid_count]
            row = Row(
                f"{method} on {source}", "purified", method, source, {}, stage.seconds_per_image()
            )
            self._add_row(f"{method}/{source}", row, self.classify(outputs))

    def adaptive(self) -> None:
        """PGD with BPDA + EOT aimed at each purifier, on a seeded subset of the images.

        The reference (the same PGD with no purifier) fills the adversarial row; then each
        method's adversarial row gets its adaptive numbers from :meth:`adaptive_method`.
        """
        config, n = self.config, len(self.keys)
        self.subset = sorted(random.Random(config.seed).sample(range(n), min(config.adaptive_n, n)))
        self.subset_keys = [self.keys[i] for i in self.subset]
        self.adaptive_info = {
            "attack": self.pgd.as_dict(),
            # EOT draws apply to the stochastic methods only; a deterministic one gets one.
            "attack_description": self.pgd.describe()
            + f" BPDA, EOT {config.eot} draws (stochastic methods)",
            "n": len(self.subset),
            "images": self.subset_keys,
        }
        plain = self._adaptive_attack(None)
        self.rows["adversarial"].adaptive = self._adaptive_fields("adversarial", plain)
        for method in self.purifiers:
            self.adaptive_method(method)

    def adaptive_method(self, method: str) -> None:
        """The adaptive attack on ``method`` + classifier, then ``method`` on its images."""
        purifier = self.purifiers[method]
        adversarial = self._adaptive_attack(method)
        stage = self._adaptive_purified_stage(method)
        seeds = [self.seeds[i] for i in self.subset]

        def compute(indices: list[int]) -> torch.Tensor:
            batch = to_float(adversarial[indices]).to(self.device)
            with torch.no_grad():
                return purifier(batch, [seeds[i] for i in indices])

        purified = stage.run(
            self.subset_keys,
            compute,
            self.config.batch_size,
            _progress(self.log, f"{method} on adaptive"),
        )
        name = f"{method}/adversarial"
        self.rows[name].adaptive = self._adaptive_fields(name, purified)

    def write(self) -> ExperimentResult:
        """report.json, report.md with its figures, and predictions.csv."""
        from advpurify.evaluation import report as report_writer

        config, classifier, data = self.config, self.classifier, self.data
        report = {
            "version": __version__,
            "data": str(data.root),
            "n": len(self.keys),
            "classifier": classifier.name,
            "backend": classifier.backend,
            "device": str(self.device),
            "attack": self.attack_config.as_dict(),
            "attack_description": self.attack_config.describe(),
            "attack_seconds_per_image": self.adv_stage.seconds_per_image(),
            "methods": {m: p.config()["params"] for m, p in self.purifiers.items()},
            "label_source": self.resolved.source,
            "metric": (
                "agreement with clean prediction" if self.resolved.is_agreement else "accuracy"
            ),
            "seed": config.seed,
            "adaptive": self.adaptive_info,
            "failed": [f.as_dict() for f in data.failures],
            "rows": [row.as_dict() for row in self.rows.values()],
        }
        report_writer.write_report(
            self.out,
            report,
            data,
            self.adversarial[: self.grid_count],
            self.purified_grid,
            self.labels,
            self.predictions,
        )
        _write_predictions(self.out / "predictions.csv", self.keys, self.labels, self.predictions)
        return ExperimentResult(report, self.out)

    # ------------------------------------------------------------------ helpers
    def _stage(self, folder: Path, **key: Any) -> Stage:
        profiles = {key: self.data.profile(i) for i, key in enumerate(self.keys)}
        return Stage(
            folder, {**self.base_key, **key}, self.config.overwrite, self.sources, profiles
        )

    def _add_row(self, name: str, row: Row, predictions: torch.Tensor) -> None:
        row.metrics = topk_accuracy(predictions, self.labels)
        self.rows[name] = row
        self.predictions[name] = predictions

    def open_stages(self) -> None:
        """Every stage this run will fill, opened now: one that holds results of other
        settings is refused (or, with overwrite, cleared) before the first attack, not when
        the run reaches it hours later."""
        self.pgd = AttackConfig(
            name="pgd",
            eps=self.attack_config.eps,
            steps=self.config.adaptive_steps,
            eot=self.config.eot,
        ).resolved()
        self._adversarial_stage()
        for method in self.purifiers:
            for source in ("adversarial", "clean"):
                self._method_stage(method, source)
            if self.config.adaptive:
                self._adaptive_attack_stage(method)
                self._adaptive_purified_stage(method)
        if self.config.adaptive:
            self._adaptive_attack_stage(None)

    def _adversarial_stage(self) -> Stage:
        return self._stage(self.out / "adversarial", attack=self.attack_config.as_dict())

    def _method_stage(self, method: str, source: str) -> Stage:
        extra = {"attack": self.attack_config.as_dict()} if source == "adversarial" else {}
        return self._stage(
            self.out / "methods" / method / source,
            purifier=self.purifiers[method].config(),
            input=source,
            **extra,
        )

    def _adaptive_attack_stage(self, method: str | None) -> Stage:
        purifier = self.purifiers[method] if method is not None else None
        return self._stage(
            self.out / "adaptive" / (method or "none"),
            adaptive_attack=self.pgd.as_dict(),
            purifier=purifier.config() if purifier is not None else None,
        )

    def _adaptive_purified_stage(self, method: str) -> Stage:
        return self._stage(
            self.out / "adaptive" / method / "purified",
            adaptive_attack=self.pgd.as_dict(),
            purifier=self.purifiers[method].config(),
        )

    def _adaptive_attack(self, method: str | None) -> torch.Tensor:
        """The adaptive PGD on the subset, through ``method`` (None: the plain classifier)."""
        purifier = self.purifiers[method] if method is not None else None
        stage = self._adaptive_attack_stage(method)
        labels = self.labels[self.subset]
        seeds = [self.seeds[i] for i in self.subset]

        def compute(indices: list[int]) -> torch.Tensor:
            images = self.data.float_images([self.subset[i] for i in indices]).to(self.device)
            return attack(
                self.model,
                images,
                labels[indices],
                self.pgd,
                purifier=purifier,
                seeds=[seeds[i] for i in indices],
            )

        return stage.run(
            self.subset_keys,
            compute,
            self.config.batch_size,
            _progress(self.log, (method or "none") + " (adaptive)"),
        )

    def _adaptive_fields(self, row: str, images: torch.Tensor) -> dict[str, float]:
        """Adaptive accuracy of the subset's final images, beside the same row's
        non-adaptive accuracy on the same subset."""
        return _adaptive_fields(
            self.classify(images),
            self.labels[self.subset],
            self.predictions[row],
            self.subset,
            self.labels,
        )


def run_experiment(config: ExperimentConfig, log: Log = lambda message: None) -> ExperimentResult:
    """The whole table in one call: ``Experiment(config, log).run()``."""
    return Experiment(config, log).run()


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
    # A file name that is not UTF-8 is written as its own bytes, as --labels reads it.
    with (
        atomic_output(path) as tmp,
        tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as handle,
    ):
        writer = csv.writer(handle)
        writer.writerow(["path", "label", *names])
        for i, key in enumerate(keys):
            writer.writerow([key, int(labels[i]), *(int(predictions[k][i, 0]) for k in names)])


__all__ = [
    "Experiment",
    "ExperimentConfig",
    "ExperimentResult",
    "parse_methods",
    "run_experiment",
]
