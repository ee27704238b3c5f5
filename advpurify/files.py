"""Files the tool writes: the one atomic write, its temporaries, and the folder checks.

Every output is written to a hidden temporary beside its target and renamed into place, so a
reader, or a run killed at any instant, sees either no file or the complete file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from advpurify.errors import AdvpurifyError

TEMP_SUFFIX = ".partial"

# mkstemp creates files readable by the owner only; outputs get the usual umask-based mode.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write to a hidden temporary file beside ``path``, then rename it into place.

    A reader, or a run killed at any instant, sees either no file or the complete file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def sha256_file(path: Path | str, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temporaries(root: Path | str) -> int:
    """Delete temporary files left by a run that was killed mid-write; returns how many."""
    removed = 0
    for tmp in Path(root).rglob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed += 1
    return removed


def check_output_outside(input_path: Path, output_dir: Path) -> None:
    """Refuse an output folder equal to or inside an input folder: the input is never touched,
    and outputs never become inputs of the next run."""
    input_path, output_dir = Path(input_path), Path(output_dir)
    if not input_path.is_dir():
        return
    inside = output_dir.resolve()
    if inside == input_path.resolve() or input_path.resolve() in inside.parents:
        raise AdvpurifyError(
            f"output folder {output_dir} is inside the input folder {input_path}: "
            "choose a folder outside it, so the input is never touched"
        )
