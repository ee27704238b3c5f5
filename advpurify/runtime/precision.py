"""What ``fp32`` and ``fp16`` mean, the same on every backend, and the parity tolerances.

``fp32`` is IEEE float32 everywhere: TF32 is off. Left to their defaults the libraries disagree:
torch's cuDNN convolutions use TF32, ONNX Runtime's CUDA provider uses TF32 (``use_tf32``),
TensorRT's builder enables TF32 and Polygraphy clears it. So torch runs its CUDA kernels under
:func:`ieee_fp32`, ONNX Runtime's CUDA provider gets ``ORT_CUDA_FP32``, and TensorRT engines are
built with TF32 cleared. The parity tolerances below hold for that policy (docs/backends.md).

``fp16``: weights and arithmetic in half, inputs and outputs float32 (the project's image
convention). LocalResponseNorm stays float32: it squares Caffe-scale activations (hundreds),
whose sums overflow half's 65504.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

# ONNX Runtime CUDA provider options for ``fp32``.
ORT_CUDA_FP32 = {"use_tf32": "0"}

# Max abs difference allowed, relative to the reference output's largest magnitude (at least 1).
RELATIVE_TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}


def default_tolerance(reference: torch.Tensor, precision: str = "fp32") -> float:
    """Absolute tolerance scaled to the output's magnitude (fp32: 1e-3, fp16: 3e-2 relative)."""
    scale = max(1.0, float(reference.detach().abs().max())) if reference.numel() else 1.0
    return RELATIVE_TOLERANCE[precision] * scale


def _new_api() -> bool:
    # torch 2.9+ has per-backend ``fp32_precision``; mixing it with ``allow_tf32`` raises.
    return hasattr(torch.backends.cudnn, "conv") and hasattr(
        torch.backends.cudnn.conv, "fp32_precision"
    )


@contextlib.contextmanager
def cuda_fp32(mode: str) -> Iterator[None]:
    """torch's CUDA matmuls and cuDNN convolutions in ``mode`` ("ieee" or "tf32") inside."""
    if mode not in ("ieee", "tf32"):
        raise ValueError(f"fp32 mode {mode!r}: ieee or tf32")
    if _new_api():
        matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
        saved = (matmul.fp32_precision, conv.fp32_precision)
        matmul.fp32_precision = conv.fp32_precision = mode
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved
        return
    saved_legacy = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    allow = mode == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_legacy


def ieee_fp32() -> contextlib.AbstractContextManager[None]:
    """IEEE float32 (no TF32) inside: the ``fp32`` policy."""
    return cuda_fp32("ieee")


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool = True) -> Iterator[None]:
    """cuDNN picks the fastest convolution per input shape (worth it for fixed shapes)."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


class Float32LRN(nn.Module):
    """LocalResponseNorm computed in float32 inside a half network."""

    def __init__(self, norm: nn.LocalResponseNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


def to_half(module: nn.Module) -> nn.Module:
    """A half copy of ``module`` (the caller's stays float32) whose LRN layers stay float32."""
    half = copy.deepcopy(module).half()
    if isinstance(half, nn.LocalResponseNorm):
        return Float32LRN(half)
    for parent in list(half.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, nn.LocalResponseNorm):
                setattr(parent, attr, Float32LRN(child))
    return half


class Float16(nn.Module):
    """fp16 inside (:func:`to_half`), float32 in and out."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = to_half(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.half()).float()
