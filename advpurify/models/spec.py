"""One specification per model, as torchvision's ``Weights`` and timm's ``pretrained_cfg``.

A :class:`ModelSpec` carries everything known about one network: how to build it, where its
weights come from (sources with checksums and the converter that checks every shape), the
preprocessing its weights were trained with, and what one input looks like. Each model module
declares its spec and calls :func:`register_model` when imported; that also registers the
spec's weight sources with :mod:`advpurify.weights` (which never imports models).
``advpurify.models.registry`` imports every model module: look models up there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from advpurify.errors import AdvpurifyError
from advpurify.registry import Registry
from advpurify.weights.registry import (
    Source,
    check_sources_free,
    describe_model,
    register_source,
)

OUTPUTS = ("logits", "image", "features")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Builder = Callable[[str | None], nn.Module]


class UnknownModelError(AdvpurifyError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a classifier wants its input: resize the shorter side, centre crop, normalise."""

    resize_size: int = 256
    crop_size: int = 224
    interpolation: str = "bilinear"  # bilinear | bicubic
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build one network, its weights, its preprocessing and what it takes.

    ``builder(weights)``: ``weights`` is ``None`` (the default weights), ``"random"`` (the
    architecture alone: benchmarks, offline tests) or a path. ``sample_shape``: one input
    without the batch axis. ``images``: the input is a ``[0, 1]`` RGB image (parity checks then
    use real photographs); otherwise inputs are drawn uniformly from ``input_range``. ``output``:
    logits (top-1 agreement is checked), image or features. ``preprocessing``: a classifier's
    resize, crop and normalisation (inside the built module). ``sources``: where the default
    weights come from, with checksums and converter (registered with the weights cache);
    empty where a library's own hash-checked cache provides them (torchvision, a PyPI
    package). ``weights_name``: the name of those weights in the cache (default: ``name``).
    ``weights_note``: where the default weights come from, in words.
    """

    name: str
    builder: Builder
    description: str = ""
    sample_shape: tuple[int, ...] = (3, 224, 224)
    output: str = "logits"
    images: bool = True
    input_range: tuple[float, float] = (0.0, 1.0)
    preprocessing: Preprocessing | None = None
    sources: tuple[Source, ...] = ()
    weights_name: str | None = None
    weights_note: str = ""
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ValueError(f"output {self.output!r}: use one of {', '.join(OUTPUTS)}")
        for source in self.sources:
            if source.model != self.cache_name:
                raise ValueError(
                    f"source {source.name} provides {source.model}, not {self.cache_name}"
                )

    @property
    def cache_name(self) -> str:
        """The name of this model's weights in the cache."""
        return self.weights_name or self.name

    def build(self, weights: str | None = None) -> nn.Module:
        if weights != "random":
            return self.builder(weights).eval()
        # Seeded: "random" is the same network every time (and the same ONNX cache entry).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return self.builder(weights).eval()


MODELS: Registry[ModelSpec] = Registry("model", error=UnknownModelError)
"""Every registered model by name and by alias (``advpurify.models.registry`` fills it)."""


def register_model(spec: ModelSpec) -> ModelSpec:
    """Make ``spec`` known by its name and aliases, and its weight sources to the cache."""
    # Everything checked before anything is registered: a refused spec leaves no trace.
    names = [spec.name, *spec.aliases]
    MODELS.check_free(names)
    check_sources_free(spec.sources)
    for name in names:
        MODELS.register(name, spec)
    if spec.sources:
        describe_model(spec.cache_name, spec.description)
        for source in spec.sources:
            register_source(source)
    return spec
