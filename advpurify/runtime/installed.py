"""What can run here: the backend names, and why one of them cannot (a cheap check)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from advpurify.errors import AdvpurifyError
from advpurify.paths import cache_home

BACKENDS = ("torch", "torch-compile", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt")
# Other spellings users reach for; ``onnxruntime`` follows the device in ``classifier_runner``.
ALIASES = {"onnxruntime": "ort-cpu", "ort": "ort-cpu", "trt": "tensorrt"}
CHOICES = (*BACKENDS, "auto", *ALIASES)
AUTO_ORDER = ("tensorrt", "ort-cuda", "ort-cpu")
PRECISIONS = ("fp32", "fp16")
ORT_PROVIDERS = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-trt": "TensorrtExecutionProvider",
}


class BackendError(AdvpurifyError, RuntimeError):
    """A backend that is unknown, not installed, or has no device to run on."""


# ---------------------------------------------------------------- what is usable on this machine


def cuda_missing() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU is available (torch.cuda.is_available() is False)"
    return None


def tensorrt_missing() -> str | None:
    for module, extra in (("tensorrt", "TensorRT"), ("polygraphy", "Polygraphy")):
        if importlib.util.find_spec(module) is None:
            return f"{extra} is not installed (pip install 'advpurify[tensorrt]')"
    return cuda_missing()


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here (a cheap check), or None when it should."""
    name = ALIASES.get(name, name)
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (backends: {', '.join(CHOICES)})")
    if name.startswith("torch") or name == "ort-cpu":
        return None
    if name == "tensorrt":
        return tensorrt_missing()
    import onnxruntime as ort

    provider = ORT_PROVIDERS[name]
    if provider not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} was built without {provider}"
    missing = cuda_missing()
    if missing:
        return missing
    if name == "ort-trt" and importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'advpurify[tensorrt]')"
    return None


def available_backends() -> list[str]:
    return [name for name in BACKENDS if unavailable_reason(name) is None]


def require(name: str) -> None:
    reason = unavailable_reason(name)
    if reason:
        raise BackendError(f"backend {name}: {reason}")


def engine_cache_dir() -> Path:
    """Where TensorRT engines (built here or by ONNX Runtime's provider) are cached."""
    return cache_home() / "engines"
