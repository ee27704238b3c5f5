"""Top-k accuracy from logits, and the per-folder evaluation behind ``advpurify eval``."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from advpurify.errors import AdvpurifyError
from advpurify.evaluation.classify import Preprocess, classify_paths
from advpurify.evaluation.dataset import Failure, list_images, load_dataset, relative_key
from advpurify.evaluation.labels import (
    ATTACK_MANIFEST,
    BATCH_RUN_FILE,
    SOURCE_CLEAN,
    LabelError,
    enclosing_manifest_folder,
    label_from_path,
    manifest_labels,
    resolve_labels,
    stem,
)
from advpurify.files import atomic_output, atomic_write_bytes
from advpurify.models.classifiers import LoadedClassifier
from advpurify.models.imagenet import class_name, wnids

TOP_K = (1, 3, 5)


def topk_predictions(logits: torch.Tensor, k: int = 5) -> torch.Tensor:
    """``N x k`` class indices, best first."""
    return logits.topk(min(k, logits.shape[1]), dim=1).indices


def topk_hits(predictions: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per image: is the label among the first ``k`` predictions (bool, length N)."""
    return (predictions[:, :k] == labels.view(-1, 1)).any(dim=1)


def topk_accuracy(
    logits_or_predictions: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = TOP_K
) -> dict[str, float]:
    """``{"top1": fraction, "top3": ..., "top5": ...}``; accepts logits or top-k predictions."""
    preds = logits_or_predictions
    if preds.is_floating_point():
        preds = topk_predictions(preds, max(ks))
    n = labels.shape[0]
    return {
        # hits / n in Python's double: 2/3 is 0.6666666666666666, not float32's 0.66666669
        f"top{k}": (int(topk_hits(preds, labels, k).sum()) / n if n else float("nan"))
        for k in ks
    }


def check_num_classes(logits: torch.Tensor, classifier_name: str) -> None:
    from advpurify.models.classifiers import NUM_CLASSES, ClassifierError

    if logits.shape[1] != NUM_CLASSES:
        raise ClassifierError(
            f"classifier {classifier_name} predicts {logits.shape[1]} classes, not ImageNet's "
            f"{NUM_CLASSES}; labels cannot be compared"
        )


@dataclass
class FolderEvaluation:
    """The result of :func:`evaluate_folder`: summary numbers and one record per image."""

    root: Path
    classifier: str
    label_source: str
    metrics: dict[str, float]
    paths: list[Path]
    labels: list[int]
    predictions: torch.Tensor  # N x 5
    failures: list[Failure] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.paths)

    def summary(self) -> dict:
        return {
            "n": self.n,
            **self.metrics,
            "label_source": self.label_source,
            "classifier": self.classifier,
            "data": str(self.root),
            "failed": [f.as_dict() for f in self.failures],
        }

    def write_json(self, path: Path) -> None:
        atomic_write_bytes(path, (json.dumps(self.summary(), indent=2) + "\n").encode())

    def write_csv(self, path: Path) -> None:
        """One row per image: path, label, top-5 predictions, hit at 1/3/5."""
        path.parent.mkdir(parents=True, exist_ok=True)
        labels = torch.tensor(self.labels)
        hits = {k: topk_hits(self.predictions, labels, k) for k in TOP_K}
        # A file name that is not UTF-8 is written as its own bytes, as --labels reads it.
        with (
            atomic_output(path) as tmp,
            tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as handle,
        ):
            writer = csv.writer(handle)
            writer.writerow(
                [
                    "path",
                    "label",
                    "label_wnid",
                    "label_name",
                    "top5",
                    "top1_name",
                    "correct_top1",
                    "correct_top3",
                    "correct_top5",
                ]
            )
            for i, image_path in enumerate(self.paths):
                preds = [int(p) for p in self.predictions[i]]
                writer.writerow(
                    [
                        _relative(image_path, self.root),
                        self.labels[i],
                        wnids()[self.labels[i]],
                        class_name(self.labels[i]),
                        " ".join(map(str, preds)),
                        class_name(preds[0]),
                        *(int(hits[k][i]) for k in TOP_K),
                    ]
                )


def check_eval_inputs(
    root: Path,
    labels_csv: Path | None = None,
    reference: Path | None = None,
    left_out: list[Path] | None = None,
) -> tuple[Path, list[Path]]:
    """What can be checked before a classifier loads: images to evaluate, labels for them
    somewhere (the CSV, the paths, an attack's manifest, directly or through a purify-batch
    run's, or a reference folder). Returns
    ``list_images(root)``."""
    root, paths = list_images(Path(root), left_out)
    if reference is not None and not Path(reference).exists():
        raise LabelError(f"--reference {reference}: no such file or folder")
    if reference is not None and labels_csv is not None:
        raise LabelError("--labels and --reference: give one (true labels, or the originals)")
    if labels_csv is None and reference is None:
        if all(label_from_path(path, root) is None for path in paths):
            if manifest_labels(paths, root, search_up=True) is None:
                raise LabelError(_NO_LABELS.format(root=root))
    return root, paths


def check_report_files(root: Path, files: dict[str, Path | None]) -> None:
    """``--json``/``--csv`` files outside what is evaluated (they would replace an image, or a
    manifest its labels come from), and not one file twice."""
    source = Path(root).resolve()
    records = set()  # the manifest above a sub-folder, which its labels come from
    if (found := enclosing_manifest_folder(Path(root))) is not None:
        records = {(found[0] / name).resolve() for name in (ATTACK_MANIFEST, BATCH_RUN_FILE)}
    seen: dict[Path, str] = {}
    for option, path in files.items():
        if path is None:
            continue
        target = Path(path).resolve()
        if target == source or source in target.parents or target in records:
            raise AdvpurifyError(
                f"{option} {path}: inside {root}, or one of the records eval reads there; "
                "write it elsewhere"
            )
        if target in seen:
            raise AdvpurifyError(f"{option} {path}: the same file as {seen[target]}")
        seen[target] = option


_NO_LABELS = (
    "{root}: no labels (no WordNet id in the file or folder names); give --labels FILE.csv, or "
    "--reference DIR with the original images to measure agreement with their clean "
    "predictions"
)


def evaluate_folder(
    root: Path,
    classifier: LoadedClassifier,
    labels_csv: Path | None = None,
    batch_size: int = 32,
    reference: Path | None = None,
) -> FolderEvaluation:
    """Top-1/3/5 of ``classifier`` on every image under ``root`` (a folder or one file).

    Labels come from the CSV, the paths or a manifest (see ``resolve_labels``); ``reference``
    (the folder of the original images, same relative paths, any extension), where given,
    supplies pseudo-labels instead: the classifier's prediction on each original ("agreement
    with clean prediction").
    """
    root, paths = check_eval_inputs(root, labels_csv, reference)
    # Decoding and resizing overlap with inference (reader threads), so a folder classifies
    # at nearly the backend's own speed.
    result = classify_paths(
        paths, classifier.runner.run, Preprocess.of(classifier.module), batch_size=batch_size
    )
    failures = [Failure(path, reason) for path, reason in result.failures]
    if not result.paths:
        raise AdvpurifyError(f"{root}: no readable images ({len(failures)} failed to decode)")
    logits = result.logits
    check_num_classes(logits, classifier.name)
    predictions = topk_predictions(logits, 5)
    if reference is not None:  # asked for: wins over labels in the names or a manifest
        keys = [relative_key(path, root) for path in result.paths]
        indices = reference_predictions(keys, Path(reference), classifier, batch_size)
        source = SOURCE_CLEAN
    else:
        labels = resolve_labels(result.paths, root, labels_csv, search_up=True)
        if labels.source == SOURCE_CLEAN:
            raise LabelError(_NO_LABELS.format(root=root))
        indices, source = [int(i) for i in labels.indices], labels.source
    metrics = topk_accuracy(predictions, torch.tensor(indices))
    return FolderEvaluation(
        root=root,
        classifier=classifier.name,
        label_source=source,
        metrics=metrics,
        paths=result.paths,
        labels=indices,
        predictions=predictions,
        failures=failures,
    )


def reference_predictions(
    keys: Sequence[str], reference: Path, classifier: LoadedClassifier, batch_size: int = 32
) -> list[int]:
    """The classifier's top-1 on the reference image of each key (see :func:`match_reference`)."""
    ref = load_dataset(reference, classifier.prepare, classifier.input_size)
    order = match_reference(keys, ref.keys(), reference)
    logits = classifier.logits(ref.float_images(order), batch_size=batch_size)
    return [int(i) for i in logits.argmax(dim=1)]


def match_reference(keys: Sequence[str], ref_keys: Sequence[str], reference: Path) -> list[int]:
    """For each key, the index of its reference image: the same relative path; else the path
    the output was named after (``a.jpg.png`` -> ``a.jpg``, as ``purify-batch`` names clashing
    outputs); else the only reference image with the same path minus its extension (``a.png``
    -> ``a.jpg``). Two candidates are refused rather than guessed."""
    exact = {key: i for i, key in enumerate(ref_keys)}
    by_stem: dict[str, list[int]] = {}
    for i, key in enumerate(ref_keys):
        by_stem.setdefault(stem(key), []).append(i)
    order = []
    for key in keys:
        if key in exact:
            order.append(exact[key])
        elif stem(key) in exact:
            order.append(exact[stem(key)])
        elif len(by_stem.get(stem(key), [])) == 1:
            order.append(by_stem[stem(key)][0])
        elif stem(key) in by_stem:
            names = ", ".join(ref_keys[i] for i in by_stem[stem(key)])
            raise LabelError(f"reference {reference}: {key} could be any of {names}")
        else:
            raise LabelError(f"reference {reference}: no image for {key}")
    return order


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name
