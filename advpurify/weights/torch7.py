"""Torch7 (``.t7``) files: reading them with ``torchfile`` and loading their layers into torch.

A model whose Torch7 layers map one to one, in order, onto its torch layers (the context encoder's
``imagenet_inpaintCenter.t7``) is loaded with :func:`load_modules`, which checks every layer's
type, kernel, stride and padding, so a file of another architecture is refused with a reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

try:
    import torchfile
except ImportError:  # only .t7 files need it; a bare GPU machine (make gpu-check) may lack it
    torchfile = None

from advpurify.weights.registry import WeightsError

CONTAINERS = {"nn.Sequential", "nn.gModule", "nn.Concat", "nn.ConcatTable", "nn.ParallelTable"}
# Modules without parameters that carry no computation in the inference graph.
PASSTHROUGH = {"nn.Identity", "nn.Dropout", "nn.View", "nn.Reshape"}


class Torch7Error(WeightsError):
    """A ``.t7`` file that cannot be read, or whose network is not the expected one."""


def read_t7(path: Path | str) -> Any:
    """Deserialise a Torch7 file: tensors become numpy arrays, objects ``torchfile.TorchObject``."""
    path = Path(path)
    if not path.is_file():
        raise Torch7Error(f"{path}: no such file")
    if torchfile is None:
        raise Torch7Error(f"{path}: reading Torch7 files needs torchfile (pip install torchfile)")
    try:
        return torchfile.load(str(path))
    except (torchfile.T7ReaderException, EOFError, OSError, ValueError, KeyError) as error:
        raise Torch7Error(f"{path}: not a readable Torch7 file ({error})") from None
    except Exception as error:  # torchfile raises bare struct/unicode errors on corrupt input
        raise Torch7Error(
            f"{path}: not a readable Torch7 file ({type(error).__name__}: {error})"
        ) from None


def type_name(obj: Any) -> str:
    """``nn.SpatialConvolution`` etc.; ``cudnn.*`` and ``*MM`` variants map to their nn names."""
    if not isinstance(obj, torchfile.TorchObject):
        return type(obj).__name__
    name = obj.torch_typename().decode("utf-8", "replace")
    if name.startswith("cudnn."):
        name = "nn." + name[len("cudnn.") :]
    if name == "nn.SpatialConvolutionMM":
        name = "nn.SpatialConvolution"
    return name


def field(obj: Any, key: str, default: Any = None) -> Any:
    raw = obj._obj if isinstance(obj, torchfile.TorchObject) else obj
    return raw.get(key.encode(), raw.get(key, default))


def leaf_modules(obj: Any) -> Iterator[Any]:
    """The modules of a container, depth first, in the order they were added."""
    if type_name(obj) in CONTAINERS:
        for child in field(obj, "modules", []) or []:
            yield from leaf_modules(child)
    else:
        yield obj


def describe(obj: Any) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
    """Each leaf module's type and the shapes of its array fields (for inspection and tests)."""
    summary = []
    for module in leaf_modules(obj):
        raw = module._obj if isinstance(module, torchfile.TorchObject) else {}
        shapes = {
            (k.decode() if isinstance(k, bytes) else str(k)): tuple(v.shape)
            for k, v in raw.items()
            if isinstance(v, np.ndarray) and v.size
        }
        summary.append((type_name(module), shapes))
    return summary


def _array(module: Any, key: str) -> np.ndarray | None:
    value = field(module, key)
    if value is None or (isinstance(value, np.ndarray) and value.size == 0):
        return None
    return np.asarray(value, dtype=np.float32)


def _check(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise Torch7Error(f"{where}: {what}")


def _geometry(module: Any) -> tuple[int, int, int, int, int, int]:
    return tuple(int(field(module, k, 0) or 0) for k in ("kH", "kW", "dH", "dW", "padH", "padW"))


def _load_conv(
    module: Any, target: nn.Conv2d | nn.ConvTranspose2d, where: str
) -> np.ndarray | None:
    """Copy a (full) convolution's weight; return its bias when ``target`` has none to hold it."""
    weight = _array(module, "weight")
    _check(weight is not None, where, "convolution without weight")
    k, s, p = target.kernel_size, target.stride, target.padding
    expected = (k[0], k[1], s[0], s[1], p[0], p[1])
    _check(
        _geometry(module) == expected,
        where,
        f"kernel/stride/padding {_geometry(module)}, expected {expected}",
    )
    shape = tuple(target.weight.shape)
    _check(weight.size == target.weight.numel(), where, f"weight {weight.shape}, expected {shape}")
    # SpatialConvolutionMM stores a 2-D matrix; the element order is the same.
    target.weight.data.copy_(torch.from_numpy(weight.reshape(shape)))
    bias = _array(module, "bias")
    if target.bias is not None:
        if bias is None:
            target.bias.data.zero_()
        else:
            target.bias.data.copy_(torch.from_numpy(bias.reshape(-1)))
        return None
    return bias


def _load_norm(module: Any, target: nn.BatchNorm2d, where: str, bias_before: np.ndarray | None):
    n = target.num_features
    mean, weight, beta = (_array(module, k) for k in ("running_mean", "weight", "bias"))
    var = _array(module, "running_var")
    eps = float(field(module, "eps", 1e-5) or 1e-5)
    if var is None and _array(module, "running_std") is not None:
        # Older nn versions kept 1 / sqrt(var + eps).
        var = 1.0 / np.square(_array(module, "running_std")) - eps
    _check(mean is not None and var is not None, where, "batch norm without running statistics")
    _check(mean.shape == (n,), where, f"{mean.shape[0]} features, expected {n}")
    if bias_before is not None:
        # BN(x + b) with running mean m equals BN(x) with running mean m - b.
        mean = mean - bias_before
    target.running_mean.copy_(torch.from_numpy(mean))
    target.running_var.copy_(torch.from_numpy(var))
    # Affine-free norms (``SpatialBatchNormalization(n, eps, momentum, false)``) scale by 1.
    if weight is None:
        target.weight.data.fill_(1.0)
    else:
        target.weight.data.copy_(torch.from_numpy(weight))
    if beta is None:
        target.bias.data.zero_()
    else:
        target.bias.data.copy_(torch.from_numpy(beta))
    # The cache keeps tensors only, so a non-default epsilon could not be reproduced on load.
    _check(abs(eps - target.eps) < 1e-9, where, f"batch norm eps {eps:g}, expected {target.eps:g}")


# The torch module each Torch7 layer type loads into.
EXPECTED = {
    nn.Conv2d: "nn.SpatialConvolution",
    nn.ConvTranspose2d: "nn.SpatialFullConvolution",
    nn.BatchNorm2d: "nn.SpatialBatchNormalization",
    nn.LeakyReLU: "nn.LeakyReLU",
    nn.ReLU: "nn.ReLU",
    nn.Tanh: "nn.Tanh",
}


def load_modules(t7_modules: list[Any], ours: list[nn.Module], source: str) -> None:
    """Copy Torch7 leaf modules, in order, onto ``ours`` (the same layers, in the same order).

    Every layer's type, kernel, stride, padding and shape is checked, so a file of another
    architecture is refused with a reason instead of being loaded wrongly.
    """
    _check(
        len(ours) == len(t7_modules),
        source,
        f"{len(t7_modules)} layers, expected {len(ours)} "
        f"({', '.join(type_name(m) for m in t7_modules)})",
    )
    pending_bias = None
    with torch.no_grad():
        for index, (target, module) in enumerate(zip(ours, t7_modules, strict=True)):
            where = f"{source}: layer {index + 1} ({type_name(module)})"
            _check(
                type_name(module) == EXPECTED[type(target)],
                where,
                f"wrong layer type, expected {EXPECTED[type(target)]}",
            )
            if isinstance(target, (nn.Conv2d, nn.ConvTranspose2d)):
                pending_bias = _load_conv(module, target, where)
                continue
            if isinstance(target, nn.BatchNorm2d):
                _load_norm(module, target, where, pending_bias)
            elif isinstance(target, nn.LeakyReLU):
                slope = float(field(module, "negval", 0.01))
                _check(abs(slope - target.negative_slope) < 1e-6, where, f"slope {slope}")
            elif pending_bias is not None and np.any(pending_bias != 0):
                raise Torch7Error(f"{where}: unexpected bias before a non-normalised layer")
            pending_bias = None


def inference_modules(obj: Any) -> list[Any]:
    """The leaf modules that compute something (pass-throughs such as Dropout dropped)."""
    return [m for m in leaf_modules(obj) if type_name(m) not in PASSTHROUGH]
