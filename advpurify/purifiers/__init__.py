"""All purification methods: importing this package registers each of them.

``create_purifier(name, **settings)`` builds one with typed settings (``factor=0.25``, not
``"0.25"``: strings from the command line are converted in ``advpurify.cli``);
``list_purifiers()`` names them; ``purifier_class(name)`` gives the class, its ``Settings``
dataclass and its flags (``stochastic``, ``differentiable``).
"""

from typing import Any

import torch

from advpurify.purifiers import dip, inpaint, ppgn, transforms  # noqa: F401  (registration)
from advpurify.purifiers.base import (
    PURIFIERS,
    ParamError,
    Purifier,
    SettingInfo,
    Settings,
    image_seed,
    parse_bool,
    parse_setting,
    setting_fields,
)


def list_purifiers() -> list[str]:
    """The names of every purification method, sorted."""
    return sorted(PURIFIERS.names())


def purifier_class(name: str) -> type[Purifier]:
    """The class of method ``name`` (:class:`ParamError` for an unknown one, listing them)."""
    return PURIFIERS.get(name)


def create_purifier(name: str, device: str | torch.device = "cpu", **settings: Any) -> Purifier:
    """Method ``name`` with typed settings, e.g. ``create_purifier("jpeg", quality=50)``."""
    return purifier_class(name).from_values(device=device, **settings)


def current_config(record: Any) -> Any:
    """A stored record with every purifier config inside (``{"method": ..., "params": ...}``)
    in today's form; see :meth:`Purifier.current_params`."""
    if isinstance(record, dict):
        record = {key: current_config(value) for key, value in record.items()}
        method, params = record.get("method"), record.get("params")
        if isinstance(method, str) and method in PURIFIERS.names() and isinstance(params, dict):
            record["params"] = purifier_class(method).current_params(params)
    return record


__all__ = [
    "PURIFIERS",
    "ParamError",
    "Purifier",
    "SettingInfo",
    "Settings",
    "create_purifier",
    "current_config",
    "image_seed",
    "list_purifiers",
    "parse_bool",
    "parse_setting",
    "purifier_class",
    "setting_fields",
]
