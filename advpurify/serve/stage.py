"""What a deployment calls: the library's own purifier and classifier, nothing re-implemented.

The purifier deployment calls :func:`purifier_for`, the classifier deployment
:func:`classifier_for`; a served answer is therefore the library's answer for the same image
and seed (``tests/test_serve.py`` checks bytes and top-5 against direct library calls).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from advpurify.devices import resolve_device
from advpurify.models.classifiers import LoadedClassifier, load_classifier
from advpurify.purifiers import Purifier, create_purifier


def purifier_for(method: str, params: Mapping[str, Any], device: str) -> Purifier:
    """The purifier ``method`` with typed ``params`` on ``device`` (``auto``: a GPU if any)."""
    return create_purifier(method, device=resolve_device(device), **dict(params))


def classifier_for(
    name: str, backend: str, device: str, weights: str | None = None
) -> LoadedClassifier:
    """The classifier ``name`` on ``backend`` (``auto``: TensorRT / ORT CUDA / ORT CPU)."""
    return load_classifier(name, backend=backend, device=resolve_device(device), weights=weights)


def purify(purifier: Purifier, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """``N x 3 x H x W`` images of one size -> purified, on the CPU."""
    with torch.inference_mode():
        out = purifier(images.to(purifier.device), seeds)
    return out.detach().float().cpu()


def logits(classifier: LoadedClassifier, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Logits for ``3 x H x W`` images of any sizes: each is resized and centre-cropped as the
    classifier's own preprocessing does, then all run as one batch."""
    with torch.inference_mode():
        prepared = torch.stack([classifier.prepare(image[None])[0] for image in images])
        return classifier.logits(prepared, batch_size=max(1, len(images)))
