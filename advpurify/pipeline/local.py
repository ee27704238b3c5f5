"""The local engine: reader threads -> size buckets -> the purifier -> writer threads.

Reader threads decode files (Pillow, OpenCV and libjpeg-turbo release the GIL), the calling
thread groups images of equal size into batches and runs the purifier on the device, writer
threads encode and atomically rename each output into place. Memory is bounded twice: at most
``options.max_in_flight`` decoded images, and at most ``options.pixel_budget`` decoded pixels
(from each file's header, before it is decoded; a larger image runs alone).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from advpurify.files import atomic_write_bytes
from advpurify.images import check_encodable, decode_image_with_profile, encode_image, image_size
from advpurify.pipeline.manifest import (
    Record,
    RunRecorder,
    RunSummary,
    failure_reason,
    is_disk_full,
)
from advpurify.pipeline.plan import PipelineOptions, RunPlan, WorkItem, read_source
from advpurify.purifiers.base import Purifier


class _Budget:
    """Decoded images and pixels in flight. An image is admitted while both stay within their
    limits, or alone when nothing else is in flight (an image above the budget still runs)."""

    def __init__(self, images: int, pixels: int, summary: RunSummary) -> None:
        self.images, self.pixels = images, pixels
        self.held_images = self.held_pixels = 0
        self.summary = summary
        self._changed = threading.Condition()

    def try_take(self, pixels: int) -> bool:
        with self._changed:
            empty = self.held_images == 0
            fits = self.held_pixels + pixels <= self.pixels and self.held_images < self.images
            if not (empty or fits):
                return False
            self.held_images += 1
            self.held_pixels += pixels
            summary = self.summary
            summary.max_in_flight = max(summary.max_in_flight, self.held_images)
            summary.max_pixels_in_flight = max(summary.max_pixels_in_flight, self.held_pixels)
            return True

    def give(self, pixels: int, images: int = 1) -> None:
        with self._changed:
            self.held_images -= images
            self.held_pixels -= pixels
            self._changed.notify_all()

    def wait(self, timeout: float = 0.1) -> None:
        with self._changed:
            self._changed.wait(timeout)


class _BatchRelease:
    """The purified images of a batch are views of one tensor, which lives until the last of
    them is written: their budget is given back then, all at once."""

    def __init__(self, budget: _Budget, items: list[WorkItem]) -> None:
        self.budget, self.count = budget, len(items)
        self.pixels = sum(item.pixels or 0 for item in items)
        self.left = self.count
        self._lock = threading.Lock()

    def one_written(self) -> None:
        with self._lock:
            self.left -= 1
            last = self.left == 0
        if last:
            self.budget.give(self.pixels, self.count)


class LocalRunner:
    """Moves items through reads, size buckets, the purifier and the writers."""

    def __init__(
        self,
        purifier: Purifier,
        options: PipelineOptions,
        recorder: RunRecorder,
        stop: threading.Event,
    ) -> None:
        self.purifier = purifier
        self.options = options
        self.recorder = recorder
        self.stop = stop
        self.budget = _Budget(options.max_in_flight, options.pixel_budget, recorder.summary)
        self.pending: deque[WorkItem] = deque()
        self.reads: deque[tuple[WorkItem, Future[torch.Tensor]]] = deque()
        self.buckets: OrderedDict[tuple[int, int], list[tuple[WorkItem, torch.Tensor]]] = (
            OrderedDict()
        )
        self.buffered = 0
        self.late_untouched = 0  # purified, but not written: the run stopped first
        self._late_lock = threading.Lock()

    # --------------------------------------------------------------------------- outcomes

    def _fail(self, item: WorkItem, reason: str, admitted: bool = True) -> None:
        self.recorder.report(Record(str(item.source), None, "failed", reason=reason))
        if admitted:
            self.budget.give(item.pixels or 0)

    def _halted(self) -> bool:
        return self.stop.is_set() or self.recorder.stopping

    # --------------------------------------------------------------------------- reading

    def _admit(self, item: WorkItem) -> bool | None:
        """Take budget for the next item: True if admitted, False if it must wait, None if it
        failed from its header alone."""
        if item.pixels is None:
            size = image_size(item.source)
            item.pixels = size[0] * size[1] if size else 0
            if item.pixels > self.options.max_image_pixels:
                width, height = size
                self._fail(
                    item,
                    f"refused: {width} x {height} = {item.pixels} pixels is above the "
                    f"per-image limit of {self.options.max_image_pixels} (--max-image-pixels)",
                    admitted=False,
                )
                return None
        return self.budget.try_take(item.pixels)

    def _submit_reads(self, readers: ThreadPoolExecutor) -> None:
        while self.pending and len(self.reads) < self.options.read_ahead:
            admitted = self._admit(self.pending[0])
            if admitted is False:
                return
            item = self.pending.popleft()
            if admitted:
                item.started = time.perf_counter()
                self.reads.append((item, readers.submit(self._read, item)))

    def _read(self, item: WorkItem) -> torch.Tensor:
        options = self.options
        data, item.fingerprint = read_source(item.source, options.max_image_pixels)
        image, item.profile = decode_image_with_profile(
            data, item.source, options.background, options.max_image_pixels
        )
        check_encodable(image.shape[-1], image.shape[-2], options.fmt)  # before it is purified
        return image

    def _collect(self, item: WorkItem, future: Future[torch.Tensor]) -> None:
        try:
            image = future.result()
        except Exception as error:  # noqa: BLE001 - a bad file becomes a record
            self._fail(item, failure_reason(error))
            return
        key = tuple(image.shape[-2:])
        self.buckets.setdefault(key, []).append((item, image))
        self.buffered += 1

    # --------------------------------------------------------------------------- batches

    def _next_batch(self, flush: bool) -> list[tuple[WorkItem, torch.Tensor]] | None:
        """A full bucket; else, with many sizes pending (or ``flush``), the oldest partial."""
        for key, bucket in self.buckets.items():
            if len(bucket) >= self.options.batch_size:
                return self.buckets.pop(key)
        if self.buckets and (flush or self.buffered >= self.options.batch_size):
            return self.buckets.popitem(last=False)[1]
        return None

    def _purify(self, batch: list[tuple[WorkItem, torch.Tensor]], writers) -> None:
        self.buffered -= len(batch)
        items = [item for item, _ in batch]
        try:
            # A batch of one is a view, not a copy: a single huge image is not held twice.
            stacked = batch[0][1][None] if len(batch) == 1 else torch.stack([i for _, i in batch])
            images = stacked.to(self.purifier.device)
            del stacked
            batch.clear()  # the decoded inputs are no longer needed: free them now
            # No no_grad/inference_mode here: DIP and PPGN need autograd inside purify().
            purified = self.purifier(images, [item.seed for item in items]).detach().cpu()
            del images
        except Exception as error:  # noqa: BLE001 - a failed batch fails its images only
            reason = f"purification failed: {type(error).__name__}: {error}"
            for item in items:
                self._fail(item, reason)
            return
        release = _BatchRelease(self.budget, items)
        for item, image in zip(items, purified, strict=True):
            writers.submit(self._write, item, image, release)

    def _write(self, item: WorkItem, image: torch.Tensor, release: _BatchRelease) -> None:
        try:
            if self.recorder.stopping:
                with self._late_lock:
                    self.late_untouched += 1
                return
            data = encode_image(image, self.options.fmt, self.options.encode_quality, item.profile)
            atomic_write_bytes(item.target, data, root=self.recorder.plan.output_dir)
            seconds = round(time.perf_counter() - item.started, 4)
            name = item.target.relative_to(self.recorder.plan.output_dir).as_posix()
            self.recorder.report(
                Record(
                    str(item.source), str(item.target), "done", seconds,
                    name=name, source=item.fingerprint,
                )
            )  # fmt: skip
        except Exception as error:  # noqa: BLE001 - one bad write must not stop the run
            if is_disk_full(error):
                self.recorder.stop(f"disk full writing {item.target} ({error.strerror})")
            self.recorder.report(
                Record(str(item.source), None, "failed", reason=f"write failed: {error}")
            )
        finally:
            del image
            release.one_written()

    # --------------------------------------------------------------------------- the loop

    def run(self, todo: list[WorkItem]) -> int:
        """Purify ``todo``; returns how many images were left untouched by an early stop."""
        self.pending.extend(todo)
        workers = self.options.workers
        with (
            ThreadPoolExecutor(workers, thread_name_prefix="read") as readers,
            ThreadPoolExecutor(workers, thread_name_prefix="write") as writers,
        ):
            while not self._halted():
                self._submit_reads(readers)
                if self.reads:
                    self._collect(*self.reads.popleft())
                    batch = self._next_batch(flush=False)
                elif self.buckets:
                    batch = self._next_batch(flush=True)  # the budget is held by buffered images
                elif self.pending:
                    self.budget.wait()  # the budget is held by the writers
                    continue
                else:
                    break
                if batch:
                    self._submit_reads(readers)  # keep the readers busy while the device works
                    self._purify(batch, writers)
            abandoned = self._abandon() if self._halted() else 0
        # The writers have finished here: what they skipped after the stop is counted too.
        return abandoned + self.late_untouched

    def _abandon(self) -> int:
        """Stop early: cancel reads; what was never written is untouched (not in the manifest;
        a rerun does it)."""
        untouched = len(self.pending) + self.buffered
        for _item, future in self.reads:
            future.cancel()
            untouched += 1
        self.reads.clear()
        self.buckets.clear()
        self.pending.clear()
        return untouched


def execute(
    plan: RunPlan,
    on_progress: Callable[[Record], None] | None = None,
    stop: threading.Event | None = None,
) -> RunSummary:
    """Purify the plan's images; existing outputs are skipped unless ``overwrite``.

    Setting ``stop`` (the CLI does on Ctrl-C) ends the run after the batch on the device:
    every output already started is finished, the rest is left for a rerun.
    """
    stop = stop or threading.Event()
    untouched = 0
    try:
        recorder = RunRecorder(plan, on_progress)
        try:
            todo = recorder.pending()
            runner = LocalRunner(plan.purifier, plan.options, recorder, stop)
            untouched = runner.run(todo)
        finally:
            summary = recorder.finish(untouched)
    finally:
        plan.close()
    summary.interrupted = stop.is_set()
    return summary
