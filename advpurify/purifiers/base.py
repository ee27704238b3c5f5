"""The purifier protocol, typed settings per method, and the registry every method joins.

A purifier maps a float32 ``N x 3 x H x W`` tensor with values in ``[0, 1]`` to a tensor of the
same shape, on whatever device the input lives on. Each method declares its settings as a frozen
dataclass (a :class:`Settings` subclass whose fields carry their range with :func:`setting`);
values are checked when the dataclass is built, so a purifier never holds a bad value.

Stochastic purifiers draw their randomness from one seed per image (``seeds``, required), so an
image's output never depends on which other images shared its batch: a resumed run, or a run
with another batch size, gives identical bytes. :func:`image_seed` derives a stable per-image
seed from a run's seed and the image's relative path.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import typing
import zlib
from collections.abc import Iterable, Mapping, Sequence, Set
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from advpurify.devices import resolve_device
from advpurify.errors import AdvpurifyError
from advpurify.registry import Registry


class ParamError(AdvpurifyError, ValueError):
    """An unknown method, an unknown setting or a value out of range."""


class ImageError(AdvpurifyError, ValueError):
    """An image this purifier cannot take with its settings (e.g. smaller than its window)."""


def setting(
    default: Any,
    help: str = "",
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A settings field with its default, a one-line help and its allowed range or choices."""
    metadata = {"help": help, "min": min, "max": max, "choices": choices}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class SettingInfo:
    """One field of a settings class, as the CLI and ``advpurify methods`` show it."""

    name: str
    type: type
    optional: bool
    default: Any
    help: str
    min: float | None
    max: float | None
    choices: tuple[str, ...] | None

    def describe_range(self) -> str:
        if self.choices is not None:
            return "|".join(self.choices)
        low = "" if self.min is None else _bound(self.min)
        high = "" if self.max is None else _bound(self.max)
        return f"[{low}, {high}]" if (low or high) else ""


def _bound(value: float) -> str:
    """A range's end as written: ``1000000``, not ``1e+06``; ``0.9999``, ``1e-06``."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of every method's settings: fields are checked (type, finite, range, choices)."""

    def __post_init__(self) -> None:
        for info in setting_fields(type(self)):
            value = getattr(self, info.name)
            checked = _check_value(info, value)
            if checked is not value:
                object.__setattr__(self, info.name, checked)
        self.validate()

    def validate(self) -> None:
        """Checks that involve more than one field's range (override where needed)."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def setting_fields(cls: type[Settings]) -> list[SettingInfo]:
    """The fields of a settings class with their resolved types and ranges."""
    hints = typing.get_type_hints(cls)
    infos = []
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) == 1 and type(None) in typing.get_args(annotation)
        base = args[0] if optional else annotation
        meta = field.metadata
        infos.append(
            SettingInfo(
                name=field.name,
                type=base,
                optional=optional,
                default=field.default,
                help=meta.get("help", ""),
                min=meta.get("min"),
                max=meta.get("max"),
                choices=meta.get("choices"),
            )
        )
    return infos


TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def parse_bool(text: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` (any case); ``ValueError`` for anything else."""
    word = text.strip().lower()
    if word not in TRUE_WORDS | FALSE_WORDS:
        raise ValueError(text)
    return word in TRUE_WORDS


def parse_setting(info: SettingInfo, text: str) -> Any:
    """A setting's value from text (``-p`` values, query strings); ``none`` clears an optional
    setting. The typed value is checked against the setting's range when it is used."""
    text = text.strip()
    if info.optional and text.lower() == "none":
        return None
    try:
        return parse_bool(text) if info.type is bool else info.type(text)
    except (TypeError, ValueError):
        raise ParamError(f"parameter {info.name}={text!r}: expected {info.type.__name__}") from None


def _check_value(info: SettingInfo, value: Any) -> Any:
    where = f"parameter {info.name}={value!r}"
    if value is None and info.optional:
        return value
    kind = info.type
    if kind in (int, float) and isinstance(value, np.integer | np.floating):
        value = value.item()  # numpy scalars, as seeds take them
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind in (int, float):
        ok = isinstance(value, kind) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ParamError(f"{where}: expected {kind.__name__}, got {type(value).__name__}")
    if kind in (int, float) and not math.isfinite(value):
        raise ParamError(f"{where}: must be a finite number")
    if info.choices is not None and value not in info.choices:
        raise ParamError(f"{where}: must be one of {', '.join(info.choices)}")
    if info.min is not None and value < info.min:
        raise ParamError(f"{where}: must be >= {_bound(info.min)}")
    if info.max is not None and value > info.max:
        raise ParamError(f"{where}: must be <= {_bound(info.max)}")
    return value


@dataclasses.dataclass(frozen=True)
class NoSettings(Settings):
    """For a method without settings."""


S = TypeVar("S", bound=Settings)


class Purifier:
    """Base class: subclasses set the class attributes and implement :meth:`purify`.

    ``Settings``: the method's settings dataclass. ``stochastic``: the output depends on a seed
    (callers must pass one seed per image). ``differentiable``: autograd through :meth:`purify`
    gives a useful gradient (attacks use it; otherwise they use BPDA).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Settings: ClassVar[type[Settings]] = NoSettings
    stochastic: ClassVar[bool] = False
    differentiable: bool = False  # a class default; an instance may refine it (its backend)

    def __init__(self, settings: Settings | None = None, *, device: str | torch.device = "cpu"):
        settings = self.Settings() if settings is None else settings
        if type(settings) is not self.Settings:
            raise TypeError(
                f"purifier {self.name} takes {self.Settings.__name__}, "
                f"got {type(settings).__name__}"
            )
        self.settings = settings
        self.device = resolve_device(str(device))

    @classmethod
    def from_values(cls, device: str | torch.device = "cpu", **values: Any) -> Purifier:
        """The purifier with the given typed setting values (the rest at their defaults)."""
        return cls(make_settings(cls, values), device=device)

    def purify(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        check_images(images)
        if seeds is None:
            if self.stochastic and images.shape[0]:
                raise ValueError(
                    f"purifier {self.name} is stochastic: pass one seed per image (seeds=...)"
                )
            seeds = [0] * images.shape[0]  # unused by a deterministic method
        seeds = check_seeds(seeds, images.shape[0])
        if images.shape[0] == 0:
            return images.clone()
        out = self.purify(images, seeds)
        if out.shape != images.shape:
            raise RuntimeError(
                f"purifier {self.name} returned shape {tuple(out.shape)} "
                f"for input {tuple(images.shape)}"
            )
        return out.contiguous()  # a codec's H x W x C buffer comes back as a permuted view

    def config(self) -> dict[str, Any]:
        """What identifies this purifier's output: its name and every setting's value."""
        return {"method": self.name, "params": self.settings.as_dict()}

    @classmethod
    def current_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` as an earlier version recorded them in ``config()``, in today's form (so
        a resume compares like with like); unchanged where the form has not changed."""
        return params

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings.as_dict().items())
        return f"{type(self).__name__}({args})"


def make_settings(cls: type[Purifier], values: dict[str, Any]) -> Settings:
    """``cls.Settings(**values)``, refusing unknown names with the method's known settings."""
    known = [f.name for f in dataclasses.fields(cls.Settings)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        allowed = ", ".join(known) or "none"
        raise ParamError(
            f"method {cls.name}: unknown parameter {', '.join(unknown)} (parameters: {allowed})"
        )
    return cls.Settings(**values)


def check_images(images: torch.Tensor) -> None:
    """``N x 3 x H x W`` float32 with every value in ``[0, 1]`` (NaN and inf refused)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected N x 3 x H x W images, got shape {tuple(images.shape)}")
    if images.shape[0] and 0 in images.shape[2:]:
        raise ValueError(
            f"images of {images.shape[3]} x {images.shape[2]} pixels: nothing to purify"
        )
    if images.dtype != torch.float32:
        raise ValueError(f"expected float32 images, got {images.dtype}")
    if images.numel():
        # One pass for both bounds; NaN fails both comparisons. Catches normalised inputs too.
        low, high = (float(v) for v in torch.aminmax(images.detach()))
        if not (0.0 <= low and high <= 1.0):
            raise ValueError(
                f"images must hold values in [0, 1]: found {low:.9g} to {high:.9g} "
                "(NaN or inf, or normalised images?)"
            )


SEED_LIMIT = 2**64
"""Seeds are integers in ``0 .. 2**64 - 1`` (what ``torch.Generator.manual_seed`` takes)."""


def check_seeds(seeds: Sequence[int], n: int) -> list[int]:
    """``seeds`` as a list of ``n`` plain ints, each an integer (no bool, float or str) in
    ``0 .. 2**64 - 1``."""
    zero_dim = getattr(seeds, "ndim", None) == 0  # a 0-d tensor or array is one number
    if (
        isinstance(seeds, str | bytes | Mapping | Set)
        or not isinstance(seeds, Iterable)
        or zero_dim
    ):
        raise ValueError(f"seeds={seeds!r}: expected a sequence of integers, one per image")
    checked = []
    for seed in seeds:
        if isinstance(seed, bool):
            raise ValueError(f"seeds: {seed!r} is not an integer")
        try:
            value = operator.index(seed)  # ints, numpy ints, integer tensors; not floats
        except TypeError:
            raise ValueError(f"seeds: {seed!r} is not an integer") from None
        if not 0 <= value < SEED_LIMIT:
            raise ValueError(f"seeds: {value} is outside 0..2**64-1")
        checked.append(value)
    if len(checked) != n:
        raise ValueError(f"{len(checked)} seeds for a batch of {n} images")
    return checked


def image_seed(base_seed: int, key: str) -> int:
    """A per-image seed from the run's seed (0..2**64-1, as a generator takes) and the image's
    relative path: stable across runs, and distinct for distinct run seeds."""
    if isinstance(base_seed, bool) or not isinstance(key, str):
        raise TypeError(f"image_seed(base_seed: int, key: str), not ({base_seed!r}, {key!r})")
    try:
        base_seed = operator.index(base_seed)  # ints, numpy ints, integer tensors
    except TypeError:
        raise TypeError(f"image_seed: base seed {base_seed!r} is not an integer") from None
    if not 0 <= base_seed < 2**64:
        raise ValueError(f"seed {base_seed}: must be in 0..2**64-1")
    low = (zlib.crc32(key.encode("utf-8", "surrogateescape")) ^ (base_seed * 0x9E3779B1)) & (
        0x7FFFFFFF
    )
    # The seed's bits above the 31 that ``low`` mixes, kept apart: seeds below 2**31 give the
    # values they always gave, and seeds 2**31 apart no longer collide.
    return low | (base_seed >> 31) << 31


def generators(seeds: Iterable[int], device: torch.device) -> list[torch.Generator]:
    """One seeded generator per image, on the images' device."""
    gens = []
    for seed in seeds:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
        gens.append(gen)
    return gens


PURIFIERS: Registry[type[Purifier]] = Registry("method", error=ParamError)
"""Every method by name; ``advpurify.purifiers`` imports the modules that fill it."""

P = TypeVar("P", bound=type[Purifier])


def register(cls: P) -> P:
    """Class decorator: make a purifier available by its ``name`` (a second one raises)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    PURIFIERS.register(cls.name, cls)
    return cls
