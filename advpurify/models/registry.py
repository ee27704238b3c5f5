"""Every model by name: the one place that imports each model module, so its spec is registered.

``get_model(name)`` returns the :class:`~advpurify.models.spec.ModelSpec` of a registered model
(``googlenet``, ``efficientnet-lite0``, ``deepsim-fc6``, ``caffenet-fc6``, ``context-encoder``)
or of any torchvision / timm classifier (``timm:NAME``, ``torchvision:NAME``, a plain name).
Importing this module also registers every model's weight sources with :mod:`advpurify.weights`
(``advpurify weights list|fetch`` see them). ``advpurify export`` and ``bench`` build networks
from these specs; a test or plugin adds its own with :func:`register_model`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from advpurify.models import caffenet, classifiers, context_encoder, deepsim, ppgn  # noqa: F401
from advpurify.models.spec import (
    MODELS,
    OUTPUTS,
    ModelSpec,
    Preprocessing,
    UnknownModelError,
    register_model,
)

Exportable = ModelSpec  # what export/ and bench call a spec


def list_models() -> list[str]:
    """The registered models (aliases left out), sorted."""
    return sorted(name for name in MODELS if MODELS.get(name).name == name)


def get_model(name: str) -> ModelSpec:
    """The spec of ``name``: a registered model, or any torchvision / timm classifier."""
    if name in MODELS:
        return MODELS.get(name)
    try:
        return classifiers.classifier_spec(name)
    except classifiers.ClassifierError as error:
        raise UnknownModelError(f"{error}; registered models: {', '.join(list_models())}") from None


exportable_names = list_models
get_exportable = get_model


def register_exportable(
    name: str,
    builder: Callable[[str | None], nn.Module],
    *,
    sample_shape: tuple[int, ...] = (3, 224, 224),
    output: str = "logits",
    images: bool = True,
    input_range: tuple[float, float] = (0.0, 1.0),
    description: str = "",
) -> ModelSpec:
    """Register a network by its builder alone (tests, plugins); a taken name raises."""
    return register_model(
        ModelSpec(
            name=name,
            builder=builder,
            description=description,
            sample_shape=tuple(sample_shape),
            output=output,
            images=images,
            input_range=input_range,
        )
    )


__all__ = [
    "MODELS",
    "OUTPUTS",
    "Exportable",
    "ModelSpec",
    "Preprocessing",
    "UnknownModelError",
    "exportable_names",
    "get_exportable",
    "get_model",
    "list_models",
    "register_exportable",
    "register_model",
]
