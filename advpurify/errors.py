"""Errors a user can act on: the CLI prints them as one line and exits 1, no traceback."""

import pickle
import re


class AdvpurifyError(Exception):
    """Bad input or a missing resource, explained in one line that names what and why."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """``"TypeName: first line of the message"``, at most ``limit`` characters: library errors
    (torch, onnx, libjpeg) often run to many lines that bury the reason."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0].strip() if lines else ''}"[:limit]


def load_error(error: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in one line. Its own message
    for a pickled object runs to a dozen lines and suggests ``weights_only=False``, which would
    run whatever code the file carries."""
    if isinstance(error, pickle.UnpicklingError):
        # Never torch's own text: it advises weights_only=False, which runs the file's code.
        found = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
        detail = found.group(1).strip() if found else ""
        if not detail.lower().startswith("unsupported operand"):  # random bytes say this
            return (
                "it holds pickled Python objects, not only tensors: refused, since loading them "
                "could run code (save a plain state dict or .safetensors instead)"
            )
        # Random bytes, and pickles in protocols torch's safe loader does not read.
        return (
            f"{detail}: not a torch file, or pickled Python objects, refused since loading "
            "them could run code"
        )
    return first_line(error)
