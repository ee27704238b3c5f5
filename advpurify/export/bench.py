"""``advpurify bench``: latency and throughput per model x backend x batch size x precision.

Each configuration runs ``warmup`` untimed batches first (session start-up, engine build, lazy
allocations, ``torch.compile``), then ``iterations`` timed batches; latency is per batch (p50,
p95), throughput is images over the timed wall-clock. The end-to-end figure classifies a folder
with decoding and preprocessing overlapped with inference (``advpurify.evaluation.classify``) and is
compared with the same backend's raw throughput on pre-decoded batches measured in the same run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from advpurify.errors import AdvpurifyError
from advpurify.models.registry import get_exportable
from advpurify.runtime.backends import Backend, create_backend

Notify = Callable[[str], None]


@dataclasses.dataclass
class BenchResult:
    model: str
    backend: str
    batch_size: int
    precision: str
    p50_ms: float
    p95_ms: float
    images_per_s: float
    device: str = "cpu"
    iterations: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def time_batches(
    run: Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    *,
    warmup: int = 3,
    iterations: int = 20,
) -> list[float]:
    """Seconds per call of ``run(batch)`` after ``warmup`` untimed calls (GPU work awaited)."""
    cuda = batch.is_cuda

    def call() -> None:
        run(batch)
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        call()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def summarise(model: str, backend: Backend, batch_size: int, times: Sequence[float]) -> BenchResult:
    ms = np.asarray(times) * 1000.0
    return BenchResult(
        model=model,
        backend=backend.name,
        batch_size=batch_size,
        precision=backend.precision,
        p50_ms=float(np.percentile(ms, 50)),
        p95_ms=float(np.percentile(ms, 95)),
        images_per_s=float(batch_size * len(ms) / (ms.sum() / 1000.0)),
        device=backend.device,
        iterations=len(ms),
    )


def bench(
    models: Sequence[str],
    backends: Sequence[str],
    batch_sizes: Sequence[int],
    precisions: Sequence[str] = ("fp32",),
    *,
    weights: str | None = None,
    warmup: int = 3,
    iterations: int = 20,
    threads: int | None = None,
    notify: Notify = lambda _m: None,
    on_result: Callable[[BenchResult], None] | None = None,
) -> list[BenchResult]:
    """Time every combination; an explicitly named backend that cannot run here is an error."""
    if any(b < 1 for b in batch_sizes):
        raise AdvpurifyError("batch sizes must be at least 1")
    results: list[BenchResult] = []
    for model in models:
        entry = get_exportable(model)
        module = entry.build(weights)
        gen = torch.Generator().manual_seed(0)
        low, high = entry.input_range
        for backend_name in backends:
            for precision in precisions:
                backend = create_backend(
                    backend_name,
                    module,
                    precision=precision,
                    sample_shape=entry.sample_shape,
                    threads=threads,
                    label=model,
                    notify=notify,
                    max_batch=max(128, *batch_sizes),
                )
                device = torch.device(backend.device)
                for batch_size in batch_sizes:
                    batch = low + (high - low) * torch.rand(
                        batch_size, *entry.sample_shape, generator=gen
                    )
                    times = time_batches(
                        backend.run, batch.to(device), warmup=warmup, iterations=iterations
                    )
                    result = summarise(model, backend, batch_size, times)
                    results.append(result)
                    if on_result:
                        on_result(result)
    return results


@dataclasses.dataclass
class EvalBench:
    model: str
    backend: str
    batch_size: int
    images: int
    failures: int
    eval_images_per_s: float
    raw_images_per_s: float
    top1: float | None

    @property
    def ratio(self) -> float:
        return self.eval_images_per_s / self.raw_images_per_s

    def to_json(self) -> dict:
        """The bench JSON row shape (``backend`` marked end-to-end), plus the raw comparison."""
        return {
            "model": self.model,
            "backend": f"{self.backend} end-to-end",
            "batch_size": self.batch_size,
            "precision": "fp32",
            "p50_ms": None,
            "p95_ms": None,
            "images_per_s": self.eval_images_per_s,
            "raw_images_per_s": self.raw_images_per_s,
            "ratio": self.ratio,
            "images": self.images,
            "failures": self.failures,
            "top1": self.top1,
        }


def bench_eval(
    folder: Path | str,
    model: str = "googlenet",
    backend: str = "ort-cpu",
    *,
    batch_size: int = 16,
    workers: int = 2,
    weights: str | None = None,
    threads: int | None = None,
    repeats: int = 3,
    notify: Notify = lambda _m: None,
) -> EvalBench:
    """End-to-end classification of ``folder`` vs raw inference on the same images.

    Both are measured ``repeats`` times, interleaved, and the best of each is kept, so a burst of
    load from other processes does not decide the ratio. Top-1 uses the WordNet id in each file
    name where there is one.
    """
    from advpurify.evaluation.classify import Preprocess, classify_paths, iter_batches
    from advpurify.images import find_images

    paths = find_images(folder)
    if not paths:
        raise AdvpurifyError(f"{folder}: no images found")
    module = get_exportable(model).build(weights)
    prepare = Preprocess.of(module)
    run = create_backend(
        backend,
        module,
        sample_shape=(3, prepare.crop_size, prepare.crop_size),
        threads=threads,
        label=model,
        notify=notify,
    )
    batches = [b.images for b in iter_batches(paths, prepare, batch_size, workers)]
    for images in batches[:2]:
        run(images)  # warm-up: sessions, first-batch allocations
    best_eval, best_raw, result = float("inf"), float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        for images in batches:
            run(images)
        best_raw = min(best_raw, time.perf_counter() - start)
        outcome = classify_paths(paths, run, prepare, batch_size=batch_size, workers=workers)
        if outcome.seconds < best_eval:
            best_eval, result = outcome.seconds, outcome
    assert result is not None
    count = sum(b.shape[0] for b in batches)
    return EvalBench(
        model=model,
        backend=run.name,
        batch_size=batch_size,
        images=len(result.paths),
        failures=len(result.failures),
        eval_images_per_s=len(result.paths) / best_eval,
        raw_images_per_s=count / best_raw,
        top1=_top1(result.paths, result.logits),
    )


def _top1(paths: Sequence[Path], logits: torch.Tensor) -> float | None:
    from advpurify.models.imagenet import WNID_PATTERN, wnid_to_index

    index = wnid_to_index()
    labels = []
    for path in paths:
        match = WNID_PATTERN.match(path.name)
        if not match or match.group(0) not in index:
            return None
        labels.append(index[match.group(0)])
    if not labels:
        return None
    return float((logits.argmax(1) == torch.tensor(labels)).float().mean())
