"""``advpurify attack``: attack every image of a folder and write the adversarial images.

Each image is resized and centre-cropped to the classifier's input (256 -> 224), attacked, and
written under the output folder at the same relative path (PNG by default), with a
``manifest.jsonl`` line per image: label, clean and adversarial predictions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from advpurify.attacks import AttackConfig, attack
from advpurify.errors import AdvpurifyError
from advpurify.evaluation.accuracy import check_num_classes, topk_accuracy, topk_predictions
from advpurify.evaluation.dataset import list_images, load_dataset, relative_key
from advpurify.evaluation.labels import attack_manifest_labels, parse_label, resolve_labels
from advpurify.files import atomic_write_bytes, check_output_outside, mirror_names
from advpurify.images import OUTPUT_FORMATS, decode_image, encode_image
from advpurify.models.classifiers import LoadedClassifier
from advpurify.models.imagenet import class_name
from advpurify.purifiers.base import image_seed

JPEG_WARNING = (
    "writing adversarial images as JPEG: JPEG compression is itself a purification (it removes "
    "much of the perturbation), so every accuracy measured on these files will be too high; "
    "use PNG (the default) for experiments"
)


def check_attack_inputs(source: Path, out: Path, fmt: str, target: str | None) -> str:
    """What can be checked before a classifier loads; returns the format's canonical name."""
    fmt = "jpg" if fmt.lower() == "jpeg" else fmt.lower()
    if fmt not in OUTPUT_FORMATS:
        raise AdvpurifyError(f"--format {fmt!r}: use one of {', '.join(OUTPUT_FORMATS)}")
    if target is not None:
        parse_label(target, "--target")
    root, paths = list_images(Path(source))
    check_output_outside(source, out)
    if (Path(out) / "run.json").exists():  # purify-batch's record of the settings of its outputs
        raise AdvpurifyError(
            f"output folder {out} holds a purify-batch run (run.json): adversarial images would "
            "replace its outputs; choose another folder"
        )
    names = mirror_names([relative_key(p, root) for p in paths], OUTPUT_FORMATS[fmt])
    refuse_other_attacks_outputs(Path(out), [name.as_posix() for name in names])
    return fmt


def refuse_other_attacks_outputs(out: Path, names: list[str]) -> None:
    """An earlier attack's outputs that this one would not replace would stay beside the new
    ones, unlisted in the new manifest (and counted by ``eval``): refused before any work."""
    earlier = attack_manifest_labels(out)
    stale = sorted(set(earlier[0]) - set(names)) if earlier is not None else []
    if stale:
        raise AdvpurifyError(
            f"output folder {out} holds another attack's outputs that this one would not "
            f"replace ({len(stale)}, e.g. {stale[0]}): choose another folder, or remove them"
        )


def attack_folder(
    source: Path,
    out: Path,
    classifier: LoadedClassifier,
    config: AttackConfig,
    *,
    fmt: str = "png",
    labels_csv: Path | None = None,
    target: str | None = None,
    batch_size: int = 16,
    seed: int = 0,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Attack every image under ``source`` (a folder or one file); returns a summary."""
    fmt = check_attack_inputs(source, out, fmt, target)
    config = config.resolved()
    out = Path(out)
    data = load_dataset(source, classifier.prepare, classifier.input_size)
    for failure in data.failures:
        log(f"skipped {failure.path}: {failure.reason}")
    keys = data.keys()
    names = mirror_names(keys, OUTPUT_FORMATS[fmt])  # a clash is refused before any attack
    clean_logits = classifier.logits(data.float_images(), batch_size=batch_size)
    check_num_classes(clean_logits, classifier.name)
    clean_preds = topk_predictions(clean_logits, 5)
    resolved = resolve_labels(data.paths, data.root, labels_csv)
    labels = torch.tensor(resolved.or_clean_predictions(clean_preds[:, 0].tolist()))

    if target is not None:
        goal = torch.full_like(labels, parse_label(target, "--target"))
        config = replace(config, targeted=True)
    else:
        goal = labels
    seeds = [image_seed(seed, key) for key in keys]
    model = classifier.module
    device = classifier.device
    adversarial = []
    for start in range(0, len(keys), batch_size):
        stop = min(start + batch_size, len(keys))
        images = data.float_images(range(start, stop)).to(device)
        adversarial.append(
            attack(model, images, goal[start:stop], config, seeds=seeds[start:stop]).cpu()
        )
        log(f"attacked {stop}/{len(keys)}")
    # What is reported is what was written: the images as their files decode (8-bit levels,
    # and for JPEG/WebP the codec's own changes), not the float tensors the attack made.
    # Each output carries its input's colour profile, as purify-batch's do.
    encoded = [
        encode_image(image, fmt, profile=data.profile(i))
        for i, image in enumerate(torch.cat(adversarial))
    ]
    written = torch.stack([decode_image(data) for data in encoded])
    adv_preds = topk_predictions(classifier.logits(written, batch_size=batch_size), 5)

    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, name in enumerate(names):
        target_path = out / name
        atomic_write_bytes(target_path, encoded[i])
        record = {
            "input": str(data.paths[i]),
            "output": str(target_path),
            "status": "done",
            "name": name.as_posix(),  # eval finds each output's label by it
            "label": int(labels[i]),
            "label_source": resolved.source,
            "label_name": class_name(int(labels[i])),
            "clean_pred": int(clean_preds[i, 0]),
            "clean_pred_name": class_name(int(clean_preds[i, 0])),
            "adv_pred": int(adv_preds[i, 0]),
            "adv_pred_name": class_name(int(adv_preds[i, 0])),
        }
        if target is not None:
            record["target"] = int(goal[i])
        records.append(record)
    records += [
        {"input": str(f.path), "status": "failed", "reason": f.reason} for f in data.failures
    ]
    manifest = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write_bytes(out / "manifest.jsonl", manifest.encode())

    summary: dict[str, Any] = {
        "n": len(keys),
        "failed": len(data.failures),
        "label_source": resolved.source,
        "attack": config.as_dict(),
        "clean": topk_accuracy(clean_preds, labels),
        "adversarial": topk_accuracy(adv_preds, labels),
        "output": str(out),
    }
    if target is not None:
        # Counted over the images not already predicted as the target before the attack.
        moved = clean_preds[:, 0] != goal
        summary["already_target"] = int((~moved).sum())
        if moved.any():
            reached = adv_preds[:, 0][moved] == goal[moved]
            summary["target_success"] = float(reached.float().mean())
    return summary
