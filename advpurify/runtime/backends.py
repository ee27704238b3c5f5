"""Run a feed-forward network on torch, ONNX Runtime or TensorRT behind one interface.

A :class:`Backend` is a runner in Polygraphy's sense: ``activate()`` acquires what it runs on
(device copy, compiled function, sessions, engines, CUDA streams), ``run(batch) -> outputs``
takes a float32 batch and returns float32 outputs on the batch's device, ``deactivate()`` lets
them go; ``with backend:`` does both. :func:`create_backend` returns it active. Each backend has
a ``name``, a ``device`` and a ``precision`` (``runtime.precision`` says what fp32/fp16 mean).

- ``torch``: eager (``torch-compile``: through ``torch.compile``, one graph for every batch
  size above 1); the only one with gradients, used here in inference mode.
- ``ort-cpu`` / ``ort-cuda`` / ``ort-trt``: ONNX Runtime with the CPU, CUDA or TensorRT
  execution provider (``runtime.ort``: own CUDA stream, I/O binding, engine cache per file).
- ``tensorrt``: an engine built from the ONNX graph (``runtime.tensorrt``), or a user's engine.
- ``auto``: the fastest one usable for the device, in ``AUTO_ORDER``; it says its choice and
  falls back to the next when one cannot be built or activated.

An explicit backend that cannot run here raises :class:`BackendError` naming what is missing;
nothing silently falls back. A backend built from an ``nn.Module`` exports it to ONNX on first
sight of each input shape (cached on disk by content hash: ``runtime.onnx_cache``) and checks
the result on its own provider against the module before using it.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from advpurify.devices import resolve_device
from advpurify.errors import AdvpurifyError, first_line
from advpurify.runtime.installed import (
    AUTO_ORDER,
    PRECISIONS,
    BackendError,
    canonical,
    require,
    unavailable_reason,
)
from advpurify.runtime.onnx_cache import cached_onnx
from advpurify.runtime.ort import binding_runner, cpu_runner, ort_session
from advpurify.runtime.parity import compare
from advpurify.runtime.precision import cudnn_benchmark, ieee_fp32, to_half
from advpurify.runtime.streams import StreamOrder
from advpurify.runtime.tensorrt import ENGINE_SUFFIXES, EngineRunner, cached_engine

Notify = Callable[[str], None]
Runner = Callable[[torch.Tensor], torch.Tensor]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _quiet(_message: str) -> None:
    pass


# ---------------------------------------------------------------- the interface


class Backend:
    """``activate()``, ``run(batch) -> outputs``, ``deactivate()``; float32 in and out."""

    name: str = ""
    device: str = "cpu"
    precision: str = "fp32"
    _active: bool = False

    @property
    def is_active(self) -> bool:
        return self._active

    def activate(self) -> Backend:
        """Acquire what the backend runs on (idempotent); returns the backend."""
        if not self._active:
            self._activate()
            self._active = True
        return self

    def deactivate(self) -> None:
        """Release it; ``run`` refuses until the next ``activate``."""
        if self._active:
            self._active = False
            self._deactivate()

    def __enter__(self) -> Backend:
        return self.activate()

    def __exit__(self, *exc_info) -> None:
        self.deactivate()

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        if not self._active:
            raise BackendError(
                f"backend {self.name}: not active (call activate(), or use it in a with block)"
            )
        return self._run(batch)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.run(batch)

    def describe(self) -> str:
        return f"{self.name} ({self.device}, {self.precision})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"

    def _activate(self) -> None:
        pass

    def _deactivate(self) -> None:
        pass

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TorchBackend(Backend):
    """Eager torch, or ``torch.compile`` (``compile=True``); inference mode, no gradients.

    On CUDA, fp32 runs in IEEE fp32 (no TF32) and cuDNN benchmarks its convolutions per shape
    (the shapes a backend sees are few and repeat). ``torch.compile`` marks the batch axis
    dynamic, so batch sizes above 1 share one graph instead of compiling one each.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        compile: bool = False,
        compiler: str | Callable = "inductor",
    ) -> None:
        self.device = str(resolve_device(str(device)))
        self.precision = precision
        self.name = "torch-compile" if compile else "torch"
        if precision not in PRECISIONS:
            raise BackendError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        if precision == "fp16" and not self.device.startswith("cuda"):
            raise BackendError("backend torch: fp16 needs a CUDA GPU (CPU half kernels are slow)")
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.source = module
        self.compile, self.compiler = compile, compiler
        self.module: nn.Module | None = None
        self._forward: Runner | None = None

    def _activate(self) -> None:
        # fp16: a half copy (LRN kept fp32); the caller's module is never turned to half.
        module = to_half(self.source) if self.dtype == torch.float16 else self.source
        self.module = module.eval().to(self.device)
        if self.compile:
            self._forward = torch.compile(self.module, backend=self.compiler)
        else:
            self._forward = self.module

    def _deactivate(self) -> None:
        self.module = self._forward = None

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, self.dtype, non_blocking=True)
        cuda = x.is_cuda
        if self.compile and x.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(x, 0)
        with torch.inference_mode(), cudnn_benchmark(cuda), ieee_fp32():
            out = self._forward(x)
        return out.float().to(batch.device)


class _PerShape(Backend):
    """A backend that builds one runner per input shape (ONNX file, session, engine).

    From a module, each new runner is checked against the module (float32, on the CPU) on two
    inputs drawn from ``input_range`` before it is used: fp16 and provider differences show on
    the provider that will run them (ONNX Runtime's CPU check in the ONNX cache cannot).
    """

    def __init__(
        self,
        source: nn.Module | Path | str,
        label: str,
        notify: Notify,
        sample_shape: Sequence[int] | None,
        input_range: tuple[float, float],
    ) -> None:
        self.label = label
        self.notify = notify
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None
        self.input_range = input_range
        self._lock = threading.Lock()
        self._runners: dict[tuple[int, ...], Runner] = {}
        if isinstance(source, nn.Module):
            self.module: nn.Module | None = source.eval()  # exported from a CPU copy if needed
            self.path: Path | None = None
        else:
            self.module = None
            self.path = Path(source)
            if not self.path.is_file():
                raise BackendError(f"{self.path}: file not found")

    def onnx_for(self, sample_shape: Sequence[int]) -> Path:
        if self.path is not None:
            return self.path
        assert self.module is not None
        return cached_onnx(
            self.module,
            tuple(sample_shape),
            name=self.label,
            fp16=self._onnx_fp16(),
            notify=self.notify,
        )

    def _onnx_fp16(self) -> bool:
        return self.precision == "fp16"

    def prepare(self, sample_shape: Sequence[int]) -> None:
        """Build (or load from cache) and check whatever inputs of ``sample_shape`` need."""
        key = tuple(int(d) for d in sample_shape)
        with self._lock:
            if key in self._runners:
                return
            runner = self._make_runner(key)
            if self.module is not None and self._verify():
                self._check(runner, key)
            self._runners[key] = runner

    def _verify(self) -> bool:
        return True

    def _check(self, runner: Runner, sample_shape: tuple[int, ...]) -> None:
        low, high = self.input_range
        gen = torch.Generator().manual_seed(0)
        inputs = low + (high - low) * torch.rand(2, *sample_shape, generator=gen)
        reference = self.module
        device = torch.device(self.device)
        report = compare(
            reference,
            lambda x: runner(x.to(device)),
            inputs,
            logits=False,
            precision=self.precision,
            source="random inputs",
            names=("torch", f"{self.name} {self.precision}"),
        )
        report.check(f"backend {self.name} ({self.label})", BackendError)

    def _activate(self) -> None:
        if self.sample_shape is not None:
            self.prepare(self.sample_shape)

    def _deactivate(self) -> None:
        with self._lock:
            for runner in self._runners.values():
                close = getattr(runner, "deactivate", None)
                if close:
                    close()
            self._runners.clear()

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        key = tuple(int(d) for d in batch.shape[1:])
        runner = self._runners.get(key)
        if runner is None:
            self.prepare(key)
            runner = self._runners[key]
        return runner(batch)

    def _make_runner(self, sample_shape: tuple[int, ...]) -> Runner:
        raise NotImplementedError


class OrtBackend(_PerShape):
    """ONNX Runtime on the CPU, CUDA or TensorRT execution provider."""

    def __init__(
        self,
        source: nn.Module | Path | str,
        *,
        provider: str = "ort-cpu",
        precision: str = "fp32",
        threads: int | None = None,
        optimization: str = "all",
        label: str = "model",
        notify: Notify = _stderr,
        opt_batch: int = 16,
        max_batch: int = 128,
        sample_shape: Sequence[int] | None = None,
        input_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        require(provider)
        super().__init__(source, label, notify, sample_shape, input_range)
        self.name = provider
        self.device = "cpu" if provider == "ort-cpu" else f"cuda:{torch.cuda.current_device()}"
        self.precision = precision
        self.threads = threads
        self.optimization = optimization
        self.opt_batch, self.max_batch = opt_batch, max_batch
        self._order: StreamOrder | None = None

    def _onnx_fp16(self) -> bool:
        # The TensorRT provider takes the fp32 graph and builds FP16 kernels itself.
        return self.precision == "fp16" and self.name != "ort-trt"

    def _verify(self) -> bool:
        # ORT CPU fp32 is what the ONNX cache checked already.
        return self.name != "ort-cpu" or self.precision != "fp32"

    def _activate(self) -> None:
        if self.name != "ort-cpu":
            self._order = StreamOrder(self.device)
        super()._activate()

    def _deactivate(self) -> None:
        super()._deactivate()
        self._order = None

    def _make_runner(self, sample_shape: tuple[int, ...]) -> Runner:
        session = ort_session(
            self.onnx_for(sample_shape),
            self.name,
            threads=self.threads,
            optimization=self.optimization,
            fp16=self.precision == "fp16",
            opt_batch=self.opt_batch,
            max_batch=self.max_batch,
            stream=self._order.handle if self._order else None,
        )
        if self._order is None:
            return cpu_runner(session)
        return binding_runner(session, torch.device(self.device), self._order)


class TensorRTBackend(_PerShape):
    """A TensorRT engine: built from the module's ONNX graph (or an ONNX file) and cached per
    graph, GPU and batch range, or a user's serialized engine (.engine/.plan) used as it is."""

    def __init__(
        self,
        source: nn.Module | Path | str,
        *,
        precision: str = "fp32",
        label: str = "model",
        notify: Notify = _stderr,
        opt_batch: int = 16,
        max_batch: int = 128,
        sample_shape: Sequence[int] | None = None,
        input_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        require("tensorrt")
        super().__init__(source, label, notify, sample_shape, input_range)
        self.name = "tensorrt"
        self.device = f"cuda:{torch.cuda.current_device()}"
        self.precision = precision
        self.opt_batch, self.max_batch = opt_batch, max_batch
        if self.path is not None and self.path.suffix not in ENGINE_SUFFIXES:
            graph = onnx_precision(self.path)
            if graph != precision:
                raise BackendError(
                    f"{self.path}: an {graph} ONNX graph; TensorRT builds the graph's own "
                    f"precision (strongly typed), so {precision} needs an {precision} export"
                )

    def _make_runner(self, sample_shape: tuple[int, ...]) -> Runner:
        if self.path is not None and self.path.suffix in ENGINE_SUFFIXES:
            return EngineRunner(self.path, self.device).activate()
        engine = cached_engine(
            self.onnx_for(sample_shape),
            opt_batch=self.opt_batch,
            max_batch=self.max_batch,
            notify=self.notify,
        )
        return EngineRunner(engine, self.device).activate()


def onnx_precision(path: Path | str) -> str:
    """``fp16`` when the graph holds fp16 weights (an ``export_onnx(fp16=True)`` file)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    half = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    return "fp16" if half else "fp32"


# ---------------------------------------------------------------- choosing and building


def resolve_backend(name: str, device: str | torch.device = "auto") -> tuple[str, str | None]:
    """``(backend, note)`` by the cheap check: ``auto`` becomes the first usable one in
    ``AUTO_ORDER`` for ``device`` and ``note`` says why (no module: ``torch`` is included)."""
    requested = canonical(name, device)
    if requested != "auto":
        require(requested)
        return requested, None
    kind = resolve_device(str(device)).type
    skipped = []
    for candidate in AUTO_ORDER[kind]:
        reason = unavailable_reason(candidate)
        if reason is None:
            note = f"backend auto: using {candidate}"
            if skipped:
                note += " (" + "; ".join(skipped) + ")"
            return candidate, note
        skipped.append(f"{candidate}: {reason}")
    raise BackendError("backend auto: nothing usable (" + "; ".join(skipped) + ")")


def create_backend(
    name: str,
    model: nn.Module | Path | str,
    *,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    sample_shape: Sequence[int] | None = None,
    threads: int | None = None,
    label: str = "model",
    notify: Notify | None = _stderr,
    opt_batch: int = 16,
    max_batch: int = 128,
    input_range: tuple[float, float] = (0.0, 1.0),
) -> Backend:
    """Backend ``name`` (or ``auto``) for an ``nn.Module`` or an ONNX/engine file, activated.

    ``device`` places the torch backends and steers ``auto`` and ``ort`` (on the CPU: ONNX
    Runtime's CPU provider, then torch; on CUDA: TensorRT, ORT CUDA, torch, ORT CPU). With
    ``sample_shape`` the export / engine build / check happens now rather than on the first
    batch, so ``auto`` can fall back when it fails. ``input_range``: where the per-shape check
    draws its inputs (the model's real input range shows overflow that [0, 1] would not).
    """
    notify = notify or _quiet
    if precision not in PRECISIONS:
        raise BackendError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    requested = canonical(name, device)
    options = {
        "precision": precision,
        "sample_shape": sample_shape,
        "threads": threads,
        "label": label,
        "notify": notify,
        "opt_batch": opt_batch,
        "max_batch": max_batch,
        "input_range": input_range,
    }
    if requested != "auto":
        return _build(requested, model, device, **options).activate()
    kind = resolve_device(str(device)).type
    skipped: list[str] = []
    for candidate in AUTO_ORDER[kind]:
        if candidate.startswith("torch") and not isinstance(model, nn.Module):
            continue
        reason = unavailable_reason(candidate)
        if reason:
            skipped.append(f"{candidate}: {reason}")
            continue
        try:
            backend = _build(candidate, model, device, **options).activate()
        except (AdvpurifyError, OSError) as error:  # OSError: a CUDA/TensorRT library
            skipped.append(f"{candidate} failed: {first_line(error)}")
            notify(f"backend auto: {candidate} failed ({first_line(error)}); trying the next")
            continue
        note = f"backend auto: using {candidate}"
        notify(note + (" (" + "; ".join(skipped) + ")" if skipped else ""))
        return backend
    raise BackendError(f"backend auto: nothing usable for {model} (" + "; ".join(skipped) + ")")


def _build(
    name: str,
    model: nn.Module | Path | str,
    device: str | torch.device,
    *,
    precision: str,
    sample_shape: Sequence[int] | None,
    threads: int | None,
    label: str,
    notify: Notify,
    opt_batch: int,
    max_batch: int,
    input_range: tuple[float, float],
) -> Backend:
    if name in ("torch", "torch-compile"):
        if not isinstance(model, nn.Module):
            raise BackendError(f"backend {name} needs the torch module, not the file {model}")
        return TorchBackend(
            model, device=device, precision=precision, compile=name == "torch-compile"
        )
    shared = {
        "precision": precision,
        "label": label,
        "notify": notify,
        "opt_batch": opt_batch,
        "max_batch": max_batch,
        "sample_shape": sample_shape,
        "input_range": input_range,
    }
    if name == "tensorrt":
        return TensorRTBackend(model, **shared)
    return OrtBackend(model, provider=name, threads=threads, **shared)
