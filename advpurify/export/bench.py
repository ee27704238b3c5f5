"""``advpurify bench``: latency and throughput of models (``--model``) and of purification
methods (``--method``).

Models: per model x backend x batch size x precision. Each configuration runs ``warmup`` untimed
batches first (session start-up, engine build, lazy allocations, ``torch.compile``), then
``iterations`` timed batches; latency is per batch (p50, p95), throughput is images over the
timed wall-clock. The end-to-end figure classifies a folder with decoding and preprocessing
overlapped with inference (``advpurify.evaluation.classify``) and is compared with the same
backend's raw throughput on pre-decoded batches measured in the same run.

Methods (:func:`bench_methods`): per method x device x batch size x image size, on the built-in
photographs (or noise), the same latency figures plus peak memory; with a classifier also the
deployed stage (purifier then classifier) and the classifier alone. Iterative methods are timed
for a stated number of fitting steps. Every option is checked before the first timed call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advpurify.errors import AdvpurifyError
from advpurify.evaluation.report import save_figure
from advpurify.models.registry import get_exportable
from advpurify.purifiers import Purifier, create_purifier, purifier_class
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
    """Seconds per call of ``run(batch)`` after ``warmup`` untimed calls; on a GPU the device is
    synchronised before and after each timed call, so a call pays for its own work only."""
    cuda = batch.is_cuda

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(batch.device)

    for _ in range(warmup):
        run(batch)
    times = []
    for _ in range(iterations):
        sync()
        start = time.perf_counter()
        run(batch)
        sync()
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
    predictions: dict[str, int] = dataclasses.field(default_factory=dict)
    """Top-1 class per classified file (path -> index): what the end-to-end path predicted."""

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
        predictions={
            str(p): int(c) for p, c in zip(result.paths, result.logits.argmax(1), strict=True)
        },
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


# ------------------------------------------------------------------ purification methods

ITERATIVE = {"dip": "iterations", "ppgn": "steps"}
"""Methods whose cost is a number of fitting steps, and the parameter that sets it."""


@dataclasses.dataclass
class MethodBenchResult:
    """One row of ``advpurify bench --method``: a method (or the classifier alone) timed on one
    device, batch size and image size.

    ``stage``: ``purifier`` (the method alone), ``end-to-end`` (method then classifier) or
    ``classifier`` (the classifier alone, on the unpurified images; ``method`` is ``none``).
    ``fit_steps``: the fitting steps each timed call ran (iterative methods); ``steps`` the
    number the figures stand for: equal unless ``extrapolated`` (linear in the step count).
    """

    method: str
    params: dict
    device: str
    batch_size: int
    size: int
    p50_ms: float
    p95_ms: float
    images_per_s: float
    peak_mb: float
    stage: str = "purifier"
    classifier: str | None = None
    backend: str | None = None
    precision: str = "fp32"
    tf32: bool | None = None
    iterations: int = 0
    fit_steps: int | None = None
    steps: int | None = None
    extrapolated: bool = False
    images: str = "samples"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def label(self) -> str:
        if self.stage == "classifier":
            return f"{self.classifier} alone"
        if self.stage == "end-to-end":
            return f"{self.method} + {self.classifier}"
        return self.method

    def describe_steps(self) -> str:
        if self.fit_steps is None:
            return ""
        if self.extrapolated:
            return f"{self.steps} (extrapolated from {self.fit_steps})"
        return f"{self.fit_steps} (timed)"


@dataclasses.dataclass(frozen=True)
class MethodPlan:
    """A method ready to time: its purifier, the parameters shown and its step counts."""

    method: str
    purifier: Purifier
    params: dict
    fit_steps: int | None
    configured_steps: int | None


def machine_info() -> dict:
    """What identifies the machine a result came from (two machines' results never mix)."""
    import os
    import platform
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("torch", "torchvision", "onnxruntime", "onnxruntime-gpu", "tensorrt"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def sample_batch(
    batch_size: int, size: int, *, random: bool = False, seed: int = 0
) -> torch.Tensor:
    """``batch_size x 3 x size x size`` in [0, 1]: the built-in photographs (centre square,
    resized, cycled), or uniform noise with ``random``."""
    if random:
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(batch_size, 3, size, size, generator=gen)
    photos = [_photo_square(name, size) for name in _photo_names()]
    return torch.stack([photos[i % len(photos)] for i in range(batch_size)])


@functools.cache
def _photo_names() -> tuple[str, ...]:
    return tuple(_photos())


@functools.cache
def _photos() -> dict[str, np.ndarray]:
    from advpurify.samples import SKIMAGE_PHOTOS, sample_photos

    try:
        return sample_photos()
    except ImportError:  # no matplotlib (its portrait): scikit-image's bundled photos suffice
        import skimage.data

        photos = {}
        for name in SKIMAGE_PHOTOS:
            array = getattr(skimage.data, name)()
            photos[name] = np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array
        return photos


@functools.cache
def _photo_square(name: str, size: int) -> torch.Tensor:
    array = _photos()[name]
    image = torch.from_numpy(np.array(array)).permute(2, 0, 1).float().div(255)
    height, width = image.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[None, :, top : top + side, left : left + side]
    resized = F.interpolate(
        square, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size
    )
    return resized[0].clamp(0.0, 1.0)


def _random_weight_params(method: str, folder: Path) -> dict[str, Any]:
    """Parameters that give ``method`` random weights of the true shapes (timing needs no
    trained weights, and a GPU machine may have none)."""
    if method == "ppgn":
        return {"weights": "random"}
    if method == "context-encoder":
        from safetensors.torch import save_file

        from advpurify.models.context_encoder import build_generator

        path = folder / "context-encoder-random.safetensors"
        if not path.exists():
            torch.manual_seed(0)
            save_file(build_generator("paper").state_dict(), str(path))
        return {"weights": str(path)}
    return {}


def plan_method(
    method: str,
    values: dict[str, Any],
    device: torch.device,
    *,
    fit_steps: int,
    random_weights: bool,
    folder: Path,
) -> MethodPlan:
    """Build ``method``'s purifier with typed ``values``; an iterative method runs
    ``fit_steps``."""
    values = dict(values)
    if random_weights:
        values = {**_random_weight_params(method, folder), **values}
    shown = create_purifier(method, device="cpu", **values).settings.as_dict()  # validates
    configured = None
    step_param = ITERATIVE.get(method)
    if step_param is not None:
        configured = shown[step_param]
        if method == "dip":  # None means the preset's count
            from advpurify.purifiers.dip import DipSettings

            configured = DipSettings.from_preset(**shown).iterations
        values[step_param] = fit_steps
    purifier = create_purifier(method, device=device, **values)
    return MethodPlan(
        method=method,
        purifier=purifier,
        params={k: v for k, v in shown.items() if v is not None},
        fit_steps=fit_steps if step_param else None,
        configured_steps=configured,
    )


# Bytes per input pixel (per image, 3 channels float32 = 12 bytes) a method's working set takes,
# on top of its weights: generous round figures from the methods' intermediate tensors, used
# only to refuse a configuration that cannot fit before anything is allocated.
_WORKING_FACTOR = {"rescale": 4, "jpeg": 4, "bitdepth": 3, "median": 12, "tvm": 12, "randpad": 6}
_WEIGHTS_MB = {"ppgn": 1000.0, "context-encoder": 250.0}


def estimate_mb(plan: MethodPlan, batch_size: int, size: int) -> float:
    """A rough upper estimate of the memory one timed call needs, in MiB."""
    pixels = batch_size * size * size
    base = pixels * 12 / 2**20  # the input batch itself
    if plan.method == "dip":
        from advpurify.purifiers.dip import DipSettings

        s = DipSettings.from_preset(**plan.params)
        side = -(-size // 2**s.scales) * 2**s.scales
        # Activations saved for backward, about 8 full-resolution layers of `channels` (the
        # lower scales add a third), the noise input and Adam's buffers.
        per_pixel = 4 * (8 * s.channels + 2 * s.input_depth + 12)
        return base + batch_size * side * side * per_pixel / 2**20
    if plan.method == "ppgn":
        return _WEIGHTS_MB["ppgn"] + batch_size * 60.0 + base
    if plan.method == "context-encoder":
        # One 128 x 128 window per image in centre mode; tiled: every hole, in chunks of `batch`.
        per_image = 1 if plan.params.get("mode") == "center" else (size // 28 + 1) ** 2
        windows = min(plan.params.get("batch", 256), batch_size * per_image)
        return _WEIGHTS_MB["context-encoder"] + windows * 12.0 + base * 8
    return base * (1 + _WORKING_FACTOR.get(plan.method, 8))


def available_mb(device: torch.device) -> float:
    """Free memory on ``device`` in MiB (the CPU: MemAvailable; a GPU: free device memory)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free / 2**20
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2**20


class PeakMemory:
    """Peak memory during a block: process RSS on the CPU (sampled every 2 ms by a thread),
    ``torch.cuda.max_memory_allocated`` on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_mb = _rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak_mb = max(self.peak_mb, _rss_mb())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak_mb = max(self.peak_mb, _rss_mb())


def _rss_mb() -> float:
    import os

    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # no /proc: the lifetime peak is the best there is
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def _numerics(device: torch.device, precision: str, tf32: bool | None) -> Iterator[None]:
    """TF32 on or off (None: leave torch's setting) and bf16/fp16 autocast around the call."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    try:
        if precision == "fp32":
            yield
        else:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            with torch.autocast(device.type, dtype=dtype):
                yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


AUTOCAST = ("fp32", "bf16", "fp16")


def bench_methods(
    methods: Sequence[str],
    *,
    params: dict[str, dict[str, Any]] | None = None,
    devices: Sequence[str] = ("cpu",),
    batch_sizes: Sequence[int] = (1, 16),
    sizes: Sequence[int] = (224,),
    classifier: str | None = None,
    backend: str = "torch",
    weights: str | None = None,
    warmup: int = 1,
    iterations: int = 5,
    fit_steps: int = 10,
    extrapolate: bool = False,
    random: bool = False,
    precision: str = "fp32",
    tf32: bool | None = None,
    threads: int | None = None,
    notify: Notify = lambda _m: None,
    on_result: Callable[[MethodBenchResult], None] | None = None,
) -> list[MethodBenchResult]:
    """Time every method x device x batch size x image size (and, with ``classifier``, the
    purifier then the classifier on ``backend``, plus the classifier alone).

    Every option is checked, every purifier built and every configuration's memory estimated
    before the first timed call, so a bad option fails at once. Iterative methods (``dip``,
    ``ppgn``) run ``fit_steps`` steps per call; ``extrapolate`` scales their figures linearly to
    the configured count. ``weights='random'`` gives every network random weights of its true
    shapes (classifier, PPGN, context encoder).
    """
    import tempfile

    from advpurify.devices import resolve_device

    if not methods:
        raise AdvpurifyError("name at least one --method")
    for name, values in (("--batch-size", batch_sizes), ("--size", sizes)):
        if not values or any(v < 1 for v in values):
            raise AdvpurifyError(f"{name} values must be at least 1")
    if min(sizes) < 8:
        raise AdvpurifyError(f"--size {min(sizes)}: images must be at least 8 pixels wide")
    if fit_steps < 1 or iterations < 1 or warmup < 0:
        raise AdvpurifyError("--fit-steps and --iterations must be at least 1, --warmup >= 0")
    if precision not in AUTOCAST:
        raise AdvpurifyError(f"precision {precision!r}: use one of {', '.join(AUTOCAST)}")
    for method in methods:
        purifier_class(method)  # an unknown method fails before anything is built
    params = {m: {} for m in methods} | (params or {})
    targets = [resolve_device(d) for d in devices]
    if precision == "fp16" and any(t.type == "cpu" for t in targets):
        raise AdvpurifyError("fp16 autocast needs a CUDA device")
    random_weights = weights == "random"

    with tempfile.TemporaryDirectory(prefix="advpurify-bench-") as scratch:
        plans = {
            (method, str(device)): plan_method(
                method,
                params.get(method, {}),
                device,
                fit_steps=fit_steps,
                random_weights=random_weights,
                folder=Path(scratch),
            )
            for device in targets
            for method in methods
        }
        for (method, device_name), plan in plans.items():
            device = torch.device(device_name)
            free = available_mb(device)
            for batch_size in batch_sizes:
                for size in sizes:
                    need = estimate_mb(plan, batch_size, size)
                    if need > free:
                        raise AdvpurifyError(
                            f"--batch-size {batch_size} --size {size}: {method} needs about "
                            f"{need / 1024:.1f} GiB, {free / 1024:.1f} GiB free on {device_name}"
                        )
        classifiers = (
            {
                str(device): _classifier_stage(
                    classifier, backend, device, weights, threads, notify
                )
                for device in targets
            }
            if classifier
            else {}
        )

        results: list[MethodBenchResult] = []

        def emit(result: MethodBenchResult) -> None:
            results.append(result)
            if on_result:
                on_result(result)

        images_kind = "random" if random else "samples"
        for device in targets:
            stage = classifiers.get(str(device))
            for size in sizes:
                for batch_size in batch_sizes:
                    images = sample_batch(batch_size, size, random=random).to(device)
                    common = dict(
                        device=str(device), batch_size=batch_size, size=size, images=images_kind
                    )
                    if stage is not None:
                        times, peak = _time(
                            stage.classify, images, device, warmup, iterations, "fp32", None
                        )
                        emit(_summarise_method("none", {}, times, peak, "classifier", stage,
                                               None, False, "fp32", None, **common))  # fmt: skip
                    for method in methods:
                        plan = plans[(method, str(device))]
                        seeds = list(range(batch_size))

                        def purify(x, plan=plan, seeds=seeds):
                            return plan.purifier(x, seeds)

                        times, peak = _time(
                            purify, images, device, warmup, iterations, precision, tf32
                        )
                        emit(_summarise_method(method, plan.params, times, peak, "purifier",
                                               None, plan, extrapolate, precision, tf32,
                                               **common))  # fmt: skip
                        if stage is not None:

                            def deployed(x, purify=purify, stage=stage):
                                return stage.classify(purify(x))

                            times, peak = _time(
                                deployed, images, device, warmup, iterations, precision, tf32
                            )
                            emit(_summarise_method(method, plan.params, times, peak,
                                                   "end-to-end", stage, plan, extrapolate,
                                                   precision, tf32, **common))  # fmt: skip
                    notify(f"done: batch {batch_size}, size {size} on {device}")
    return results


@dataclasses.dataclass
class _ClassifierStage:
    name: str
    backend: Backend
    module: nn.Module

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        prepare = getattr(self.module, "prepare", None)
        return self.backend.run(prepare(images) if prepare else images)


def _classifier_stage(
    name: str,
    backend: str,
    device: torch.device,
    weights: str | None,
    threads: int | None,
    notify: Notify,
) -> _ClassifierStage:
    from advpurify.models.classifiers import build_classifier

    module = build_classifier(name, weights=weights)
    size = module.input_size
    built = create_backend(
        backend,
        module,
        device=str(device),
        sample_shape=(3, size, size),
        threads=threads,
        label=name,
        notify=notify,
    )
    if torch.device(built.device).type != device.type:
        raise AdvpurifyError(
            f"--backend {built.name} runs on {built.device}, not on --device {device}: "
            f"the purifier and the classifier must share a device"
        )
    return _ClassifierStage(name=name, backend=built, module=module.to(device))


def _time(
    run: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    device: torch.device,
    warmup: int,
    iterations: int,
    precision: str,
    tf32: bool | None,
) -> tuple[list[float], float]:
    def call(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), _numerics(device, precision, tf32):
            return run(batch)

    for _ in range(warmup):
        call(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    with PeakMemory(device) as peak:
        times = time_batches(call, images, warmup=0, iterations=iterations)
    return times, peak.peak_mb


def _summarise_method(
    method: str,
    params: dict,
    times: Sequence[float],
    peak_mb: float,
    stage: str,
    classifier: _ClassifierStage | None,
    plan: MethodPlan | None,
    extrapolate: bool,
    precision: str,
    tf32: bool | None,
    **common,
) -> MethodBenchResult:
    ms = np.asarray(times) * 1000.0
    fit_steps = plan.fit_steps if plan else None
    steps, scale = fit_steps, 1.0
    if extrapolate and plan is not None and plan.fit_steps and plan.configured_steps:
        steps, scale = plan.configured_steps, plan.configured_steps / plan.fit_steps
    ms = ms * scale
    return MethodBenchResult(
        method=method,
        params=params,
        p50_ms=float(np.percentile(ms, 50)),
        p95_ms=float(np.percentile(ms, 95)),
        images_per_s=float(common["batch_size"] * len(ms) / (ms.sum() / 1000.0)),
        peak_mb=round(peak_mb, 1),
        stage=stage,
        classifier=classifier.name if classifier else None,
        backend=classifier.backend.name if classifier else None,
        precision=precision,
        tf32=tf32,
        iterations=len(ms),
        fit_steps=fit_steps,
        steps=steps,
        extrapolated=scale != 1.0,
        **common,
    )


def write_json(path: Path | str, rows: Sequence[dict], settings: dict | None = None) -> None:
    """The bench JSON file: a header naming the machine, then one row per configuration."""
    from advpurify.files import atomic_write_bytes

    payload = {"machine": machine_info(), "settings": settings or {}, "results": list(rows)}
    atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())


def plot_methods(results: Sequence[MethodBenchResult], path: Path | str, title: str = "") -> None:
    """Images/s against batch size, one panel per method (and stage), one line per size and
    device; log axes."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    panels: dict[str, list[MethodBenchResult]] = {}
    for r in results:
        panels.setdefault(r.label, []).append(r)
    if not panels:
        raise AdvpurifyError("nothing to plot")
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(3.6 * columns, 3.0 * rows), squeeze=False, sharex=True
    )
    for ax, (label, group) in zip(axes.flat, panels.items(), strict=False):
        lines: dict[tuple[int, str], list[MethodBenchResult]] = {}
        for r in group:
            lines.setdefault((r.size, r.device), []).append(r)
        for (size, device), points in sorted(lines.items()):
            points.sort(key=lambda r: r.batch_size)
            ax.plot(
                [p.batch_size for p in points],
                [p.images_per_s for p in points],
                marker="o",
                label=f"{size} px, {device}",
            )
        steps = group[0].describe_steps()
        ax.set_title(label + (f"\n{steps} steps" if steps else ""), fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("batch size")
    for ax in axes[:, 0]:
        ax.set_ylabel("images/s")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, Path(path), dpi=110)
