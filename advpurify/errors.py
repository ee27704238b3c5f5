"""Errors a user can act on: the CLI prints them as one line and exits 1, no traceback."""


class AdvpurifyError(Exception):
    """Bad input or a missing resource, explained in one line that names what and why."""
