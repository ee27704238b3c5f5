"""Errors a user can act on: the CLI prints them as one line and exits 1, no traceback."""


class AdvpurifyError(Exception):
    """Bad input or a missing resource, explained in one line that names what and why."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an error's message (its type name when it has none), for
    one-line reports of errors raised by libraries (tracebacks and dumps stay out)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(error).__name__
