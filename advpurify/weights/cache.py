"""The weights cache: one converted ``safetensors`` file per model under ``$ADVPURIFY_HOME``.

Layout::

    <cache_home>/weights/<model>.safetensors   converted, ready to load
    <cache_home>/downloads/<file>[.part]       raw downloads (a .part is resumable)

Everything is written to a temporary file beside its target and ``os.replace``-d into place,
so a reader never sees a half-written file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from advpurify.files import atomic_output
from advpurify.paths import cache_home
from advpurify.weights.registry import WeightsError, group_of, sources_for
from advpurify.weights.state_dicts import read_safetensors


class WeightsNotFound(WeightsError):
    """The model's converted weights are not in the cache."""


def weights_dir() -> Path:
    return cache_home() / "weights"


def downloads_dir() -> Path:
    return cache_home() / "downloads"


def cached_path(model: str) -> Path:
    """Where the converted weights of ``model`` live (the file may not exist yet)."""
    return weights_dir() / f"{model}.safetensors"


def is_cached(model: str) -> bool:
    return cached_path(model).is_file()


def damage(path: Path) -> str | None:
    """Why a cached safetensors file is not whole (its header's sizes against the file's), or
    None where it is; reads the header only."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length > size - 8:
                return f"truncated ({size} bytes, the header alone needs {8 + length})"
            header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            return "unreadable header (not a JSON object)"
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        if not all(isinstance(end, int) for end in ends):
            return "unreadable header (offsets that are not integers)"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        return f"unreadable header ({type(error).__name__})"
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"truncated ({size} of {expected} bytes)"
    if size > expected:
        return f"wrong size ({size} bytes, its header says {expected})"
    return None


def not_found_message(model: str) -> str:
    fetch_name = group_of(model) or model
    if not any(source.url for source in sources_for(model)):
        # Nothing to download (a dead link): importing a file is the only way.
        return (
            f"weights {model} not found in {weights_dir()}: no download exists; run "
            f"`advpurify weights import {model} FILE` with a copy of the file"
        )
    return (
        f"weights {model} not found in {weights_dir()}: run `advpurify weights fetch "
        f"{fetch_name}` or `advpurify weights import {model} FILE`"
    )


def require(model: str) -> Path:
    """The cached file of ``model``, or :class:`WeightsNotFound` saying how to get it."""
    path = cached_path(model)
    if not path.is_file():
        raise WeightsNotFound(not_found_message(model))
    return path


def load_state_dict(model: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The cached weights of ``model`` (:class:`WeightsNotFound` saying how to get them)."""
    path = require(model)
    try:
        return read_safetensors(path, device)
    except WeightsError as error:
        raise WeightsError(f"{error}; re-import or fetch {model}") from None


def save_state_dict(
    model: str, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write ``state`` atomically as the cached weights of ``model``."""
    from safetensors.torch import save_file

    target = cached_path(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    with atomic_output(target) as tmp:
        save_file(tensors, tmp, metadata=metadata or {})
    return target
