"""Errors a user can act on: the CLI prints them as one line and exits 1, no traceback."""


class AdvpurifyError(Exception):
    """Bad input or a missing resource, explained in one line that names what and why."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """``"TypeName: first line of the message"``, at most ``limit`` characters: library errors
    (torch, onnx, libjpeg) often run to many lines that bury the reason."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0].strip() if lines else ''}"[:limit]
