"""Known weight sources: where a model's file comes from and how to check and convert it.

A *model name* (``deepsim-fc6``) is what the cache holds, one ``safetensors`` file each. A
:class:`Source` is one way to obtain it: a URL with the expected size and checksum (where known),
the file's format, and the converter that turns such a file into the model's complete,
shape-checked state dict. Several sources may provide the same model (the original Caffe file
and a PyTorch port); ``fetch`` tries them in registration order. A *group* (``ppgn``) names the
models one method needs, so a user fetches them with one command.

The sources are facts of the models: each model's spec (``advpurify.models``) registers its own
when its module is imported. This package never imports models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from advpurify.errors import AdvpurifyError
from advpurify.registry import Registry

Converter = Callable[[Path], dict[str, torch.Tensor]]


class WeightsError(AdvpurifyError):
    """A weight file is missing, unknown, corrupt or of the wrong shape."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One way to obtain the weights of model ``provides`` (default: ``name``).

    ``converter(path)`` reads a file of this source's format and returns the complete,
    shape-checked state dict (it raises :class:`WeightsError` otherwise), so nothing is ever
    loaded half-way. Without a converter the file must be a ``safetensors`` file already.
    """

    name: str
    format: str  # caffemodel | torch | torch7 | safetensors | binaryproto | npy
    url: str | None = None
    size: int | None = None
    sha256: str | None = None
    sha1: str | None = None  # some publishers (the Caffe model zoo) give only SHA-1
    filename: str | None = None
    provides: str | None = None
    converter: Converter | None = None
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


SOURCES: Registry[Source] = Registry("weight source", error=WeightsError)
GROUPS: Registry[tuple[str, ...]] = Registry("weights group", error=WeightsError)
_DESCRIPTIONS: dict[str, str] = {}


def register_source(source: Source) -> Source:
    """Add a source; a second source with the same name raises."""
    return SOURCES.register(source.name, source)


def check_sources_free(sources: Sequence[Source]) -> None:
    """Raise if registering these sources would: a name taken, or given twice."""
    SOURCES.check_free([source.name for source in sources])


def unregister_source(name: str) -> None:
    SOURCES.unregister(name)


def register_group(name: str, models: tuple[str, ...], description: str = "") -> None:
    """``fetch NAME`` / ``import NAME FILE`` on a group act on each of its models."""
    GROUPS.register(name, tuple(models))
    if description:
        _DESCRIPTIONS[name] = description


def describe_model(name: str, description: str) -> None:
    _DESCRIPTIONS[name] = description


def sources() -> list[Source]:
    return SOURCES.values()


def sources_for(model: str) -> list[Source]:
    """Every source that provides ``model``, in registration order."""
    return [s for s in sources() if s.model == model]


def model_names() -> list[str]:
    return sorted({s.model for s in sources()})


def groups() -> dict[str, tuple[str, ...]]:
    return {name: GROUPS.get(name) for name in GROUPS}


def description(name: str) -> str:
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
