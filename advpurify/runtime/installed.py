"""What can run here: the backend names (the one alias table), and why one cannot.

TensorRT: the ``tensorrt`` extra is bounded to 10.x (``tensorrt>=10,<11``). ONNX Runtime's
TensorRT provider (onnxruntime-gpu 1.31) links ``libnvinfer.so.10``, so ``ort-trt`` and
``tensorrt`` use the one TensorRT 10 library in a process; TensorRT 11 is refused with that
reason. Engines are built the way TensorRT 11 requires already (strongly typed networks from an
fp32 or fp16 ONNX graph), so lifting the bound is one line once the provider links 11.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import torch

from advpurify.errors import AdvpurifyError, first_line
from advpurify.paths import cache_home

BACKENDS = ("torch", "torch-compile", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt")
# Other spellings users reach for. ``onnxruntime``/``ort`` follow the device (``canonical``).
ALIASES = {"trt": "tensorrt", "compile": "torch-compile", "onnxruntime": "ort", "ort": "ort"}
CHOICES = (*BACKENDS, "auto", *ALIASES)
# ``auto``: the fastest usable one for the device. On a GPU the module's own torch is faster
# than ONNX Runtime on the CPU; a file (no module) can only run on the engine backends.
AUTO_ORDER = {"cuda": ("tensorrt", "ort-cuda", "torch", "ort-cpu"), "cpu": ("ort-cpu", "torch")}
PRECISIONS = ("fp32", "fp16")
ORT_PROVIDERS = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-trt": "TensorrtExecutionProvider",
}
TENSORRT_MAJOR = 10  # what ONNX Runtime's TensorRT provider links (libnvinfer.so.10)


class BackendError(AdvpurifyError, RuntimeError):
    """A backend that is unknown, not installed, or has no device to run on."""


def canonical(name: str | None, device: str | torch.device | None = None) -> str:
    """The backend's name in ``BACKENDS`` (or ``auto``); ``ort``/``onnxruntime`` follow
    ``device`` (CUDA: ``ort-cuda``, else ``ort-cpu``)."""
    name = (name or "auto").strip().lower()
    name = ALIASES.get(name, name)
    if name == "ort":
        cuda = device is not None and torch.device(device).type == "cuda"
        name = "ort-cuda" if cuda else "ort-cpu"
    if name != "auto" and name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (backends: {', '.join(CHOICES)})")
    return name


# ---------------------------------------------------------------- what is usable on this machine


def cuda_missing() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU is available (torch.cuda.is_available() is False)"
    return None


def tensorrt_missing() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'advpurify[tensorrt]')"
    missing = cuda_missing()
    if missing:
        return missing
    try:
        load_tensorrt()
    except BackendError as error:
        return str(error)
    return None


def load_tensorrt():
    """``import tensorrt``, with its libraries loaded for ONNX Runtime's provider too.

    The pip wheels keep ``libnvinfer.so.10`` and ``libnvonnxparser.so.10`` in the
    ``tensorrt_libs`` package, where the dynamic loader never looks; once loaded here, the
    provider's own ``dlopen`` finds them by soname. A missing or broken library (``OSError``)
    and TensorRT 11 become :class:`BackendError`, so ``auto`` falls back.
    """
    try:
        import tensorrt as trt  # optional heavy dependency: imported only when used
    except (ImportError, OSError) as error:
        raise BackendError(f"TensorRT cannot be loaded: {first_line(error)}") from None
    major = int(str(trt.__version__).split(".")[0])
    if major != TENSORRT_MAJOR:
        raise BackendError(
            f"TensorRT {trt.__version__} is not supported: onnxruntime-gpu's TensorRT provider "
            f"links libnvinfer.so.{TENSORRT_MAJOR} (pip install 'tensorrt>=10,<11')"
        )
    spec = importlib.util.find_spec("tensorrt_libs")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        for pattern in ("libnvinfer.so.*", "libnvonnxparser.so.*", "libnvinfer_plugin.so.*"):
            for library in sorted(Path(folder).glob(pattern)):
                try:
                    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
                except OSError as error:
                    raise BackendError(f"{library}: {first_line(error)}") from None
    return trt


def preload_cuda_libraries() -> None:
    """CUDA/cuDNN libraries of the nvidia pip wheels for ONNX Runtime (torch's are the same
    major version here, so this mostly confirms they load); failures become BackendError."""
    import onnxruntime as ort  # optional heavy dependency

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload(cuda=True, cudnn=True)
    except OSError as error:
        raise BackendError(f"CUDA libraries for onnxruntime: {first_line(error)}") from None


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here (a cheap check), or None when it should."""
    name = canonical(name)
    if name == "auto":
        return None
    if name.startswith("torch") or name == "ort-cpu":
        return None
    if name == "tensorrt":
        return tensorrt_missing()
    import onnxruntime as ort  # optional heavy dependency

    provider = ORT_PROVIDERS[name]
    if provider not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} was built without {provider}"
    missing = cuda_missing()
    if missing:
        return missing
    if name == "ort-trt":
        if importlib.util.find_spec("tensorrt") is None:
            return "TensorRT is not installed (pip install 'advpurify[tensorrt]')"
        try:
            load_tensorrt()
        except BackendError as error:
            return str(error)
    return None


def available_backends() -> list[str]:
    return [name for name in BACKENDS if unavailable_reason(name) is None]


def require(name: str) -> None:
    reason = unavailable_reason(name)
    if reason:
        raise BackendError(f"backend {canonical(name)}: {reason}")


def engine_cache_dir() -> Path:
    """Where TensorRT engines (built here or by ONNX Runtime's provider) are cached."""
    return cache_home() / "engines"
