"""One registry class for everything known by name: purifiers, model specs, weight sources.

A :class:`Registry` maps a name to an entry. Registering a name twice raises
:class:`DuplicateNameError` (nothing is silently replaced); looking up an unknown name raises
the registry's own error type with the known names. Entries are added when the module that
defines them is imported; each layer's package imports its defining modules in one place
(``advpurify.purifiers``, ``advpurify.models.registry``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from advpurify.errors import AdvpurifyError

T = TypeVar("T")


class DuplicateNameError(AdvpurifyError, ValueError):
    """A name registered twice in the same registry."""


class InvalidNameError(AdvpurifyError, ValueError):
    """A name that cannot be registered: empty, or with white space in it."""


class UnknownNameError(AdvpurifyError, KeyError):
    """A name no entry is registered under."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """``name -> entry``, in registration order. ``kind`` names the entries in messages."""

    def __init__(self, kind: str, error: type[Exception] = UnknownNameError) -> None:
        self.kind = kind
        self.error = error
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        self.check_free([name])
        self._entries[name] = entry
        return entry

    def check_free(self, names: list[str]) -> None:
        """Raise unless every name is valid, not yet registered and given once: what
        registering them all would check, before anything is registered."""
        for name in names:
            if not name or any(c.isspace() for c in name):
                raise InvalidNameError(
                    f"{self.kind} name {name!r}: must be non-empty, without spaces"
                )
        taken = [name for name in names if name in self._entries]
        if taken:
            quoted = ", ".join(map(repr, taken))
            raise DuplicateNameError(f"{self.kind} {quoted} is already registered")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            quoted = ", ".join(map(repr, repeated))
            raise DuplicateNameError(f"{self.kind} {quoted} is given twice")

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a temporary entry clean up with this)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self._entries) or "none"
            raise self.error(f"unknown {self.kind} {name!r} (known: {known})") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def values(self) -> list[T]:
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
