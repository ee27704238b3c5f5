"""What the command line itself said, as opposed to an option's default."""

from __future__ import annotations

import typer


def given(ctx: typer.Context, *names: str) -> list[str]:
    """Which of these options the command line set (not left at their defaults)."""
    # By name: typer may carry its own copy of click's ParameterSource enum.
    sources = {name: getattr(ctx.get_parameter_source(name), "name", None) for name in names}
    return ["--" + n.replace("_", "-") for n, s in sources.items() if s not in (None, "DEFAULT")]
