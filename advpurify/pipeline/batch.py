"""The batch pipeline: read -> batch -> purify -> write, with bounded queues and resume.

Reader threads decode files (Pillow and OpenCV release the GIL), the calling thread groups
images of equal size into batches and runs the purifier on the device, writer threads encode
and atomically rename each output into place. At most ``max_in_flight`` images exist in memory
at any moment, however large the folder is. Every image ends in ``manifest.jsonl`` as done,
skipped (its output already existed: resume) or failed (with the reason).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from advpurify import __version__
from advpurify.errors import AdvpurifyError
from advpurify.files import atomic_write_bytes, check_output_outside, remove_stale_temporaries
from advpurify.images import OUTPUT_FORMATS, encode_image, find_images, load_image
from advpurify.purifiers.base import Purifier, image_seed

MANIFEST = "manifest.jsonl"
RUN_FILE = "run.json"


@dataclasses.dataclass(frozen=True)
class Shard:
    """Image ``k`` belongs to shard ``index`` of ``count`` when ``k % count == index``."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise AdvpurifyError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
        if count < 1 or not 0 <= index < count:
            raise AdvpurifyError(f"--shard {text!r}: need 0 <= i < n")
        return cls(index, count)


@dataclasses.dataclass
class PipelineOptions:
    batch_size: int = 16
    workers: int = 2
    fmt: str = "png"
    quality: int = 95
    seed: int = 0
    overwrite: bool = False
    shard: Shard = Shard()
    background: str = "white"

    def check(self) -> None:
        if self.batch_size < 1:
            raise AdvpurifyError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.workers < 1:
            raise AdvpurifyError(f"--workers {self.workers}: must be at least 1")
        if self.fmt not in OUTPUT_FORMATS:
            raise AdvpurifyError(f"--format {self.fmt!r}: use one of {', '.join(OUTPUT_FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise AdvpurifyError(f"--quality {self.quality}: must be in 1..100")


@dataclasses.dataclass
class Record:
    input: str
    output: str | None
    status: str  # done | skipped | failed
    seconds: float = 0.0
    reason: str | None = None


@dataclasses.dataclass
class RunSummary:
    output_dir: Path
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    failures: list[Record] = dataclasses.field(default_factory=list)
    max_in_flight: int = 0  # the most decoded images held at once (memory bound)

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 2 if self.failed else 0


def default_output_dir(input_dir: Path, method: str) -> Path:
    """A sibling of the input folder: ``photos`` -> ``photos-purified-rescale``."""
    input_dir = Path(input_dir).resolve()
    return input_dir.parent / f"{input_dir.name}-purified-{method}"


def check_folders(input_dir: Path, output_dir: Path) -> None:
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.exists():
        raise AdvpurifyError(f"input folder {input_dir} does not exist")
    if not input_dir.is_dir():
        raise AdvpurifyError(f"input {input_dir} is not a folder")
    check_output_outside(input_dir, output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise AdvpurifyError(f"output {output_dir} exists and is not a folder")


def output_paths(inputs: list[Path], input_dir: Path, output_dir: Path, fmt: str) -> list[Path]:
    """Mirror the input tree; the extension becomes the output format's.

    Where two inputs would land on one output (``a.jpg`` and ``a.png``), both keep their
    original extension in front of the new one (``a.jpg.png``, ``a.png.png``).
    """
    ext = OUTPUT_FORMATS[fmt]
    relative = [p.relative_to(input_dir) for p in inputs]
    plain = [r.with_suffix(ext) for r in relative]
    counts: dict[Path, int] = {}
    for p in plain:
        counts[p] = counts.get(p, 0) + 1
    return [
        output_dir / (r.parent / (r.name + ext) if counts[p] > 1 else p)
        for r, p in zip(relative, plain, strict=True)
    ]


def prepare_run_file(output_dir: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Record what produced the outputs; a resume with other settings is refused."""
    run_file = output_dir / RUN_FILE
    if run_file.exists() and not overwrite:
        try:
            previous = json.loads(run_file.read_text())
        except (OSError, ValueError) as error:
            raise AdvpurifyError(f"{run_file}: unreadable ({error}); use --overwrite") from None
        old = {k: previous.get(k) for k in config}
        if old != config:
            changed = ", ".join(
                f"{k}: {old.get(k)!r} -> {config[k]!r}" for k in config if old.get(k) != config[k]
            )
            raise AdvpurifyError(
                f"{output_dir} holds outputs made with other settings ({changed}); "
                "use --overwrite to redo them, or another output folder"
            )
    body = dict(config, version=__version__)
    atomic_write_bytes(run_file, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())


class _Manifest:
    """Appends one JSON line per image; a single write per line keeps lines whole."""

    def __init__(self, path: Path, truncate: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
        self._fd = os.open(path, flags, 0o644)
        self._lock = threading.Lock()

    def add(self, record: Record) -> None:
        line = json.dumps(dataclasses.asdict(record), sort_keys=True) + "\n"
        with self._lock:
            os.write(self._fd, line.encode("utf-8"))

    def close(self) -> None:
        os.close(self._fd)


@dataclasses.dataclass
class _Item:
    source: Path
    target: Path
    seed: int
    image: torch.Tensor | None = None
    started: float = 0.0


@dataclasses.dataclass
class RunPlan:
    """A checked run: settings recorded in ``run.json``, the images of this shard listed."""

    input_dir: Path
    output_dir: Path
    purifier: Purifier
    options: PipelineOptions
    pairs: list[tuple[Path, Path]]  # (input file, output file)


def plan_run(
    input_dir: Path | str,
    output_dir: Path | str,
    purifier: Purifier,
    options: PipelineOptions | None = None,
) -> RunPlan:
    """Check everything that can be checked before any image is touched."""
    options = options or PipelineOptions()
    options.check()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_folders(input_dir, output_dir)
    inputs = find_images(input_dir)
    targets = output_paths(inputs, input_dir, output_dir, options.fmt)
    pairs = [
        (src, dst)
        for k, (src, dst) in enumerate(zip(inputs, targets, strict=True))
        if k % options.shard.count == options.shard.index
    ]
    output_dir.mkdir(parents=True, exist_ok=True)
    config = {
        **purifier.config(),
        "format": options.fmt,
        "quality": options.quality if options.fmt != "png" else None,
        "seed": options.seed,
        "background": options.background,
    }
    prepare_run_file(output_dir, config, options.overwrite)
    remove_stale_temporaries(output_dir)
    return RunPlan(input_dir, output_dir, purifier, options, pairs)


class RunRecorder:
    """Where every image's record goes: ``manifest.jsonl``, the summary and the progress
    callback. Shared by the engines (local threads here, Ray in ``ray_engine``)."""

    def __init__(self, plan: RunPlan, on_progress: Callable[[Record], None] | None) -> None:
        self.plan = plan
        self.summary = RunSummary(output_dir=plan.output_dir)
        self._manifest = _Manifest(plan.output_dir / MANIFEST, truncate=plan.options.overwrite)
        self._on_progress = on_progress
        self._started = time.perf_counter()
        self._lock = threading.Lock()

    def report(self, record: Record) -> None:
        self._manifest.add(record)
        summary = self.summary
        with self._lock:  # the local engine's writers report from their own threads
            if record.status == "done":
                summary.done += 1
            elif record.status == "skipped":
                summary.skipped += 1
            else:
                summary.failed += 1
                summary.failures.append(record)
            if self._on_progress:
                self._on_progress(record)

    def pending(self) -> list[_Item]:
        """The plan's images still to purify; finished outputs are reported as skipped."""
        options, todo = self.plan.options, []
        for src, dst in self.plan.pairs:
            if dst.exists() and not options.overwrite:
                self.report(Record(str(src), str(dst), "skipped"))
            else:
                rel = src.relative_to(self.plan.input_dir).as_posix()
                todo.append(_Item(src, dst, image_seed(options.seed, rel)))
        return todo

    def finish(self) -> RunSummary:
        self._manifest.close()
        self.summary.seconds = time.perf_counter() - self._started
        return self.summary


def failure_reason(error: BaseException) -> str:
    """The manifest's reason for an image that could not be read."""
    return getattr(error, "reason", None) or f"{type(error).__name__}: {error}"


def execute(plan: RunPlan, on_progress: Callable[[Record], None] | None = None) -> RunSummary:
    """Purify the plan's images; existing outputs are skipped unless ``overwrite``."""
    recorder = RunRecorder(plan, on_progress)
    try:
        todo = recorder.pending()
        _BatchRunner(plan.purifier, plan.options, recorder.report, recorder.summary).run(todo)
    finally:
        summary = recorder.finish()
    return summary


def run_pipeline(
    input_dir: Path | str,
    output_dir: Path | str,
    purifier: Purifier,
    options: PipelineOptions | None = None,
    on_progress: Callable[[Record], None] | None = None,
) -> RunSummary:
    """Purify every image under ``input_dir`` into ``output_dir``; see the module doc."""
    return execute(plan_run(input_dir, output_dir, purifier, options), on_progress)


class _BatchRunner:
    """Moves decoded images through size buckets, the purifier and the writers.

    Every decoded image holds one slot of a semaphore from the moment its read is submitted
    until its output is written (or it fails), so memory is bounded by ``max_in_flight``.
    """

    def __init__(
        self,
        purifier: Purifier,
        options: PipelineOptions,
        report: Callable[[Record], None],
        summary: RunSummary,
    ) -> None:
        self.purifier = purifier
        self.options = options
        self.report = report
        self.summary = summary
        self.read_ahead = 2 * options.workers
        # Reads ahead + partial batches (< batch_size before a flush) + one batch on the device
        # + what the writers still hold.
        self.max_in_flight = self.read_ahead + 2 * options.batch_size + 2 * options.workers
        self._slots = threading.Semaphore(self.max_in_flight)
        self._held = 0
        self._lock = threading.Lock()

    def _take(self) -> None:
        self._slots.acquire()
        with self._lock:
            self._held += 1
            self.summary.max_in_flight = max(self.summary.max_in_flight, self._held)

    def _give(self, count: int = 1) -> None:
        with self._lock:
            self._held -= count
        for _ in range(count):
            self._slots.release()

    def _read(self, item: _Item) -> _Item:
        item.started = time.perf_counter()
        item.image = load_image(item.source, self.options.background)
        return item

    def _write(self, item: _Item, image: torch.Tensor) -> None:
        try:
            data = encode_image(image, self.options.fmt, self.options.quality)
            atomic_write_bytes(item.target, data)
            seconds = round(time.perf_counter() - item.started, 4)
            self.report(Record(str(item.source), str(item.target), "done", seconds))
        except Exception as error:  # noqa: BLE001 - one bad write must not stop the run
            self.report(Record(str(item.source), None, "failed", reason=f"write failed: {error}"))
        finally:
            self._give()

    def run(self, todo: list[_Item]) -> None:
        options = self.options
        with (
            ThreadPoolExecutor(options.workers, thread_name_prefix="read") as readers,
            ThreadPoolExecutor(options.workers, thread_name_prefix="write") as self.writers,
        ):
            queue: deque[tuple[_Item, Future[_Item]]] = deque()
            upcoming = iter(todo)

            def submit_next() -> None:
                item = next(upcoming, None)
                if item is not None:
                    self._take()
                    queue.append((item, readers.submit(self._read, item)))

            for _ in range(self.read_ahead):
                submit_next()
            buckets: OrderedDict[tuple[int, int], list[_Item]] = OrderedDict()
            pending = 0
            while queue:
                item, future = queue.popleft()
                submit_next()
                try:
                    future.result()
                except Exception as error:  # noqa: BLE001 - a bad file becomes a record
                    self._give()
                    reason = failure_reason(error)
                    self.report(Record(str(item.source), None, "failed", reason=reason))
                    continue
                key = tuple(item.image.shape[-2:])
                buckets.setdefault(key, []).append(item)
                pending += 1
                if len(buckets[key]) >= options.batch_size:
                    batch = buckets.pop(key)
                elif pending >= options.batch_size:
                    # Many distinct sizes: purify the oldest partial batch rather than hoard.
                    batch = buckets.popitem(last=False)[1]
                else:
                    continue
                pending -= len(batch)
                self._purify(batch)
            for batch in buckets.values():
                self._purify(batch)

    def _purify(self, batch: list[_Item]) -> None:
        try:
            images = torch.stack([item.image for item in batch]).to(self.purifier.device)
            # No no_grad/inference_mode here: DIP and PPGN need autograd inside purify().
            purified = self.purifier(images, [item.seed for item in batch]).detach().cpu()
        except Exception as error:  # noqa: BLE001 - a failed batch fails its images only
            reason = f"purification failed: {type(error).__name__}: {error}"
            for item in batch:
                self.report(Record(str(item.source), None, "failed", reason=reason))
            self._give(len(batch))
            return
        for item, image in zip(batch, purified, strict=True):
            item.image = None  # the decoded input is no longer needed
            self.writers.submit(self._write, item, image)
