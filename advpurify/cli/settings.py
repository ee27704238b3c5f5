"""``-p name=value`` / ``--param method.name=value``: command-line strings to typed settings.

The library takes typed values only (``create_purifier("jpeg", quality=50)``); this module is
the one place that reads them from text, using each method's settings dataclass for the types.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from advpurify.purifiers import ParamError, parse_setting, purifier_class, setting_fields


def split_assignment(item: str, what: str = "name=value") -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name.strip():
        raise ParamError(f"parameter {item!r}: expected {what}")
    return name.strip(), value.strip()


def typed_settings(method: str, values: dict[str, str]) -> dict[str, Any]:
    """``{"quality": "50"}`` -> ``{"quality": 50}`` for ``method`` (unknown names refused)."""
    cls = purifier_class(method)
    fields = {info.name: info for info in setting_fields(cls.Settings)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ParamError(
            f"method {method}: unknown parameter {', '.join(unknown)} "
            f"(parameters: {', '.join(fields) or 'none'})"
        )
    return {name: parse_setting(fields[name], text) for name, text in values.items()}


def parse_params(method: str, items: Iterable[str]) -> dict[str, Any]:
    """``-p factor=0.25 -p mode=bicubic`` for ``method`` -> typed keyword arguments."""
    values: dict[str, str] = {}
    for item in items:
        name, value = split_assignment(item)
        _once(values, name, value, f"-p {name}")
    return typed_settings(method, values)


def _once(values: dict[str, str], name: str, value: str, option: str) -> None:
    # A setting given twice is a typo or a script bug, not a silent "last one wins".
    if name in values and values[name] != value:
        raise ParamError(f"{option} given twice ({values[name]!r} and {value!r}): give it once")
    values[name] = value


def parse_method_params(items: Iterable[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``["jpeg.quality=50", "rescale.factor=0.25"]`` -> ``{"jpeg": {"quality": 50}, ...}``."""
    strings: dict[str, dict[str, str]] = {}
    for item in items:
        target, value = split_assignment(item, "method.name=value")
        method, dot, name = target.partition(".")
        if not dot or not method or not name:
            raise ParamError(f"--param {item!r}: expected method.name=value")
        if method not in methods:
            raise ParamError(f"--param {item!r}: method {method!r} is not among --methods")
        _once(strings.setdefault(method, {}), name, value, f"--param {method}.{name}")
    return {method: typed_settings(method, values) for method, values in strings.items()}
