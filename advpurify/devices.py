"""Choosing the torch device: explicit choices fail loudly, ``auto`` never does."""

from __future__ import annotations

import torch

from advpurify.errors import AdvpurifyError


class DeviceError(AdvpurifyError, RuntimeError):
    """The requested device is not present on this machine."""


def resolve_device(name: str = "auto") -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but CUDA is not available here")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device {name!r} (use auto, cpu or cuda)")
