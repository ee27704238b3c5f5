"""Where an image's true class comes from: its path, a CSV, or (failing both) nothing.

- A WordNet id at the start of the file name (``n01440764_tench.JPEG``) or as a parent folder
  name below the data root (``val/n01440764/x.jpg``, the ImageNet layout).
- A CSV (``--labels``): ``path,label`` per line, label a class index (0-999) or a WordNet id;
  path relative to the data root (or just the file name when that is unambiguous). A header
  line is allowed.
- The ``manifest.jsonl`` that ``advpurify attack`` wrote beside its outputs: the label each
  adversarial image was attacked away from (``attack-manifest``; where the attack itself had
  no labels, those are the clean predictions: ``attack-manifest:clean-prediction``).
- For a ``purify-batch`` output folder of an attack's outputs: the label of the image each
  output was made from (its ``manifest.jsonl`` maps inputs to outputs), from the attack's
  manifest, so ``attack`` -> ``purify-batch`` -> ``eval`` keeps the attack's labels.
- For ``eval``, either manifest also labels a sub-folder of its run (the nearest manifest above
  decides).
- None of these: the caller uses the classifier's clean prediction as a pseudo-label and
  reports "agreement with clean prediction" rather than accuracy.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from advpurify.errors import AdvpurifyError
from advpurify.models.imagenet import NUM_CLASSES, WNID_PATTERN, wnid_to_index

SOURCE_PATH = "path"
SOURCE_CSV = "csv"
SOURCE_CLEAN = "clean-prediction"
SOURCE_ATTACK = "attack-manifest"
ATTACK_MANIFEST = "manifest.jsonl"
BATCH_RUN_FILE = "run.json"  # purify-batch's settings file: its manifest maps inputs to outputs


def is_pseudo_source(source: str) -> bool:
    """Labels that are, or came from, clean predictions: numbers are agreement, not accuracy."""
    return source.endswith(SOURCE_CLEAN)


class LabelError(AdvpurifyError, ValueError):
    """A label file that cannot be read, or a label outside the 1000 ImageNet classes."""


def parse_label(value: str, where: str) -> int:
    """A class index ``0..999`` or a WordNet id -> class index."""
    text = value.strip()
    if WNID_PATTERN.fullmatch(text):
        index = wnid_to_index().get(text)
        if index is None:
            raise LabelError(f"{where}: WordNet id {text} is not one of the 1000 ImageNet classes")
        return index
    try:
        index = int(text)
    except ValueError:
        raise LabelError(
            f"{where}: label {text!r} is neither a class index nor a WordNet id"
        ) from None
    if not 0 <= index < NUM_CLASSES:
        raise LabelError(f"{where}: class index {index} is outside 0..{NUM_CLASSES - 1}")
    return index


def label_from_path(path: Path, root: Path | None = None) -> int | None:
    """The class named by a WordNet id leading the file name or naming a parent folder."""
    match = WNID_PATTERN.match(path.name)
    if match and match.group(0) in wnid_to_index():
        return wnid_to_index()[match.group(0)]
    parents = path.parent.relative_to(root).parts if root is not None else path.parent.parts
    for part in reversed(parents):
        if WNID_PATTERN.fullmatch(part) and part in wnid_to_index():
            return wnid_to_index()[part]
    return None


def read_labels_csv(csv_path: Path) -> dict[str, int]:
    """``{path as written: class index}`` from a two-column CSV."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise LabelError(f"labels file {csv_path}: not found")
    labels: dict[str, int] = {}
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark. surrogateescape: a file
    # name that is not UTF-8 keeps its bytes and matches the file.
    with csv_path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        first = True
        for line_no, row in enumerate(csv.reader(handle), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) < 2:
                raise LabelError(f"labels file {csv_path}, line {line_no}: expected path,label")
            path, value = row[0].strip(), row[1].strip()
            number = value.lstrip("+-").isdigit()  # "-1" is a bad label, not a header
            header = first and not number and not WNID_PATTERN.fullmatch(value)
            first = False
            if header:
                continue  # a header: the first row, after any comments
            where = f"labels file {csv_path}, line {line_no}"
            label = parse_label(value, where)
            if labels.get(path, label) != label:
                raise LabelError(f"{where}: {path} is labelled twice ({labels[path]} and {label})")
            labels[path] = label
    if not labels:
        raise LabelError(f"labels file {csv_path}: no labels in it")
    return labels


@dataclass(frozen=True)
class Labels:
    """One class index per image (``None`` where unknown) and where they came from."""

    indices: list[int | None]
    source: str  # path | csv | clean-prediction (labels still to be filled by the caller)

    @property
    def is_pseudo(self) -> bool:
        """No labels: the caller fills in the clean predictions."""
        return self.source == SOURCE_CLEAN

    @property
    def is_agreement(self) -> bool:
        """Numbers against these labels are agreement with clean predictions, not accuracy."""
        return is_pseudo_source(self.source)

    def or_clean_predictions(self, clean_top1: Sequence[int]) -> list[int]:
        """The class indices; with no labels, the classifier's clean top-1 as pseudo-labels
        (numbers are then agreement with the clean prediction, not accuracy)."""
        if self.is_pseudo:
            return [int(p) for p in clean_top1]
        return [int(i) for i in self.indices]  # type: ignore[arg-type]


def resolve_labels(
    paths: Sequence[Path],
    root: Path,
    labels_csv: Path | None = None,
    search_up: bool = False,
) -> Labels:
    """Labels for ``paths`` (all below ``root``): from the CSV, else from the paths, else from
    an attack's manifest in ``root`` (or its ``purify-batch`` copy's; with ``search_up``, also
    in the nearest folder above that has a manifest), else none.

    Returns ``source == "clean-prediction"`` with all indices ``None`` when no image carries a
    label; the caller fills them with the clean predictions.
    """
    root = Path(root)
    if labels_csv is not None:
        table = read_labels_csv(Path(labels_csv))
        return Labels(_from_table(paths, root, table, f"labels file {labels_csv}"), SOURCE_CSV)
    found = [label_from_path(path, root) for path in paths]
    missing = [path for path, index in zip(paths, found, strict=True) if index is None]
    if not missing:
        return Labels(found, SOURCE_PATH)
    recorded = manifest_labels(paths, root, search_up)
    if recorded is not None:  # the attack's record covers the names without a WordNet id
        return recorded
    if len(missing) == len(paths):
        return Labels([None] * len(paths), SOURCE_CLEAN)
    raise LabelError(
        f"{len(missing)} of {len(paths)} images have no WordNet id in their name or folder "
        f"(first: {_relative(missing[0], root)}); give --labels FILE.csv"
    )


def manifest_labels(paths: Sequence[Path], root: Path, search_up: bool = False) -> Labels | None:
    """Labels from the manifest of the run that wrote ``root`` (an ``advpurify attack``, or a
    ``purify-batch`` of one); None where there is none.

    ``search_up``: where ``root`` has no manifest, the nearest folder above that has one
    decides (``eval ADV/cats`` reads ``ADV``'s). Up there, a manifest that cannot be read as
    advpurify's counts as none, and an image must be listed under its own path."""
    root = Path(root)
    found = enclosing_manifest_folder(root) if search_up else (root, _HERE)
    if found is None:
        return None
    folder, prefix = found
    above = prefix != _HERE
    try:
        attacked = attack_manifest_labels(folder)
    except LabelError:
        if above:
            return None  # another tool's manifest.jsonl
        raise
    if attacked is not None:
        table, source = attacked
        where = str(folder / ATTACK_MANIFEST)
        return Labels(_from_table(paths, root, table, where, prefix, by_name=not above), source)
    return purified_copy_labels(paths, folder, RootedAt(root, prefix))


_HERE = PurePosixPath(".")


def enclosing_manifest_folder(root: Path) -> tuple[Path, PurePosixPath] | None:
    """The nearest of ``root`` and its parents with a ``manifest.jsonl``, and ``root``'s path
    inside it (by the path as written: a folder reached through a link is not followed back)."""
    root = Path(root)
    start = Path(os.path.abspath(root))
    for folder in (start, *start.parents):
        if (folder / ATTACK_MANIFEST).is_file():
            prefix = PurePosixPath(start.relative_to(folder).as_posix())
            return (root, prefix) if folder == start else (folder, prefix)
    return None


@dataclass(frozen=True)
class RootedAt:
    """Paths below ``root``, which lies at ``prefix`` inside the folder a manifest describes."""

    root: Path
    prefix: PurePosixPath = _HERE

    def relative(self, path: Path) -> str:
        return (self.prefix / _relative(path, self.root)).as_posix()


def _from_table(
    paths: Sequence[Path],
    root: Path,
    table: dict[str, int],
    where: str,
    prefix: PurePosixPath = _HERE,
    by_name: bool = True,
) -> list[int | None]:
    """Each path's label by its path relative to ``root`` (or as given, or, with ``by_name``,
    by its file name where that is unambiguous); ``prefix`` is where ``root`` lies in the
    table's folder."""
    names: dict[str, list[int]] = {}
    stems: dict[str, list[str]] = {}
    for key, index in table.items():
        names.setdefault(Path(key).name, []).append(index)
        stems.setdefault(stem(key), []).append(key)
    indices: list[int | None] = []
    for path in paths:
        rel = RootedAt(root, prefix).relative(path)
        index = table.get(rel, table.get(str(path)))
        if index is None and by_name and len(names.get(path.name, [])) == 1:
            index = names[path.name][0]
        if index is None and by_name:
            index = _by_stem(rel, table, stems, where)
        if index is None:
            raise LabelError(f"{where}: no label for {rel}")
        indices.append(index)
    return indices


def _by_stem(
    rel: str, table: dict[str, int], stems: dict[str, list[str]], where: str
) -> int | None:
    """The label of the image an output was named after: ``a.jpg.png`` -> ``a.jpg`` (as
    ``purify-batch`` names clashing outputs), else the only key with the same path minus its
    extension (``a.png`` -> ``a.jpg``); two candidates are refused rather than guessed."""
    if stem(rel) in table:
        return table[stem(rel)]
    candidates = stems.get(stem(rel), [])
    if len(candidates) > 1:
        raise LabelError(f"{where}: {rel} could be any of {', '.join(sorted(candidates))}")
    return table[candidates[0]] if candidates else None


def stem(key: str) -> str:
    """``a/b.jpg`` -> ``a/b``; a name without an extension stays as it is."""
    return key.rsplit(".", 1)[0] if "." in key.rsplit("/", 1)[-1] else key


def attack_manifest_labels(root: Path) -> tuple[dict[str, int], str] | None:
    """``({output name: label}, source)`` from the manifest ``advpurify attack`` wrote in
    ``root``; None where there is none (or it is another command's manifest)."""
    manifest = Path(root) / ATTACK_MANIFEST
    if not manifest.is_file():
        return None
    table: dict[str, int] = {}
    sources = set()
    try:
        text = manifest.read_text(encoding="utf-8-sig", errors="surrogateescape")
    except OSError as error:
        raise LabelError(f"{manifest}: unreadable ({error.strerror or error})") from None
    for line_no, line in enumerate(text.splitlines(), start=1):
        where = f"{manifest}, line {line_no}"
        try:
            record = json.loads(line) if line.strip() else {}
        except ValueError as error:
            raise LabelError(f"{where}: not JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise LabelError(f"{where}: not a JSON object")
        if record.get("status") != "done" or "label" not in record:
            continue  # a failed image, or another command's record (purify-batch's has no label)
        name = record.get("name")
        if name is None and isinstance(record.get("output"), str):
            name = Path(record["output"]).name  # a manifest from before names were recorded
        if not isinstance(name, str) or not name:
            raise LabelError(f'{where}: no output name ("name" or "output")')
        label = parse_label(str(record["label"]), where)
        if table.get(name, label) != label:
            raise LabelError(f"{where}: {name} is labelled twice ({table[name]} and {label})")
        table[name] = label
        sources.add(str(record.get("label_source")))
    if not table:
        return None
    clean = any(is_pseudo_source(source) for source in sources)
    return table, f"{SOURCE_ATTACK}:{SOURCE_CLEAN}" if clean else SOURCE_ATTACK


def purified_copy_labels(
    paths: Sequence[Path], root: Path, below: RootedAt | None = None
) -> Labels | None:
    """Labels for the outputs of a ``purify-batch`` run in ``root``: each output's input, as
    its ``manifest.jsonl`` records it, labelled by the attack manifest in the batch's input
    folder. None where ``root`` is no such run, or its inputs are no attack's outputs.
    ``below``: the paths lie in a sub-folder of ``root`` (default: directly in ``root``)."""
    below = below or RootedAt(Path(root))
    manifest = Path(root) / ATTACK_MANIFEST
    if not (Path(root) / BATCH_RUN_FILE).is_file() or not manifest.is_file():
        return None
    # Output path suffix -> (output, input) as last recorded: a resumed run records an output
    # again (skipped), perhaps from another working folder; the latest record wins.
    inputs: dict[tuple[str, ...], tuple[str, str]] = {}
    try:
        lines = manifest.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except OSError as error:
        raise LabelError(f"{manifest}: unreadable ({error.strerror or error})") from None
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the batch's own resume reads and reports its manifest
        if not isinstance(record, dict) or record.get("status") not in ("done", "skipped"):
            continue
        output, source = record.get("output"), record.get("input")
        if not isinstance(output, str) or not isinstance(source, str) or not output or not source:
            continue
        parts = Path(output).parts
        for depth in range(1, len(parts) + 1):
            inputs[parts[-depth:]] = (output, source)
    found: list[tuple[int, str] | None] = []
    attacks: dict[Path, tuple[dict[str, int], str] | None] = {}  # each folder's read once
    for path in paths:
        rel = Path(below.relative(path))
        pair = inputs.get(rel.parts)
        if pair is None:
            found.append(None)
        else:
            found.append(_input_label(Path(pair[0]), Path(pair[1]), rel, Path(root), attacks))
    known = [entry for entry in found if entry is not None]
    if not known:
        return None
    if len(known) < len(found):
        missing = paths[found.index(None)]
        raise LabelError(
            f"{manifest}: no label for {below.relative(missing)} from the images it was "
            "purified from; give --labels FILE.csv or --reference"
        )
    clean = any(is_pseudo_source(source) for _, source in known)
    return Labels(
        [index for index, _ in known], f"{SOURCE_ATTACK}:{SOURCE_CLEAN}" if clean else SOURCE_ATTACK
    )


def _input_label(
    output: Path,
    source: Path,
    rel: Path,
    root: Path,
    attacks: dict[Path, tuple[dict[str, int], str, PurePosixPath] | None],
) -> tuple[int, str] | None:
    """The label of the image ``source`` that purify-batch turned into ``root / rel``
    (``output`` as its manifest wrote it), from the attack manifest of the batch's input
    folder (or of the folder above it that has one), and that manifest's label source."""
    depth = len(rel.parts)
    if len(source.parts) < depth:
        return None
    # The batch's input folder, found from this output folder as it is now (both may have
    # been given relative to another working folder, or moved together), else as written.
    recorded_root, input_root = output.parents[depth - 1], source.parents[depth - 1]
    for candidate in (root / os.path.relpath(input_root, recorded_root), input_root):
        if candidate not in attacks:
            attacks[candidate] = _attack_table_for(candidate)
        attacked = attacks[candidate]
        if attacked is not None:
            table, attack_source, prefix = attacked
            index = table.get((prefix / source.relative_to(input_root).as_posix()).as_posix())
            return None if index is None else (index, attack_source)
    return None


def _attack_table_for(folder: Path) -> tuple[dict[str, int], str, PurePosixPath] | None:
    """The attack manifest that labels ``folder``'s images, its own or the nearest folder
    above's, with ``folder``'s path inside that folder."""
    found = enclosing_manifest_folder(folder) if folder.is_dir() else None
    if found is None:
        return None
    where, prefix = found
    try:
        attacked = attack_manifest_labels(where)
    except LabelError:
        if prefix != _HERE:
            return None  # another tool's manifest.jsonl above
        raise
    return None if attacked is None else (*attacked, prefix)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
