"""advpurify: adversarial purification.

Purify an image, then classify it; or hand the defended model to any torch attack code::

    import advpurify

    purifier = advpurify.create_purifier("rescale", factor=0.5)
    classifier = advpurify.load_classifier("efficientnet-lite0")
    model = advpurify.DefendedClassifier(purifier, classifier)

    image = advpurify.load_image("photo.jpg")[None]  # 1 x 3 x H x W, values in [0, 1]
    logits = model(image)
    print(advpurify.class_name(int(logits.argmax())))

``advpurify.list_purifiers()`` names every method; each takes typed settings
(``create_purifier("jpeg", quality=50)``). Stochastic methods (``randpad``, ``dip``, ``ppgn``)
need one seed per image: ``purifier(images, seeds=[...])``, and
``DefendedClassifier(..., seeds=[...])`` for the attacker's draws (``eot=N`` averages N).
"""

from __future__ import annotations

__version__ = "0.1.0"

import torch

from advpurify.attacks import DefendedClassifier
from advpurify.devices import resolve_device
from advpurify.images import load_image
from advpurify.models.classifiers import Classifier, build_classifier
from advpurify.models.imagenet import class_name
from advpurify.models.registry import ModelSpec, get_model, list_models
from advpurify.purifiers import (
    ParamError,
    Purifier,
    create_purifier,
    list_purifiers,
    purifier_class,
)


def load_classifier(
    name: str,
    *,
    weights: str | None = None,
    device: str | torch.device = "cpu",
) -> Classifier:
    """ImageNet classifier ``name`` as an ``nn.Module`` in eval mode on ``device``.

    ``[0, 1]`` RGB ``N x 3 x H x W`` in (resized and centre-cropped inside), logits out, with
    gradients. ``weights``: None (the default pretrained weights), a local file, or ``"random"``.
    Names: ``googlenet``, ``efficientnet-lite0``, ``timm:NAME``, ``torchvision:NAME``.
    """
    target = resolve_device(device) if isinstance(device, str) else device
    return build_classifier(name, weights=weights).to(target)


__all__ = [
    "Classifier",
    "DefendedClassifier",
    "ModelSpec",
    "ParamError",
    "Purifier",
    "__version__",
    "class_name",
    "create_purifier",
    "get_model",
    "list_models",
    "list_purifiers",
    "load_classifier",
    "load_image",
    "purifier_class",
]
