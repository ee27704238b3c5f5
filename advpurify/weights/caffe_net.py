"""Run a Caffe network in torch: a ``.prototxt`` plus its blobs -> an ``nn.Module``.

Covers the deploy-time layers of the classic Caffe models (LeNet, CaffeNet/AlexNet, VGG, the
DeePSiM generators): Convolution, Deconvolution, InnerProduct, Pooling (Caffe's ceil rounding),
ReLU/LeakyReLU, LRN, Softmax, Dropout, Reshape, Flatten, Concat, Eltwise, Sigmoid, TanH, Split.
Any other layer type is refused by name rather than silently skipped. It is how the project
checks its Caffe reader against OpenCV, and how users run Caffe models they bring.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from advpurify.files import atomic_output, sha256_file
from advpurify.weights.caffe import fit_blob, read_caffemodel
from advpurify.weights.prototxt import Message, read_prototxt
from advpurify.weights.registry import WeightsError
from advpurify.weights.state_dicts import read_safetensors

# Old prototxt files name layer types by their V1 enum.
_V1_NAMES = {
    "CONVOLUTION": "Convolution", "DECONVOLUTION": "Deconvolution",
    "INNER_PRODUCT": "InnerProduct", "POOLING": "Pooling", "RELU": "ReLU", "LRN": "LRN",
    "SOFTMAX": "Softmax", "DROPOUT": "Dropout", "FLATTEN": "Flatten", "CONCAT": "Concat",
    "ELTWISE": "Eltwise", "SIGMOID": "Sigmoid", "TANH": "TanH", "SPLIT": "Split",
    "DATA": "Data", "IMAGE_DATA": "ImageData", "MEMORY_DATA": "MemoryData",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "ACCURACY": "Accuracy", "SILENCE": "Silence",
}  # fmt: skip
_INPUT_TYPES = {"Input", "Data", "ImageData", "MemoryData", "HDF5Data", "DummyData", "WindowData"}
_TRAINING_ONLY = {"SoftmaxWithLoss", "Accuracy", "Silence", "EuclideanLoss"}
_WEIGHTED = {"Convolution", "Deconvolution", "InnerProduct"}


def _pair(param: Message, name: str, default: int) -> tuple[int, int]:
    """Caffe's kernel/stride/pad: a repeated field or its _h/_w variants."""
    values = param.all(name)
    if param.get1(f"{name}_h") is not None or param.get1(f"{name}_w") is not None:
        return int(param.get1(f"{name}_h", default)), int(param.get1(f"{name}_w", default))
    if not values:
        return default, default
    return (int(values[0]), int(values[-1]))


class _Eltwise(nn.Module):
    def __init__(self, operation: str, coeffs: Sequence[float]) -> None:
        super().__init__()
        self.operation, self.coeffs = operation, list(coeffs)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if self.operation == "PROD":
            out = xs[0]
            for x in xs[1:]:
                out = out * x
            return out
        if self.operation == "MAX":
            out = xs[0]
            for x in xs[1:]:
                out = torch.maximum(out, x)
            return out
        coeffs = self.coeffs or [1.0] * len(xs)
        return sum(c * x for c, x in zip(coeffs, xs, strict=True))


class _Lambda(nn.Module):
    def __init__(self, fn, text: str) -> None:
        super().__init__()
        self.fn, self.text = fn, text

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.fn(*xs)

    def extra_repr(self) -> str:
        return self.text


def _reshape_fn(dims: list[int]):
    def reshape(x: torch.Tensor) -> torch.Tensor:
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(shape)

    return reshape


def _build_layer(layer: Message, kind: str, blobs: list[torch.Tensor]) -> nn.Module:
    name = layer.get1("name", "?")

    def blob(index: int, shape: Sequence[int]) -> torch.Tensor:
        if index >= len(blobs):
            raise WeightsError(f"layer {name}: blob {index} missing from the weights")
        return fit_blob(f"layer {name} blob {index}", blobs[index], shape, legacy=True)

    if kind in ("Convolution", "Deconvolution"):
        param = layer.get1("convolution_param", Message())
        if not blobs:
            raise WeightsError(f"layer {name}: no weights in the caffemodel")
        weight = blobs[0].reshape(blobs[0].shape[-4:]) if blobs[0].dim() > 4 else blobs[0]
        out_ch, groups = int(param.get1("num_output")), int(param.get1("group", 1))
        kh, kw = (
            _pair(param, "kernel_size", 0)
            if param.get("kernel_size") or param.get("kernel_h")
            else (weight.shape[-2], weight.shape[-1])
        )
        kwargs = dict(
            stride=_pair(param, "stride", 1), padding=_pair(param, "pad", 0),
            dilation=_pair(param, "dilation", 1), groups=groups,
            bias=str(param.get1("bias_term", "true")).lower() != "false",
        )  # fmt: skip
        if kind == "Convolution":
            in_ch = weight.shape[1] * groups
            module: nn.Module = nn.Conv2d(in_ch, out_ch, (kh, kw), **kwargs)
        else:
            in_ch = weight.shape[0]
            module = nn.ConvTranspose2d(in_ch, out_ch, (kh, kw), **kwargs)
        with torch.no_grad():
            module.weight.copy_(blob(0, module.weight.shape))
            if module.bias is not None:
                module.bias.copy_(blob(1, module.bias.shape))
        return module
    if kind == "InnerProduct":
        param = layer.get1("inner_product_param", Message())
        if not blobs:
            raise WeightsError(f"layer {name}: no weights in the caffemodel")
        out_features = int(param.get1("num_output"))
        weight = blobs[0]
        in_features = weight.numel() // out_features
        linear = nn.Linear(
            in_features, out_features, bias=str(param.get1("bias_term", "true")).lower() != "false"
        )
        with torch.no_grad():
            if str(param.get1("transpose", "false")).lower() == "true":
                linear.weight.copy_(blob(0, (in_features, out_features)).t())
            else:
                linear.weight.copy_(blob(0, linear.weight.shape))
            if linear.bias is not None:
                linear.bias.copy_(blob(1, linear.bias.shape))
        axis = int(param.get1("axis", 1))
        return nn.Sequential(nn.Flatten(axis), linear)
    if kind == "Pooling":
        param = layer.get1("pooling_param", Message())
        pool = str(param.get1("pool", "MAX"))
        if str(param.get1("global_pooling", "false")).lower() == "true":
            fn = F.adaptive_max_pool2d if pool in ("MAX", "0") else F.adaptive_avg_pool2d
            return _Lambda(lambda x: fn(x, 1), f"global {pool}")
        kernel, stride = _pair(param, "kernel_size", 1), _pair(param, "stride", 1)
        pad = _pair(param, "pad", 0)
        if pool in ("MAX", "0"):
            return nn.MaxPool2d(kernel, stride, pad, ceil_mode=True)
        if pool in ("AVE", "1"):
            return nn.AvgPool2d(kernel, stride, pad, ceil_mode=True, count_include_pad=True)
        raise WeightsError(f"layer {name}: pooling {pool} not supported")
    if kind == "ReLU":
        slope = float(layer.get1("relu_param", Message()).get1("negative_slope", 0.0))
        return nn.LeakyReLU(slope) if slope else nn.ReLU()
    if kind == "LRN":
        param = layer.get1("lrn_param", Message())
        if str(param.get1("norm_region", "ACROSS_CHANNELS")) not in ("ACROSS_CHANNELS", "0"):
            raise WeightsError(f"layer {name}: LRN WITHIN_CHANNEL not supported")
        return nn.LocalResponseNorm(
            int(param.get1("local_size", 5)), float(param.get1("alpha", 1.0)),
            float(param.get1("beta", 0.75)), float(param.get1("k", 1.0)),
        )  # fmt: skip
    if kind == "Softmax":
        axis = int(layer.get1("softmax_param", Message()).get1("axis", 1))
        return nn.Softmax(dim=axis)
    if kind in ("Dropout", "Split"):
        return nn.Identity()
    if kind == "Sigmoid":
        return nn.Sigmoid()
    if kind == "TanH":
        return nn.Tanh()
    if kind == "Flatten":
        param = layer.get1("flatten_param", Message())
        return nn.Flatten(int(param.get1("axis", 1)), int(param.get1("end_axis", -1)))
    if kind == "Reshape":
        param = layer.get1("reshape_param", Message())
        dims = [int(d) for d in param.get1("shape", Message()).all("dim")]
        return _Lambda(_reshape_fn(dims), f"reshape {dims}")
    if kind == "Concat":
        param = layer.get1("concat_param", Message())
        axis = int(param.get1("axis", param.get1("concat_dim", 1)))
        return _Lambda(lambda *xs: torch.cat(xs, dim=axis), f"concat axis {axis}")
    if kind == "Eltwise":
        param = layer.get1("eltwise_param", Message())
        operation = str(param.get1("operation", "SUM"))
        operation = {"0": "PROD", "1": "SUM", "2": "MAX"}.get(operation, operation)
        return _Eltwise(operation, [float(c) for c in param.all("coeff")])
    raise WeightsError(f"layer {name}: Caffe layer type {kind} is not supported")


def _layer_kind(layer: Message) -> str:
    kind = str(layer.get1("type", ""))
    return _V1_NAMES.get(kind, kind)


def _is_training_only(layer: Message) -> bool:
    for include in layer.all("include"):
        if str(include.get1("phase", "")) in ("TRAIN", "0"):
            return True
    return False


class CaffeNetwork(nn.Module):
    """A prototxt network with its weights; ``forward(*inputs)`` returns the output blob(s)."""

    def __init__(
        self,
        net: Message,
        blobs: Mapping[str, Sequence[torch.Tensor]],
        outputs: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        layers = net.all("layer") or net.all("layers")
        self.input_names: list[str] = [str(n) for n in net.all("input")]
        self.steps: list[tuple[str, list[str], list[str]]] = []
        self.layers = nn.ModuleDict()
        used = set()
        for index, layer in enumerate(layers):
            kind = _layer_kind(layer)
            if _is_training_only(layer) or kind in _TRAINING_ONLY:
                continue
            tops = [str(t) for t in layer.all("top")]
            if kind in _INPUT_TYPES:
                self.input_names.extend(t for t in tops if t not in ("label",))
                continue
            name = str(layer.get1("name", f"layer{index}"))
            layer_blobs = list(blobs.get(name, ()))
            if kind in _WEIGHTED:
                used.add(name)
            key = f"l{index}_" + re.sub(r"\W", "_", name)
            self.layers[key] = _build_layer(layer, kind, layer_blobs)
            self.steps.append((key, [str(b) for b in layer.all("bottom")], tops))
        unused = sorted(set(blobs) - used)
        if unused and not used:
            raise WeightsError(f"no layer of the prototxt matches the weights ({unused[:5]})")
        if not self.steps:
            raise WeightsError("the prototxt has no layer to run")
        self.output_names = list(outputs) if outputs else self.steps[-1][2]

    @classmethod
    def from_files(
        cls, prototxt: Path | str, weights: Path | str, outputs: Sequence[str] | None = None
    ) -> CaffeNetwork:
        """``weights``: a ``.caffemodel``, or a ``.safetensors`` from ``weights convert``."""
        return cls(read_prototxt(prototxt), load_blobs(weights), outputs).eval()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"expected inputs {self.input_names}, got {len(inputs)} tensors")
        values = dict(zip(self.input_names, inputs, strict=True))
        for key, bottoms, tops in self.steps:
            out = self.layers[key](*[values[b] for b in bottoms])
            for top in tops:
                values[top] = out
        outs = tuple(values[name] for name in self.output_names)
        return outs[0] if len(outs) == 1 else outs


def load_blobs(path: Path | str) -> dict[str, list[torch.Tensor]]:
    """Layer name -> blobs, from a ``.caffemodel`` or a converted ``.safetensors``."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        grouped: dict[str, dict[int, torch.Tensor]] = {}
        for key, tensor in read_safetensors(path).items():
            layer, _, index = key.rpartition(".")
            if not layer or not index.isdigit():
                raise WeightsError(f"{path}: key {key!r} is not <layer>.<blob index>")
            grouped.setdefault(layer, {})[int(index)] = tensor
        return {k: [v[i] for i in sorted(v)] for k, v in grouped.items()}
    model = read_caffemodel(path)
    return {
        layer.name: [torch.from_numpy(b.data.copy()) for b in layer.blobs]
        for layer in model.layers
        if layer.blobs
    }


_NEEDS_BLOBS = _WEIGHTED | {"BatchNorm", "Scale", "PReLU", "Bias", "Embed"}


def convert_caffe(
    prototxt: Path | str, caffemodel: Path | str, output: Path | str
) -> tuple[int, Path]:
    """Write the blobs of the prototxt's layers as ``<layer>.<index>`` safetensors (atomic).

    Every layer whose type carries weights must find them in the caffemodel; the file is
    written only when all are present. Returns (number of blobs, path).
    """

    from safetensors.torch import save_file

    from advpurify.weights.caffe import blobs_state_dict

    output = Path(output)
    if output.suffix.lower() != ".safetensors":
        raise WeightsError(f"{output}: the output must end in .safetensors")
    net = read_prototxt(prototxt)
    model = read_caffemodel(caffemodel)
    have = model.blobs()
    wanted, missing = [], []
    for layer in net.all("layer") or net.all("layers"):
        name, kind = str(layer.get1("name", "")), _layer_kind(layer)
        if name in have:
            wanted.append(name)
        elif kind in _NEEDS_BLOBS and not _is_training_only(layer):
            missing.append(f"{name} ({kind})")
    if missing:
        raise WeightsError(f"{caffemodel}: no weights for layer(s) {', '.join(missing[:8])}")
    if not wanted:
        raise WeightsError(f"{caffemodel}: none of the prototxt's layers has weights")
    state = {k: v for k, v in blobs_state_dict(model).items() if k.rpartition(".")[0] in wanted}
    metadata = {
        "format": "caffe blobs: <layer>.<index>, 0 = weights, 1 = bias",
        "prototxt": Path(prototxt).name,
        "caffemodel": Path(caffemodel).name,
        "caffemodel_sha256": sha256_file(caffemodel),
    }
    with atomic_output(output) as tmp:
        save_file(state, tmp, metadata=metadata)
    return len(state), output
