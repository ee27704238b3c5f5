"""Reading a state dict from a weights file: the one loader every model and the cache use.

``.safetensors`` through safetensors; anything else (``.pt``, ``.pth``) through ``torch.load`` with
``weights_only=True`` (no code runs from the file). A checkpoint that nests its state dict under
a key (``state_dict``, ``model``, a training checkpoint's ``G``) is unwrapped; entries that are
not tensors (an epoch count) are dropped. Any failure is one :class:`WeightsError` line naming
the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from advpurify.errors import load_error
from advpurify.weights.registry import WeightsError

NESTED_KEYS = ("state_dict", "model", "model_state_dict")


def read_safetensors(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        return load_file(str(path), device=str(device))
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such weights file") from None
    except Exception as error:  # safetensors raises several types for a bad header
        raise WeightsError(f"{path}: not a readable safetensors file ({error})") from None


def read_state_dict(
    path: str | os.PathLike[str],
    *,
    nested: Sequence[str] = NESTED_KEYS,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or PyTorch (``.pt``, ``.pth``) file, keyed as saved.

    ``nested``: keys under which a checkpoint may hold the state dict (the first one present
    whose value is a mapping is used).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return read_safetensors(path, device)
    try:
        loaded = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # pickle, zip and unpickler errors all mean "unreadable"
        raise WeightsError(f"{path}: not a readable checkpoint ({load_error(error)})") from None
    if isinstance(loaded, Mapping):
        for key in nested:
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping):
        raise WeightsError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    state = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError(f"{path}: not a state dict of tensors")
    return state
