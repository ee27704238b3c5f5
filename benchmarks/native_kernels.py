"""The native kernels of ``benchmarks/native/skipnet_nhwc.c`` as torch autograd functions.

Built with the system C compiler (``$CC``, else ``cc``) into a temporary folder and loaded with
ctypes; used by ``bench_dip_layouts.py --native`` only.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "native" / "skipnet_nhwc.c"
NHWC = torch.channels_last
_f, _i, _l, _p = ctypes.c_float, ctypes.c_int, ctypes.c_long, ctypes.c_void_p
_SIGNATURES = {
    "bn_act_forward": [_p, _p, _l, _i, _p, _p, _f, _f, _p, _p, _i],
    "bn_act_backward": [_p, _p, _p, _p, _l, _i, _p, _p, _p, _f, _p, _p, _i],
    "pad_part_forward": [_p, _p, _l, _l, _i, _i, _i, _i],
    "pad_part_backward": [_p, _p, _l, _l, _i, _i, _i, _i],
}


@functools.cache
def kernels() -> ctypes.CDLL:
    """The compiled kernels; raises RuntimeError (with the reason) where they cannot be built."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or $CC)")
    library = Path(tempfile.mkdtemp(prefix="advpurify-bench-")) / "skipnet_nhwc.so"
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
    built = subprocess.run(
        [compiler, *flags, "-o", str(library), str(SOURCE), "-lm"], capture_output=True, text=True
    )
    if built.returncode != 0:
        raise RuntimeError(f"{compiler} failed: {built.stderr.strip()[:200]}")
    lib = ctypes.CDLL(str(library))
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    return lib


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """The kernels' only input: one float32 image on the CPU, channels-last."""
    if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 4 or t.shape[0] != 1:
        raise ValueError(f"expected one float32 CPU image (1 x C x H x W), got {t.dtype} "
                         f"{tuple(t.shape)} on {t.device}")  # fmt: skip
    return t.contiguous(memory_format=NHWC)


class BatchNormAct(torch.autograd.Function):
    """``leaky_relu(batch_norm(x), slope)`` with the batch statistics of one NHWC image
    (slope 1: BatchNorm alone)."""

    @staticmethod
    def forward(ctx, x, weight, bias, slope: float):
        x, weight, bias = _nhwc(x), weight.contiguous(), bias.contiguous()
        _, c, h, w = x.shape
        y = torch.empty_like(x, memory_format=NHWC)
        mean, invstd = x.new_empty(c), x.new_empty(c)
        kernels().bn_act_forward(
            x.data_ptr(), y.data_ptr(), h * w, c, weight.data_ptr(), bias.data_ptr(), 1e-5,
            slope, mean.data_ptr(), invstd.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        ctx.save_for_backward(x, y, weight, mean, invstd)
        ctx.slope = slope
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y, weight, mean, invstd = ctx.saved_tensors
        grad = _nhwc(grad)
        _, c, h, w = x.shape
        dx = torch.empty_like(x, memory_format=NHWC)
        dweight, dbias = x.new_empty(c), x.new_empty(c)
        kernels().bn_act_backward(
            grad.data_ptr(), x.data_ptr(), y.data_ptr(), dx.data_ptr(), h * w, c,
            weight.data_ptr(), mean.data_ptr(), invstd.data_ptr(), ctx.slope,
            dweight.data_ptr(), dbias.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return dx, dweight, dbias, None


class ReflectPadConcat(torch.autograd.Function):
    """Reflection padding by one of ``cat(parts, dim=1)``, as one NHWC tensor."""

    @staticmethod
    def forward(ctx, *parts):
        parts = [_nhwc(p) for p in parts]
        _, _, h, w = parts[0].shape
        if any(p.shape[-2:] != (h, w) for p in parts):
            raise ValueError(f"parts of different sizes: {[tuple(p.shape) for p in parts]}")
        if h < 2 or w < 2:
            raise ValueError(f"reflection padding needs at least 2 x 2, not {h} x {w}")
        ctx.channels = [p.shape[1] for p in parts]
        total = sum(ctx.channels)
        out = torch.empty((1, total, h + 2, w + 2), dtype=parts[0].dtype, memory_format=NHWC)
        start, threads = 0, torch.get_num_threads()
        for part, c in zip(parts, ctx.channels, strict=True):
            kernels().pad_part_forward(
                part.data_ptr(), out.data_ptr(), h, w, c, total, start, threads
            )
            start += c
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = _nhwc(grad)
        _, total, hp, wp = grad.shape
        grads, start, threads = [], 0, torch.get_num_threads()
        for c in ctx.channels:
            part = torch.empty((1, c, hp - 2, wp - 2), dtype=grad.dtype, memory_format=NHWC)
            kernels().pad_part_backward(
                grad.data_ptr(), part.data_ptr(), hp - 2, wp - 2, c, total, start, threads
            )
            grads.append(part)
            start += c
        return tuple(grads)
