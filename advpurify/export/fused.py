"""One graph for deployment: purify, then classify, ``[0, 1]`` RGB in, logits out.

A purifier becomes an ``nn.Module`` by wrapping its own ``purify``; the few methods whose torch
code uses an operator ONNX lacks get an equivalent graph form here (median: TopK instead of
``torch.median``), and the export's parity check compares the ONNX file with the purifier's own
code, so an equivalent form that is not equivalent fails loudly. Methods that are not a fixed
function of their input refuse, saying why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from advpurify.errors import AdvpurifyError
from advpurify.purifiers import Purifier, purifier_class
from advpurify.purifiers.transforms import median_graph

# Why these methods cannot be one ONNX graph. (Their torch implementations stay available.)
NOT_EXPORTABLE: dict[str, str] = {
    "dip": "Deep Image Prior fits a freshly initialised network to every image with hundreds of "
    "Adam steps; that optimisation loop is not a fixed graph",
    "ppgn": "the PPGN sampler iterates gradient steps through the generator, encoder and "
    "classifier; a loop over gradients is not a fixed graph (the generator and encoder "
    "themselves export as models)",
    "jpeg": "a JPEG encode/decode round trip has no ONNX operator (libjpeg is not a graph op)"
    ": run it before the graph",
    "tvm": "total-variation minimisation is an iterative solver whose per-channel stopping test "
    "is data-dependent control flow; a graph would run a fixed number of steps and give "
    "different images",
    "randpad": "random resize-and-pad draws fresh randomness per image from its seed; a graph "
    "would freeze a single draw, which is exactly what the defence must not do",
}


class NotExportableError(AdvpurifyError, ValueError):
    """A purifier that cannot be expressed as one fixed graph."""


class PurifierModule(nn.Module):
    """A deterministic purifier as an ``nn.Module`` (its networks become submodules)."""

    def __init__(self, purifier: Purifier) -> None:
        super().__init__()
        self.purifier = purifier
        self.method = purifier.name
        self.nets = nn.ModuleDict(
            {k: v for k, v in vars(purifier).items() if isinstance(v, nn.Module)}
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Deterministic purifiers ignore seeds; passing none keeps the batch axis dynamic.
        return self.purifier.purify(images, ())

    def extra_repr(self) -> str:
        return repr(self.purifier)


class MedianGraph(nn.Module):
    """``median`` in its graph form (:func:`median_graph`, TopK), whatever the device.

    The purifier itself takes OpenCV's ``medianBlur`` on the CPU for the same values.
    """

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.kernel = int(kernel)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return median_graph(images, self.kernel)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}"


GRAPH_FORMS: dict[str, Callable[[Purifier], nn.Module]] = {
    "median": lambda purifier: MedianGraph(purifier.settings.kernel),
}


def refusal(name: str) -> str | None:
    """Why method ``name`` cannot be exported, or None when it can."""
    if name in NOT_EXPORTABLE:
        return NOT_EXPORTABLE[name]
    if purifier_class(name).stochastic:
        return "it is stochastic: a graph would freeze one random draw"
    return None


def build_purifier(name: str, params: Mapping[str, Any] | None = None) -> Purifier:
    """The purifier on the CPU, refusing (one line, with the reason) what is not exportable."""
    reason = refusal(name)
    if reason:
        raise NotExportableError(f"purifier {name} cannot be exported: {reason}")
    cls = purifier_class(name)
    values = dict(params or {})
    if any(f.name == "backend" for f in dataclasses.fields(cls.Settings)):
        values.setdefault("backend", "torch")  # its networks must be torch modules to trace
    return cls.from_values(device="cpu", **values)


def purifier_graph(purifier: Purifier) -> nn.Module:
    """The module that is exported for ``purifier`` (its graph form where one is needed)."""
    form = GRAPH_FORMS.get(purifier.name)
    return form(purifier) if form else PurifierModule(purifier)


class Fused(nn.Module):
    """Purify, then classify: ``[0, 1]`` RGB in, logits out."""

    def __init__(self, purifier: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.purifier = purifier
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.purifier(images))


def fused_pair(purifier: Purifier, classifier: nn.Module) -> tuple[Fused, Fused]:
    """``(to_export, reference)``: the graph form, and the purifier's own code for parity."""
    return (
        Fused(purifier_graph(purifier), classifier).eval(),
        Fused(PurifierModule(purifier), classifier).eval(),
    )
