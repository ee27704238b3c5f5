"""PPGN's two networks as one weights group: ``advpurify weights fetch ppgn`` gets both.

``deepsim-fc6`` (:mod:`advpurify.models.deepsim`): 4096-d fc6 code -> 3 x 256 x 256 [0, 1] RGB.
``caffenet-fc6`` (:mod:`advpurify.models.caffenet`): 3 x 227 x 227 [0, 1] RGB -> fc6 code.
"""

from __future__ import annotations

from advpurify.models import caffenet, deepsim
from advpurify.weights.registry import register_group

MODELS = (deepsim.SPEC.name, caffenet.SPEC.name)

register_group(
    "ppgn", MODELS, description="everything `--method ppgn` needs: generator G and encoder E"
)
