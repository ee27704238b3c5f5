"""Run a feed-forward network on torch, ONNX Runtime or TensorRT behind one interface.

``backend.run(batch) -> outputs``: a float32 batch in, float32 outputs out, on the batch's device.
Each backend has a ``name``, a ``device`` and a ``precision``.

- ``torch``: eager (``torch-compile``: through ``torch.compile``); the only one with gradients.
- ``ort-cpu`` / ``ort-cuda`` / ``ort-trt``: ONNX Runtime with the CPU, CUDA or TensorRT execution
  provider. On CUDA, I/O binding hands ONNX Runtime the torch tensors' device memory, so nothing
  crosses to the host.
- ``tensorrt``: an engine built from the ONNX file with NVIDIA's Polygraphy (optimisation profile
  for the dynamic batch, FP16 on request, timing cache, serialized-engine cache).
- ``auto``: the fastest one present, TensorRT > ORT CUDA > ORT CPU; never fails, says its choice.

An explicit backend that cannot run here (no GPU, TensorRT not installed, a provider that
onnxruntime lists but cannot create a session with) raises :class:`BackendError` naming what is
missing; nothing silently falls back. A backend built from an ``nn.Module`` exports it to ONNX on
first sight of each input shape (cached on disk by content hash: ``runtime.onnx_cache``).
"""

from __future__ import annotations

import copy
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from advpurify.errors import AdvpurifyError
from advpurify.runtime.installed import (
    ALIASES,
    AUTO_ORDER,
    BACKENDS,
    CHOICES,
    PRECISIONS,
    BackendError,
    require,
    unavailable_reason,
)
from advpurify.runtime.ort import ort_session

Notify = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# ---------------------------------------------------------------- the interface


class Backend:
    """``run(batch) -> outputs``; float32 in, float32 out on the batch's device."""

    name: str = ""
    device: str = "cpu"
    precision: str = "fp32"

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.run(batch)

    def describe(self) -> str:
        return f"{self.name} ({self.device}, {self.precision})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class TorchBackend(Backend):
    """Eager torch, or ``torch.compile`` (``compile=True``); inference mode, no gradients."""

    def __init__(
        self,
        module: nn.Module,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        compile: bool = False,
    ) -> None:
        from advpurify.devices import resolve_device

        self.device = str(resolve_device(device))
        self.precision = precision
        self.name = "torch-compile" if compile else "torch"
        if precision == "fp16" and not self.device.startswith("cuda"):
            raise BackendError("backend torch: fp16 needs a CUDA GPU (CPU half kernels are slow)")
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        if self.dtype != torch.float32:
            module = copy.deepcopy(module)  # never turn the caller's module to half
        self.module = module.eval().to(self.device, self.dtype)
        self._forward = torch.compile(self.module, dynamic=False) if compile else self.module

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self._forward(batch.to(self.device, self.dtype, non_blocking=True))
        return out.float().to(batch.device)


class _PerShape(Backend):
    """A backend that compiles one artefact per input shape (ONNX file, session, engine)."""

    def __init__(self, source: nn.Module | Path | str, label: str, notify: Notify) -> None:
        self.label = label
        self.notify = notify
        self._lock = threading.Lock()
        self._runners: dict[tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]] = {}
        if isinstance(source, nn.Module):
            self.module: nn.Module | None = source.eval()  # exported from a CPU copy if needed
            self.onnx_path: Path | None = None
        else:
            self.module = None
            self.onnx_path = Path(source)
            if not self.onnx_path.is_file():
                raise BackendError(f"{self.onnx_path}: ONNX file not found")

    def onnx_for(self, sample_shape: Sequence[int]) -> Path:
        if self.onnx_path is not None:
            return self.onnx_path
        from advpurify.runtime.onnx_cache import cached_onnx

        assert self.module is not None
        return cached_onnx(
            self.module,
            tuple(sample_shape),
            name=self.label,
            fp16=self._onnx_fp16(),
            notify=self.notify,
        )

    def _onnx_fp16(self) -> bool:
        return False

    def prepare(self, sample_shape: Sequence[int]) -> None:
        """Build (or load from cache) whatever inputs of ``sample_shape`` need."""
        key = tuple(int(d) for d in sample_shape)
        with self._lock:
            if key not in self._runners:
                self._runners[key] = self._make_runner(self.onnx_for(key))

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        key = tuple(int(d) for d in batch.shape[1:])
        if key not in self._runners:
            self.prepare(key)
        return self._runners[key](batch)

    def _make_runner(self, onnx_path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
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
    ) -> None:
        require(provider)
        super().__init__(source, label, notify)
        self.name = provider
        self.device = "cpu" if provider == "ort-cpu" else f"cuda:{torch.cuda.current_device()}"
        self.precision = precision
        self.threads = threads
        self.optimization = optimization
        self.opt_batch, self.max_batch = opt_batch, max_batch

    def _onnx_fp16(self) -> bool:
        # The TensorRT provider takes fp32 ONNX and builds FP16 kernels itself.
        return self.precision == "fp16" and self.name != "ort-trt"

    def _make_runner(self, onnx_path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
        session = ort_session(
            onnx_path,
            self.name,
            threads=self.threads,
            optimization=self.optimization,
            fp16=self.precision == "fp16",
            opt_batch=self.opt_batch,
            max_batch=self.max_batch,
        )
        input_name = session.get_inputs()[0].name
        output = session.get_outputs()[0]
        if self.name == "ort-cpu":

            def run_cpu(batch: torch.Tensor) -> torch.Tensor:
                array = batch.detach().to("cpu", torch.float32).contiguous().numpy()
                result = session.run([output.name], {input_name: array})[0]
                return torch.from_numpy(result).to(batch.device)

            return run_cpu
        return self._binding_runner(session, input_name, output)

    def _binding_runner(self, session, input_name: str, output) -> Callable:
        device = torch.device(self.device)
        rest = output.shape[1:]
        static_rest = all(isinstance(d, int) and d > 0 for d in rest)

        def run_cuda(batch: torch.Tensor) -> torch.Tensor:
            x = batch.detach().to(device, torch.float32).contiguous()
            binding = session.io_binding()
            binding.bind_input(
                input_name, "cuda", device.index or 0, np.float32, tuple(x.shape), x.data_ptr()
            )
            if static_rest:
                out = torch.empty((x.shape[0], *rest), dtype=torch.float32, device=device)
                binding.bind_output(
                    output.name,
                    "cuda",
                    device.index or 0,
                    np.float32,
                    tuple(out.shape),
                    out.data_ptr(),
                )
                session.run_with_iobinding(binding)
            else:
                binding.bind_output(output.name, "cuda", device.index or 0)
                session.run_with_iobinding(binding)
                out = torch.from_numpy(binding.copy_outputs_to_cpu()[0]).to(device)
            return out.to(batch.device)

        return run_cuda


class TensorRTBackend(_PerShape):
    """A TensorRT engine (Polygraphy loaders and runner), cached per model, GPU and precision."""

    def __init__(
        self,
        source: nn.Module | Path | str,
        *,
        precision: str = "fp32",
        label: str = "model",
        notify: Notify = _stderr,
        opt_batch: int = 16,
        max_batch: int = 128,
    ) -> None:
        require("tensorrt")
        self.name = "tensorrt"
        self.device = f"cuda:{torch.cuda.current_device()}"
        self.precision = precision
        self.opt_batch, self.max_batch = opt_batch, max_batch
        # ``source`` may also be a serialized engine (.engine/.plan): used as it is.
        super().__init__(source, label, notify)

    def _make_runner(self, onnx_path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
        from advpurify.runtime.tensorrt import cached_engine, load_runner

        if onnx_path.suffix in (".engine", ".plan"):
            engine_path = onnx_path
        else:
            engine_path = cached_engine(
                onnx_path,
                fp16=self.precision == "fp16",
                opt_batch=self.opt_batch,
                max_batch=self.max_batch,
                notify=self.notify,
            )
        runner, input_name, output_name = load_runner(engine_path)
        device = torch.device(self.device)
        max_batch = self.max_batch

        def run_trt(batch: torch.Tensor) -> torch.Tensor:
            x = batch.detach().to(device, torch.float32).contiguous()
            outs = []
            for start in range(0, x.shape[0], max_batch):
                result = runner.infer(
                    {input_name: x[start : start + max_batch]}, copy_outputs_to_host=False
                )
                # Polygraphy reuses its output buffer on the next call: copy out now.
                outs.append(torch.as_tensor(result[output_name], device=device).float().clone())
            return torch.cat(outs).to(batch.device)

        return run_trt


# ---------------------------------------------------------------- choosing and building


def resolve_backend(name: str) -> tuple[str, str | None]:
    """``(backend, note)``: ``auto`` becomes the best usable one and ``note`` says why."""
    name = (name or "auto").lower()
    name = ALIASES.get(name, name)
    if name != "auto":
        if name not in BACKENDS:
            raise BackendError(f"unknown backend {name!r} (backends: {', '.join(CHOICES)})")
        require(name)
        return name, None
    skipped = []
    for candidate in AUTO_ORDER:
        reason = unavailable_reason(candidate)
        if reason is None:
            note = f"backend auto: using {candidate}"
            if skipped:
                note += " (" + "; ".join(skipped) + ")"
            return candidate, note
        skipped.append(f"{candidate}: {reason}")
    raise AssertionError("ort-cpu is always available")  # pragma: no cover


def create_backend(
    name: str,
    model: nn.Module | Path | str,
    *,
    device: str = "auto",
    precision: str = "fp32",
    sample_shape: Sequence[int] | None = None,
    threads: int | None = None,
    label: str = "model",
    notify: Notify | None = _stderr,
    opt_batch: int = 16,
    max_batch: int = 128,
) -> Backend:
    """Build backend ``name`` (or ``auto``) for an ``nn.Module`` or an ONNX/engine file.

    ``device`` matters for the torch backends only (the others imply theirs). With
    ``sample_shape`` the ONNX export / engine build happens now rather than on the first batch;
    ``auto`` then falls back to the next candidate if building fails.
    """
    notify = notify or (lambda _message: None)
    if precision not in PRECISIONS:
        raise BackendError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    requested = (name or "auto").lower()
    requested = ALIASES.get(requested, requested)
    chosen, note = resolve_backend(requested)
    candidates = [chosen] if requested != "auto" else list(AUTO_ORDER[AUTO_ORDER.index(chosen) :])
    last_error: Exception | None = None
    for candidate in candidates:
        if requested == "auto" and unavailable_reason(candidate):
            continue
        try:
            backend = _build(
                candidate, model, device, precision, threads, label, notify, opt_batch, max_batch
            )
            if sample_shape is not None and isinstance(backend, _PerShape):
                backend.prepare(sample_shape)
        except AdvpurifyError as error:  # BackendError, or an export that failed
            if requested != "auto":
                raise
            last_error = error
            notify(f"backend auto: {candidate} failed ({error}); trying the next")
            continue
        if requested == "auto":
            notify(note if candidate == chosen else f"backend auto: using {candidate}")
        return backend
    if isinstance(model, nn.Module):  # nothing exported: the module itself still runs
        notify(f"backend auto: using torch ({last_error})")
        return TorchBackend(model, device=device, precision=precision)
    raise BackendError(f"backend auto: nothing usable for {model} ({last_error})")


def _build(
    name: str,
    model: nn.Module | Path | str,
    device: str,
    precision: str,
    threads: int | None,
    label: str,
    notify: Notify,
    opt_batch: int,
    max_batch: int,
) -> Backend:
    if name in ("torch", "torch-compile"):
        if not isinstance(model, nn.Module):
            raise BackendError(f"backend {name} needs the torch module, not the file {model}")
        return TorchBackend(
            model, device=device, precision=precision, compile=name == "torch-compile"
        )
    if name == "tensorrt":
        return TensorRTBackend(
            model,
            precision=precision,
            label=label,
            notify=notify,
            opt_batch=opt_batch,
            max_batch=max_batch,
        )
    return OrtBackend(
        model,
        provider=name,
        precision=precision,
        threads=threads,
        label=label,
        notify=notify,
        opt_batch=opt_batch,
        max_batch=max_batch,
    )


class ClassifierRunner:
    """A backend seen as ``advpurify.models.classifiers.Runner``: logits come back on the CPU."""

    def __init__(self, backend: Backend) -> None:
        self.impl = backend
        self.backend = backend.name

    def run(self, images: torch.Tensor) -> torch.Tensor:
        return self.impl.run(images).float().cpu()


def classifier_runner(
    module: nn.Module, backend: str, device: torch.device | str, notify: Notify | None = _stderr
) -> ClassifierRunner:
    """Classification on ``backend`` for a ``Classifier`` (input ``input_size`` squared).

    ``auto`` respects the device asked for: on the CPU it is ONNX Runtime's CPU provider.
    """
    device = torch.device(device)
    if backend == "onnxruntime":
        backend = "ort-cuda" if device.type == "cuda" else "ort-cpu"
    if backend == "auto" and device.type == "cpu":
        backend = "ort-cpu"
        if notify:
            notify("backend auto: using ort-cpu (device cpu)")
    size = int(getattr(module, "input_size", 224))
    built = create_backend(
        backend,
        module,
        device=str(device),
        sample_shape=(3, size, size),
        label=str(getattr(module, "name", "classifier")),
        notify=notify,
    )
    return ClassifierRunner(built)
