"""The purifier protocol and the registry every method registers into.

A purifier maps a float32 ``N x 3 x H x W`` tensor with values in ``[0, 1]`` to a tensor of the
same shape, on whatever device the input lives on. Stochastic purifiers draw their randomness
from one seed per image (``seeds``), so an image's output never depends on which other images
shared its batch: a resumed run, or a run with another batch size, gives identical bytes.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from advpurify.errors import AdvpurifyError


class ParamError(AdvpurifyError, ValueError):
    """An unknown method, an unknown parameter or a value out of range."""


@dataclasses.dataclass(frozen=True)
class Param:
    """One typed parameter of a method, with its default and allowed range."""

    name: str
    type: type
    default: Any
    help: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None

    def parse(self, value: Any) -> Any:
        """Convert ``value`` (often a string from the command line) and check its range."""
        try:
            if self.type is bool and isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                    raise ValueError(value)
                parsed: Any = lowered in {"1", "true", "yes", "on"}
            elif self.type is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            else:
                parsed = self.type(value)
        except (TypeError, ValueError):
            raise ParamError(
                f"parameter {self.name}={value!r}: expected {self.type.__name__}"
            ) from None
        if self.choices is not None and parsed not in self.choices:
            raise ParamError(
                f"parameter {self.name}={parsed!r}: must be one of {', '.join(self.choices)}"
            )
        if self.min is not None and parsed < self.min:
            raise ParamError(f"parameter {self.name}={parsed!r}: must be >= {self.min}")
        if self.max is not None and parsed > self.max:
            raise ParamError(f"parameter {self.name}={parsed!r}: must be <= {self.max}")
        return parsed

    def describe_range(self) -> str:
        if self.choices is not None:
            return "|".join(self.choices)
        low = "" if self.min is None else f"{self.min:g}"
        high = "" if self.max is None else f"{self.max:g}"
        return f"[{low}, {high}]" if (low or high) else ""


class Purifier:
    """Base class: subclasses set the class attributes and implement :meth:`purify`.

    ``stochastic``: the output depends on a seed. ``differentiable``: autograd through
    :meth:`purify` gives a useful gradient (attacks use it; otherwise they use BPDA).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    stochastic: ClassVar[bool] = False
    differentiable: ClassVar[bool] = False

    def __init__(self, device: str | torch.device = "cpu", **values: Any) -> None:
        self.device = torch.device(device)
        self.values = parse_params(type(self), values)

    def __getattr__(self, item: str) -> Any:
        # Parameters read as attributes: ``self.factor`` instead of ``self.values["factor"]``.
        values = self.__dict__.get("values")
        if values is not None and item in values:
            return values[item]
        raise AttributeError(item)

    def purify(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        check_images(images)
        if seeds is None:
            seeds = range(images.shape[0])
        seeds = [int(s) for s in seeds]
        if len(seeds) != images.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {images.shape[0]} images")
        out = self.purify(images, seeds)
        if out.shape != images.shape:
            raise RuntimeError(
                f"purifier {self.name} returned shape {tuple(out.shape)} "
                f"for input {tuple(images.shape)}"
            )
        return out

    def config(self) -> dict[str, Any]:
        """What identifies this purifier's output: its name and every parameter value."""
        return {"method": self.name, "params": dict(self.values)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.values.items())
        return f"{type(self).__name__}({args})"


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected N x 3 x H x W images, got shape {tuple(images.shape)}")
    if images.dtype != torch.float32:
        raise ValueError(f"expected float32 images, got {images.dtype}")


def parse_params(cls: type[Purifier], values: Mapping[str, Any]) -> dict[str, Any]:
    known = {p.name: p for p in cls.params}
    unknown = sorted(set(values) - set(known))
    if unknown:
        allowed = ", ".join(known) or "none"
        raise ParamError(
            f"method {cls.name}: unknown parameter {', '.join(unknown)} (parameters: {allowed})"
        )
    parsed = {name: p.default for name, p in known.items()}
    for name, value in values.items():
        parsed[name] = known[name].parse(value)
    return parsed


def image_seed(base_seed: int, key: str) -> int:
    """A per-image seed from the run's seed and the image's relative path: stable across runs."""
    return (
        zlib.crc32(key.encode("utf-8", "surrogateescape")) ^ (base_seed * 0x9E3779B1)
    ) & 0x7FFFFFFF


def generators(seeds: Iterable[int], device: torch.device) -> list[torch.Generator]:
    """One seeded generator per image, on the images' device."""
    gens = []
    for seed in seeds:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
        gens.append(gen)
    return gens


_REGISTRY: dict[str, type[Purifier]] = {}


def register(cls: type[Purifier]) -> type[Purifier]:
    """Class decorator: make a purifier available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    # Importing the package registers every built-in method.
    import advpurify.purifiers  # noqa: F401


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Purifier]:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ParamError(
            f"unknown method {name!r} (methods: {', '.join(sorted(_REGISTRY))})"
        ) from None


def create(name: str, device: str | torch.device = "cpu", **values: Any) -> Purifier:
    """Build a purifier by name; parameter values may be strings (from the command line)."""
    return method_class(name)(device=device, **values)


def parse_assignments(items: Iterable[str]) -> dict[str, str]:
    """``["factor=0.5", "mode=bilinear"]`` -> ``{"factor": "0.5", "mode": "bilinear"}``."""
    parsed: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ParamError(f"parameter {item!r}: expected name=value")
        parsed[name.strip()] = value.strip()
    return parsed


PurifyFn = Callable[[torch.Tensor], torch.Tensor]
