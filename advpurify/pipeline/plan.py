"""The plan of a batch run, independent of the engine that executes it (local threads, Ray).

Everything that can be checked is checked here, before any image is decoded: the options, the
folders (disjoint both ways, writable, no symlinked control files), the output names (unique),
the settings recorded in ``run.json`` (finite, and the same as a previous run's for a resume).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from advpurify import __version__, checks
from advpurify.errors import AdvpurifyError
from advpurify.files import (
    atomic_write_bytes,
    check_input_folder,
    check_output_outside,
    check_writable_folder,
    display_name,
    mirror_names,
    refuse_other_settings,
    remove_stale_temporaries,
    sha256_file,
)
from advpurify.images import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    OUTPUT_FORMATS,
    allow_pixels,
    check_background,
    check_max_pixels,
    find_images,
    read_image_file,
)
from advpurify.pipeline.lock import LOCK_FILE, OutputLock
from advpurify.purifiers import current_config
from advpurify.purifiers.base import Purifier

MANIFEST = "manifest.jsonl"
RUN_FILE = "run.json"
CONTROL_FILES = (MANIFEST, RUN_FILE, LOCK_FILE)
# Decoded pixels in flight: 32 megapixels are 384 MB per float32 RGB copy; a batch is held in
# about three copies at its peak (decoded, purified, being encoded). See docs/batch.md.
PIXEL_BUDGET = 32_000_000


@dataclasses.dataclass(frozen=True)
class Shard:
    """Image ``k`` belongs to shard ``index`` of ``count`` when ``k % count == index``."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        parts = text.split("/")
        # Digits only: int() would also take "1_0", " 1" or "+1".
        if len(parts) != 2 or not all(part.isascii() and part.isdigit() for part in parts):
            raise AdvpurifyError(f"--shard {text!r}: expected i/n, e.g. 0/4")
        index, count = int(parts[0]), int(parts[1])
        if count < 1 or not 0 <= index < count:
            raise AdvpurifyError(f"--shard {text!r}: need 0 <= i < n")
        return cls(index, count)


DEFAULT_QUALITY = 95


@dataclasses.dataclass
class PipelineOptions:
    batch_size: int = 16
    workers: int = 2
    fmt: str = "png"
    quality: int | None = None  # jpg and webp only; None is DEFAULT_QUALITY
    seed: int = 0
    overwrite: bool = False
    shard: Shard = Shard()
    background: str = "white"
    # One image above this fails alone, from its header, before it is decoded.
    max_image_pixels: int = MAX_IMAGE_PIXELS
    # Decoded pixels in flight at once (an image larger than the budget runs alone).
    pixel_budget: int = PIXEL_BUDGET

    def check(self) -> None:
        if self.batch_size < 1:
            raise AdvpurifyError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.workers < 1:
            raise AdvpurifyError(f"--workers {self.workers}: must be at least 1")
        if self.fmt not in OUTPUT_FORMATS:
            raise AdvpurifyError(f"--format {self.fmt!r}: use one of {', '.join(OUTPUT_FORMATS)}")
        if self.quality is not None:
            if self.fmt == "png":
                raise AdvpurifyError("--quality: applies to jpg and webp only (png is lossless)")
            if not 1 <= self.quality <= 100:
                raise AdvpurifyError(f"--quality {self.quality}: must be in 1..100")
        check_background(self.background)
        check_max_pixels(self.max_image_pixels)
        if self.pixel_budget < 1:
            raise AdvpurifyError(f"--pixel-budget {self.pixel_budget}: must be at least 1")
        checks.seed("--seed", self.seed)

    @property
    def encode_quality(self) -> int:
        return DEFAULT_QUALITY if self.quality is None else self.quality

    @property
    def read_ahead(self) -> int:
        """Reads in flight: a whole batch plus two per reader, so decoding overlaps the device
        (the pixel budget bounds it further)."""
        return self.batch_size + 2 * self.workers

    @property
    def max_in_flight(self) -> int:
        """Decoded images alive at once: reads ahead, partial batches (< batch_size before a
        flush), one batch on the device, and what the writers still hold."""
        return self.read_ahead + 2 * self.batch_size + 2 * self.workers


@dataclasses.dataclass
class WorkItem:
    """One image to purify: where it comes from, where it goes, its seed."""

    source: Path
    target: Path
    seed: int
    pixels: int | None = None  # from the header, read when the item is admitted
    profile: bytes | None = None  # the input's RGB colour profile, embedded in its output
    started: float = 0.0  # when its read was submitted (the manifest's seconds)
    fingerprint: dict[str, Any] | None = None  # the input as read (see read_source)


def read_source(path: Path, max_pixels: int) -> tuple[bytes, dict[str, Any]]:
    """An input's bytes and its fingerprint: size, times and the SHA-256 of those very bytes
    (the times taken first: a file replaced meanwhile is recorded by what was read)."""
    try:
        info = os.stat(path)
    except OSError:
        info = None  # reading it says why, in its own words
    data = read_image_file(path, max_pixels)
    info = info or os.stat(path)
    return data, _fingerprint(info, len(data), hashlib.sha256(data).hexdigest())


def _fingerprint(info: os.stat_result, size: int, digest: str) -> dict[str, Any]:
    return {
        "size": size,
        "mtime_ns": info.st_mtime_ns,
        "ctime_ns": info.st_ctime_ns,
        "sha256": digest,
    }


def current_source(path: Path, recorded: dict[str, Any]) -> dict[str, Any] | None:
    """``path``'s fingerprint if it still holds what ``recorded`` describes, else None. Size and
    times alike: the record as it is, nothing read; else the digest decides (a copy that reset
    the times is the same input), and the fingerprint comes back with today's times."""
    try:
        info = os.stat(path)
        if info.st_size != recorded.get("size"):
            return None
        times = (info.st_mtime_ns, info.st_ctime_ns)
        if times == (recorded.get("mtime_ns"), recorded.get("ctime_ns")):
            return recorded
        digest = sha256_file(path)
    except OSError:
        return None  # gone or unreadable since planning: purifying it says why
    return _fingerprint(info, info.st_size, digest) if digest == recorded.get("sha256") else None


def not_newer(source: Path, target: Path) -> bool:
    """For outputs recorded before fingerprints were kept: the input is no newer than its
    output (``make``'s rule)."""
    try:
        return source.stat().st_mtime_ns <= target.stat().st_mtime_ns
    except OSError:
        return False


@dataclasses.dataclass
class RunPlan:
    """A checked run: settings recorded in ``run.json``, the images of this shard listed."""

    input_dir: Path
    output_dir: Path
    purifier: Purifier
    options: PipelineOptions
    pairs: list[tuple[Path, Path]]  # (input file, output file)
    lock: OutputLock | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    stale_before: int | None = None
    """While an ``--overwrite`` is unfinished: outputs modified before this (ns) are stale."""
    left_out: list[Path] = dataclasses.field(default_factory=list)
    """Files of the input folder without an image extension (not purified, said so)."""

    def is_done(self, target: Path) -> bool:
        """Whether ``target`` holds an output of this run's settings (a resume skips it, where
        its input is unchanged: see ``RunRecorder.pending``)."""
        try:
            info = target.stat()
        except OSError:  # absent, or a name the file system refuses: writing it says why
            return False
        if self.options.overwrite or not stat.S_ISREG(info.st_mode):
            return False  # a folder at the output path is no output: writing it fails alone
        return self.stale_before is None or info.st_mtime_ns >= self.stale_before

    def finish_overwrite(self) -> None:
        """Every image was redone: older outputs no longer exist, run.json drops the mark.
        (Not after one shard of several: the other shards' outputs are still the old ones.)"""
        if self.stale_before is not None and self.options.shard.count == 1:
            write_run_file(self.output_dir, self.config)
            self.stale_before = None

    def close(self) -> None:
        """Release the output folder's lock (the engine calls this when the run ends)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def default_output_dir(input_dir: Path, method: str) -> Path:
    """A sibling of the input folder as named: ``photos`` -> ``photos-purified-rescale``
    (beside a symlink ``photos``, not beside the folder it points to)."""
    input_dir = Path(os.path.abspath(input_dir))  # absolute, ``..`` folded, links kept
    return input_dir.parent / f"{input_dir.name}-purified-{method}"


def check_folders(input_dir: Path, output_dir: Path) -> None:
    """The input exists; input and output are disjoint both ways; the output is a folder whose
    control files are not symlinks (they would be written through)."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_input_folder(input_dir)
    check_output_outside(input_dir, output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise AdvpurifyError(f"output {output_dir} exists and is not a folder")
    for name in CONTROL_FILES:
        path = output_dir / name
        if path.is_symlink():
            raise AdvpurifyError(f"{path} is a symlink: refusing to write through it; remove it")
        if path.exists() and not path.is_file():
            raise AdvpurifyError(
                f"{path} is not a file (the run keeps its {name} there); remove it"
            )
    if not (output_dir / RUN_FILE).is_file() and _labels_images(output_dir / MANIFEST):
        # An attack's record: this run's would be appended to it, and its outputs mixed with
        # the adversarial images (which eval would then score together).
        raise AdvpurifyError(
            f"output folder {output_dir} holds an attack's outputs ({MANIFEST} with labels); "
            "choose another folder"
        )


def _labels_images(manifest: Path) -> bool:
    """Whether ``manifest`` is ``advpurify attack``'s (its records carry labels)."""
    if not manifest.is_file():
        return False
    with open(manifest, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "label" in record:
                return True
    return False


def output_paths(inputs: list[Path], input_dir: Path, output_dir: Path, fmt: str) -> list[Path]:
    """Mirror the input tree; the extension becomes the output format's (``a.jpg`` -> ``a.png``,
    both of ``a.jpg`` and ``a.png`` -> ``a.jpg.png`` and ``a.png.png``: see ``mirror_names``)."""
    relative = [p.relative_to(input_dir) for p in inputs]
    names = mirror_names(relative, OUTPUT_FORMATS[fmt])
    for name, source in zip(names, relative, strict=True):
        if name.parts[0] in CONTROL_FILES:
            raise AdvpurifyError(
                f"input {display_name(source)} would be written to {display_name(name)}, "
                f"inside the run's own {name.parts[0]}: rename it"
            )
    return [output_dir / name for name in names]


def check_finite(config: Any, where: str = "") -> None:
    """Refuse NaN and infinity anywhere in the settings: they fail every image and cannot be
    compared on a resume (NaN != NaN)."""
    if isinstance(config, dict):
        for key, value in config.items():
            check_finite(value, f"{where}.{key}" if where else str(key))
    elif isinstance(config, list | tuple):
        for value in config:
            check_finite(value, where)
    elif isinstance(config, float) and not math.isfinite(config):
        raise AdvpurifyError(f"{where or 'setting'}={config}: must be a finite number")


def check_finite_assignments(items: list[str]) -> None:
    """``-p name=value`` strings: refuse ``nan``/``inf`` before any purifier is built (the
    typed settings check their ranges; NaN passes every range comparison)."""
    for item in items:
        name, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            continue
        if not math.isfinite(number):
            raise AdvpurifyError(f"-p {item}: {name.strip()} must be a finite number")


def run_config(purifier: Purifier, options: PipelineOptions) -> dict[str, Any]:
    """The settings that decide the outputs' bytes: recorded in ``run.json``."""
    config = {
        **purifier.config(),
        "format": options.fmt,
        "quality": options.encode_quality if options.fmt != "png" else None,
        "seed": options.seed,
        "background": options.background,
    }
    check_finite(config)
    return config


OVERWRITING = "overwriting"
"""run.json's mark of an ``--overwrite`` run not yet finished: older outputs are stale."""


def prepare_run_file(output_dir: Path, config: dict[str, Any], overwrite: bool) -> int | None:
    """Record what produced the outputs; a resume with other settings is refused.

    ``--overwrite`` marks ``run.json`` as overwriting until a run finishes every image: a
    resume of an interrupted overwrite then redoes each output older than that ``run.json``
    (made with the previous settings) and keeps the newer ones. Returns that time (ns) while
    an overwrite is unfinished, else None.
    """
    run_file = output_dir / RUN_FILE
    if run_file.exists() and not overwrite:
        try:
            previous = json.loads(run_file.read_text())
        except (OSError, ValueError) as error:
            raise AdvpurifyError(f"{run_file}: unreadable ({error}); use --overwrite") from None
        stored = {k: v for k, v in previous.items() if k not in ("version", OVERWRITING)}
        stored = current_config(stored)  # recorded by an earlier version, in today's form
        refuse_other_settings(output_dir, stored, config)
        if previous.get(OVERWRITING):
            return run_file.stat().st_mtime_ns  # left as it is: the time stays the mark
    write_run_file(output_dir, config, overwriting=overwrite)
    return run_file.stat().st_mtime_ns if overwrite else None


def refuse_foreign_outputs(output_dir: Path, targets: list[Path]) -> None:
    """Without ``run.json`` no earlier run wrote here: a file already at an output path is
    somebody else's, or of unknown settings, and is never taken for a finished output."""
    if (output_dir / RUN_FILE).exists() or set(os.listdir(output_dir)) <= {LOCK_FILE}:
        return  # a new or empty folder: nothing to look for, file by file
    root, inside = output_dir.resolve(), {}
    for target in targets:
        if target.parent not in inside:  # a folder linked out of the output fails per image
            folder = target.parent.resolve()
            inside[target.parent] = folder == root or root in folder.parents
        if inside[target.parent] and os.path.lexists(target):
            raise AdvpurifyError(
                f"output folder {output_dir}: {display_name(target.relative_to(output_dir))} "
                f"is already there and no {RUN_FILE} says which settings made it; "
                "use an empty folder, or --overwrite to replace it"
            )


def write_run_file(output_dir: Path, config: dict[str, Any], overwriting: bool = False) -> None:
    body = dict(config, version=__version__)
    if overwriting:
        body[OVERWRITING] = True
    text = json.dumps(body, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(output_dir / RUN_FILE, text.encode())


def plan_run(
    input_dir: Path | str,
    output_dir: Path | str,
    purifier: Purifier,
    options: PipelineOptions | None = None,
) -> RunPlan:
    """Check everything that can be checked before any image is touched, and lock the output.

    The returned plan holds the output folder's lock: run it (``execute``) or ``close()`` it.
    """
    options = options or PipelineOptions()
    options.check()
    allow_pixels(options.max_image_pixels)  # --max-image-pixels, not Pillow's default, holds
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_folders(input_dir, output_dir)
    config = run_config(purifier, options)
    left_out: list[Path] = []
    inputs = find_images(input_dir, left_out)
    # An attack's or an earlier run's own records are not files the user missed.
    left_out = [p for p in left_out if not (p.parent == input_dir and p.name in CONTROL_FILES)]
    if not inputs:
        others = ""
        if left_out:
            others = (
                f" ({len(left_out)} other files or linked folders, "
                f"e.g. {display_name(left_out[0].name)})"
            )
        raise AdvpurifyError(
            f"input folder {input_dir}: no image files found{others}; "
            f"images are found by extension: {' '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    targets = output_paths(inputs, input_dir, output_dir, options.fmt)
    pairs = [
        (src, dst)
        for k, (src, dst) in enumerate(zip(inputs, targets, strict=True))
        if k % options.shard.count == options.shard.index
    ]
    check_writable_folder(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = OutputLock.acquire(output_dir)
    try:
        if not options.overwrite:
            refuse_foreign_outputs(output_dir, targets)
        stale_before = prepare_run_file(output_dir, config, options.overwrite)
        remove_stale_temporaries(output_dir)
    except BaseException:
        lock.release()
        raise
    return RunPlan(
        input_dir, output_dir, purifier, options, pairs, lock, config, stale_before, left_out
    )
