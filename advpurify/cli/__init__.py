"""The typer app. Thin: every command parses its options and calls the library."""

from __future__ import annotations

import sys

import typer

from advpurify.cli import batch, evaluate, export, serve, train, weights
from advpurify.cli.errors import wrap_commands
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


def _run(make_app) -> None:
    try:
        make_app()()
    except AdvpurifyError as error:  # a backstop: commands already report their own
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    _run(lambda: app)


def purify_batch_main() -> None:
    """``purify-batch``: the same as ``advpurify batch``."""
    _run(batch.standalone_app)
