"""Every error from the CLI is one line on stderr and exit code 1, for every command.

:class:`AdvpurifyError` (bad input, explained by the library), an ``OSError`` (a file that
cannot be read or written) and click's usage errors (a bad option) all end up here.
"""

from __future__ import annotations

import functools
import sys

import typer

from advpurify.errors import AdvpurifyError
from advpurify.files import display_name, printable


def one_line(message: object) -> str:
    """The message with its lines joined: a terminal, a log grep and a test see one line (and
    any other control character, from a file name say, as an escape)."""
    return printable(" ".join(part.strip() for part in str(message).splitlines() if part.strip()))


def describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None:
        return f"{display_name(error.filename)}: {error.strerror or error}"
    return one_line(error)


def fail(error: BaseException) -> typer.Exit:
    print(f"error: {describe(error)}", file=sys.stderr)
    return typer.Exit(1)


def _guarded(callback):
    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except (AdvpurifyError, OSError) as error:
            raise fail(error) from None
        except KeyboardInterrupt:
            # typer would turn it into a silent exit 130: say what happened.
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None

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
