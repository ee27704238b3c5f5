"""Where every image's outcome goes: ``manifest.jsonl`` (one whole JSON line per image), the
run's summary and the progress callback. Shared by the engines (local threads, Ray).

File names are kept losslessly: a name that is not valid UTF-8 is held by Python with
surrogate escapes, which JSON writes as ``\\udcXX`` (``os.fsencode(json.loads(line)["input"])``
gives back the original bytes).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from advpurify.errors import AdvpurifyError
from advpurify.files import display_name
from advpurify.pipeline.plan import MANIFEST, RunPlan, WorkItem, current_source, not_newer
from advpurify.purifiers.base import image_seed

# A full disk or an exhausted quota: every later write would fail the same way.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class ManifestError(AdvpurifyError):
    """``manifest.jsonl`` could not be written: the run stops rather than lose records."""


@dataclasses.dataclass
class Record:
    input: str
    output: str | None
    status: str  # done | skipped | failed
    seconds: float = 0.0
    reason: str | None = None
    name: str | None = None  # a done output's path inside the output folder
    source: dict[str, Any] | None = None  # what it was made from (plan.read_source)


@dataclasses.dataclass
class RunSummary:
    output_dir: Path
    planned: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    untouched: int = 0  # never attempted: the run stopped first (interrupt, full disk)
    seconds: float = 0.0
    failures: list[Record] = dataclasses.field(default_factory=list)
    max_in_flight: int = 0  # the most decoded images held at once (memory bound)
    max_pixels_in_flight: int = 0  # the most decoded pixels held at once
    stopped: str | None = None  # why the run stopped early, if it did
    interrupted: bool = False

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        if self.stopped:
            return 1
        return 2 if self.failed else 0


def failure_reason(error: BaseException) -> str:
    """The manifest's reason for an image that could not be read."""
    return getattr(error, "reason", None) or f"{type(error).__name__}: {error}"


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL


class ManifestWriter:
    """Appends one JSON line per image with a single write; a write that fails or comes out
    short is cut back to the last whole line and retried, so the file only ever holds whole
    lines. A half line left by an older crash is cut off on open."""

    RETRIES = 3

    def __init__(self, path: Path, truncate: bool) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
        try:
            self._fd = os.open(path, flags | (os.O_TRUNC if truncate else 0), 0o644)
        except OSError as error:
            raise ManifestError(f"{path}: cannot open ({error.strerror or error})") from None
        self.path = path
        self._lock = threading.Lock()
        self._cut_partial_line()

    def _cut_partial_line(self) -> None:
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        tail = os.pread(self._fd, min(size, 1 << 16), max(0, size - (1 << 16)))
        if tail.endswith(b"\n"):
            return
        newline = tail.rfind(b"\n")
        keep = size - len(tail) + newline + 1 if newline >= 0 else 0
        os.ftruncate(self._fd, keep)

    def add(self, record: Record) -> None:
        line = (json.dumps(dataclasses.asdict(record), sort_keys=True) + "\n").encode("ascii")
        with self._lock:
            last: OSError | None = None
            for attempt in range(self.RETRIES):
                size = os.fstat(self._fd).st_size
                try:
                    if os.write(self._fd, line) == len(line):
                        return
                    last = OSError(errno.ENOSPC, "short write")
                except OSError as error:
                    last = error
                os.ftruncate(self._fd, size)  # never leave half a line
                time.sleep(0.05 * (attempt + 1))
            reason = last.strerror if last is not None and last.strerror else last
            raise ManifestError(
                f"{self.path}: cannot record {display_name(record.input)} ({reason})"
            )

    def close(self) -> None:
        os.close(self._fd)


_MADE = ("done", "skipped")  # records that say what an existing output was made from


def recorded_sources(manifest: Path) -> dict[str, dict[str, Any]]:
    """``{output name: fingerprint of its input}`` from an earlier run's records (the latest
    wins; records from before fingerprints were kept have none)."""
    found: dict[str, dict[str, Any]] = {}
    try:
        with open(manifest, encoding="utf-8", errors="surrogateescape") as lines:
            for line in lines:
                if '"source": {' not in line:
                    continue  # most lines of a long-resumed run: no need to parse them
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(record, dict) or record.get("status") not in _MADE:
                    continue
                name, source = record.get("name"), record.get("source")
                if isinstance(name, str) and isinstance(source, dict):
                    found[name] = source
    except FileNotFoundError:
        pass
    return found


class RunRecorder:
    """Counts every record into the summary, writes it to the manifest, tells the progress
    callback. Thread-safe (the local engine's writers report from their own threads)."""

    def __init__(self, plan: RunPlan, on_progress: Callable[[Record], None] | None) -> None:
        self.plan = plan
        self.summary = RunSummary(output_dir=plan.output_dir, planned=len(plan.pairs))
        # One shard's --overwrite must not erase the other shards' records from the manifest
        # they share: then later records win instead.
        truncate = plan.options.overwrite and plan.options.shard.count == 1
        self._manifest = ManifestWriter(plan.output_dir / MANIFEST, truncate)
        self._on_progress = on_progress
        self._started = time.perf_counter()
        self._lock = threading.Lock()

    def report(self, record: Record) -> None:
        """Count and record one image; a manifest that cannot be written stops the run."""
        summary = self.summary
        with self._lock:
            if record.status == "done":
                summary.done += 1
            elif record.status == "skipped":
                summary.skipped += 1
            else:
                summary.failed += 1
                summary.failures.append(record)
        try:
            self._manifest.add(record)
        except ManifestError as error:
            self.stop(str(error))
        if self._on_progress:
            self._on_progress(record)

    def stop(self, reason: str) -> None:
        with self._lock:
            self.summary.stopped = self.summary.stopped or reason

    @property
    def stopping(self) -> bool:
        return self.summary.stopped is not None

    def pending(self) -> list[WorkItem]:
        """The plan's images still to purify; finished outputs are reported as skipped, and an
        output whose folder leads out of the output folder (a symlink) fails."""
        plan, todo = self.plan, []
        root = plan.output_dir.resolve()
        made_from = {} if plan.options.overwrite else recorded_sources(self._manifest.path)
        for src, dst in plan.pairs:
            folder = dst.parent.resolve()
            name = dst.relative_to(plan.output_dir).as_posix()
            if folder != root and root not in folder.parents:
                reason = f"output folder {dst.parent} leads outside {plan.output_dir} (a symlink)"
                self.report(Record(str(src), None, "failed", reason=reason))
                continue
            # An input replaced since its output was made (a new attack, say) is redone.
            recorded, done = made_from.get(name), plan.is_done(dst)
            current = current_source(src, recorded) if done and recorded else None
            if current is not None or (done and not recorded and not_newer(src, dst)):
                # Today's fingerprint goes on: a copied input is hashed once, not every resume.
                self.report(Record(str(src), str(dst), "skipped", name=name, source=current))
            else:
                rel = src.relative_to(plan.input_dir).as_posix()
                todo.append(WorkItem(src, dst, image_seed(plan.options.seed, rel)))
        return todo

    def finish(self, untouched: int = 0) -> RunSummary:
        self._manifest.close()
        summary = self.summary
        if not (untouched or summary.failed or summary.stopped):
            # An overwrite is finished only when every image was redone; until then a resume
            # redoes the outputs older than it (failed ones keep their old output meanwhile).
            self.plan.finish_overwrite()
        self.summary.untouched = untouched
        self.summary.seconds = time.perf_counter() - self._started
        return self.summary
