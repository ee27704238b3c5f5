"""Known weight sources: where a model's file comes from and how to check and convert it.

A *model name* (``deepsim-fc6``) is what the cache holds, one ``safetensors`` file each. A
:class:`Source` is one way to obtain it: a URL with the expected size and checksum (where known)
and the file's format. Several sources may provide the same model (the original Caffe file and
a PyTorch port); ``fetch`` tries them in registration order. A *group* (``ppgn``) names the
models one method needs, so a user fetches them with one command.

Other modules add their own sources with :func:`register_source` at import time and are listed
in ``SOURCE_MODULES`` so that ``weights list`` and ``fetch`` see them without importing models;
the PPGN ones live in :mod:`advpurify.weights.sources`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from advpurify.errors import AdvpurifyError

Converter = Callable[[Path], dict[str, torch.Tensor]]


class WeightsError(AdvpurifyError):
    """A weight file is missing, unknown, corrupt or of the wrong shape."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One way to obtain the weights of model ``provides`` (default: ``name``).

    ``converter`` is ``"package.module:function"``: it reads a file of this source's format and
    returns the complete, shape-checked state dict (it raises :class:`WeightsError` otherwise),
    so nothing is ever loaded half-way. It is resolved lazily, so registering a source imports
    nothing heavy. Without a converter the file must be a ``safetensors`` file already.
    """

    name: str
    format: str  # caffemodel | torch | torch7 | safetensors | binaryproto | npy
    url: str | None = None
    size: int | None = None
    sha256: str | None = None
    sha1: str | None = None  # some publishers (the Caffe model zoo) give only SHA-1
    filename: str | None = None
    provides: str | None = None
    converter: str | None = None
    description: str = ""

    @property
    def model(self) -> str:
        return self.provides or self.name

    @property
    def file_name(self) -> str:
        if self.filename:
            return self.filename
        if self.url:
            return self.url.rstrip("/").rsplit("/", 1)[-1]
        return f"{self.name}.{self.format}"

    def convert(self, path: Path) -> dict[str, torch.Tensor]:
        return resolve_converter(self.converter)(path)


_SOURCES: dict[str, Source] = {}
_GROUPS: dict[str, tuple[str, ...]] = {}
_DESCRIPTIONS: dict[str, str] = {}
_builtin_loaded = False


def register_source(source: Source, *, replace: bool = False) -> Source:
    """Add a source; a second source with the same name is an error unless ``replace``."""
    if not replace and source.name in _SOURCES and _SOURCES[source.name] != source:
        raise ValueError(f"weight source {source.name!r} is already registered")
    _SOURCES[source.name] = source
    return source


def unregister_source(name: str) -> None:
    _SOURCES.pop(name, None)


def register_group(name: str, models: tuple[str, ...], description: str = "") -> None:
    """``fetch NAME`` / ``import NAME FILE`` on a group act on each of its models."""
    _GROUPS[name] = tuple(models)
    if description:
        _DESCRIPTIONS[name] = description


def describe_model(name: str, description: str) -> None:
    _DESCRIPTIONS[name] = description


# Modules that register sources when imported; `weights list` shows all of them.
SOURCE_MODULES = ("advpurify.weights.sources", "advpurify.models.context_encoder")


def _load_builtin() -> None:
    global _builtin_loaded
    if not _builtin_loaded:
        _builtin_loaded = True
        for module in SOURCE_MODULES:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as error:
                if error.name != module:  # a real missing dependency, not an absent module
                    raise


def sources() -> list[Source]:
    _load_builtin()
    return list(_SOURCES.values())


def sources_for(model: str) -> list[Source]:
    """Every source that provides ``model``, in registration order."""
    return [s for s in sources() if s.model == model]


def model_names() -> list[str]:
    return sorted({s.model for s in sources()})


def groups() -> dict[str, tuple[str, ...]]:
    _load_builtin()
    return dict(_GROUPS)


def description(name: str) -> str:
    _load_builtin()
    return _DESCRIPTIONS.get(name, "")


def group_of(model: str) -> str | None:
    for group, members in groups().items():
        if model in members:
            return group
    return None


def expand(name: str) -> tuple[str, ...]:
    """A group name -> its models; a model name -> itself; anything else is an error."""
    all_groups = groups()
    if name in all_groups:
        return all_groups[name]
    if name in model_names():
        return (name,)
    known = sorted(set(all_groups) | set(model_names()))
    raise WeightsError(f"unknown weights {name!r} (known: {', '.join(known)})")


def resolve_converter(spec: str | None) -> Converter:
    if spec is None:
        return _load_safetensors
    module_name, _, attr = spec.partition(":")
    func: Any = getattr(importlib.import_module(module_name), attr)
    return func


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises several types for a bad header
        raise WeightsError(f"{path}: not a readable safetensors file ({error})") from None
