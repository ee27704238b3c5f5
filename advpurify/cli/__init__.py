"""The typer app. Thin: every command parses its options and calls the library."""

from __future__ import annotations

import sys

import typer

from advpurify.cli import batch, evaluate, export, train, weights
from advpurify.errors import AdvpurifyError

app = typer.Typer(
    name="advpurify",
    help="Remove adversarial perturbations from images, and measure what that buys.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for module in (batch, evaluate, export, weights, train):
    module.register(app)


def _run(command) -> None:
    try:
        command()
    except AdvpurifyError as error:
        # One line, no traceback: the message names the file or value and the reason.
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    _run(lambda: app())


def purify_batch_main() -> None:
    """``purify-batch``: the same as ``advpurify batch``."""
    _run(lambda: batch.standalone_app()())
