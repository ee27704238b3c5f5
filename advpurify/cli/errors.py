"""Turn :class:`AdvpurifyError` into one line on stderr and exit code 1, for every command."""

from __future__ import annotations

import functools
import sys

import typer

from advpurify.errors import AdvpurifyError


def _guarded(callback):
    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except AdvpurifyError as error:
            print(f"error: {error}", file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper


def wrap_commands(app: typer.Typer) -> None:
    """Wrap the callback of every command of ``app`` and of its sub-apps, once."""
    for info in app.registered_commands:
        if info.callback is not None and not getattr(info.callback, "_guarded", False):
            info.callback = _guarded(info.callback)
            info.callback._guarded = True
    for group in app.registered_groups:
        if group.typer_instance is not None:
            wrap_commands(group.typer_instance)
