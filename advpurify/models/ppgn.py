"""PPGN's two feed-forward networks, registered for ``advpurify export`` and the backends.

``deepsim-fc6``: 4096-d fc6 code -> 3 x 256 x 256 [0, 1] RGB image (input: non-negative codes).
``caffenet-fc6``: 3 x 227 x 227 [0, 1] RGB image -> 4096-d fc6 code after ReLU.
"""

from __future__ import annotations

from torch import nn


def _generator(weights: str | None) -> nn.Module:
    from advpurify.models.deepsim import build_generator

    return build_generator(weights)


def _encoder(weights: str | None) -> nn.Module:
    from advpurify.models.caffenet import build_encoder

    return build_encoder(weights)


def _register_exportable() -> None:
    from advpurify.models.registry import register_exportable

    register_exportable(
        "deepsim-fc6",
        _generator,
        sample_shape=(4096,),
        output="image",
        images=False,
        input_range=(0.0, 8.0),
        description="PPGN generator G (DeePSiM fc6): fc6 code -> 256x256 [0, 1] RGB",
    )
    register_exportable(
        "caffenet-fc6",
        _encoder,
        sample_shape=(3, 227, 227),
        output="features",
        description="PPGN encoder E (CaffeNet to fc6 + ReLU): [0, 1] RGB -> 4096-d code",
    )


_register_exportable()
