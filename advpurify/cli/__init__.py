"""The typer app. Thin: every command parses its options and calls the library."""

from __future__ import annotations

import os
import signal
import sys

import typer

try:  # typer >= 0.20 carries its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer, on click itself
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

from advpurify import heap
from advpurify.cli import batch, evaluate, export, serve, train, weights
from advpurify.cli.errors import describe, wrap_commands
from advpurify.errors import AdvpurifyError

app = typer.Typer(
    name="advpurify",
    help="Remove adversarial perturbations from images, and measure what that buys.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for module in (batch, evaluate, export, serve, weights, train):
    module.register(app)
wrap_commands(app)


# The only options whose empty value means something ("start a local Ray").
EMPTY_ALLOWED = frozenset({"--ray-address"})


def refuse_empty_arguments(argv: list[str]) -> None:
    """An empty argument is a path or value left out by mistake (``samples "$DIR"`` with DIR
    unset): as a path it would silently mean the current folder."""
    for index, arg in enumerate(argv):
        if arg == "--":  # what follows is positional, whatever it looks like
            break
        if arg.startswith("--") and arg.endswith("=") and arg[:-1] not in EMPTY_ALLOWED:
            raise AdvpurifyError(f"{arg[:-1]}: empty value")
        if arg == "":
            before = argv[index - 1] if index else ""
            if before in EMPTY_ALLOWED:
                continue
            where = before if before.startswith("-") else f"argument {index + 1}"
            raise AdvpurifyError(f"{where}: empty value (a path or value left out?)")


def _run(make_app) -> None:
    """Run a typer app with one-line errors: click's usage errors (a bad option value) print
    as ``error: ...`` with exit code 1 instead of a boxed usage screen and code 2."""
    # A command owns its process (and the Ray workers it starts inherit the environment):
    # CPU fits may tune its heap (advpurify/heap.py) unless the user said otherwise.
    os.environ.setdefault(heap.ENV, heap.ON)
    # Ctrl-C raises again once the command runs: the console scripts' own handler (exit at
    # once while the imports run) is replaced; an ignored Ctrl-C stays ignored.
    handler = signal.getsignal(signal.SIGINT)
    if getattr(handler, "__name__", "") == "_interrupted_while_starting":
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        refuse_empty_arguments(sys.argv[1:])
        code = make_app()(standalone_mode=False)
    except NoArgsIsHelpError as error:
        error.show()
        sys.exit(error.exit_code)
    except UsageError as error:
        hint = f" (see {error.ctx.command_path} --help)" if error.ctx is not None else ""
        print(f"error: {describe(error.format_message())}{hint}", file=sys.stderr)
        sys.exit(1)
    except typer.Abort:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except ClickException as error:
        print(f"error: {describe(error.format_message())}", file=sys.stderr)
        sys.exit(1)
    except AdvpurifyError as error:  # a backstop: commands already report their own
        print(f"error: {describe(error)}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def main() -> None:
    _run(lambda: app)


def purify_batch_main() -> None:
    """``purify-batch``: the same as ``advpurify batch``."""
    _run(batch.standalone_app)
