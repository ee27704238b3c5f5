"""Files the tool writes: the one atomic write, its temporaries, and the folder checks.

Every output is written to a hidden temporary beside its target and renamed into place, so a
reader, or a run killed at any instant, sees either no file or the complete file. The rename
replaces a symlink at the target rather than writing through it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

from advpurify.errors import AdvpurifyError

TEMP_SUFFIX = ".partial"
# Exactly the names mkstemp gives our temporaries: ".<target name>.<8 random chars>.partial".
# A user's own ".notes.partial" does not match, so the cleanup never deletes it.
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX) + r"$")

# mkstemp creates files readable by the owner only; outputs get the usual umask-based mode.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def _check_inside(path: Path, root: Path | None) -> None:
    """Refuse a target whose folder leads out of ``root`` (a symlinked sub-folder)."""
    if root is None:
        return
    folder, top = path.parent.resolve(), Path(root).resolve()
    if folder != top and top not in folder.parents:
        raise AdvpurifyError(f"{path}: its folder leads outside {root} (a symlink?); not written")


@contextlib.contextmanager
def atomic_output(path: Path | str, root: Path | str | None = None) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; on success it is renamed onto ``path``.

    For writers that need a file name (``torch.save``, safetensors, ONNX export). On any error
    the temporary is deleted. With ``root``, a target whose folder resolves outside it is refused.
    """
    path = Path(path)
    if path.is_dir():  # else the rename fails naming the hidden temporary
        raise AdvpurifyError(f"{path} is a folder: name a file")
    top = Path(root) if root is not None else None
    _check_inside(path, top)  # before mkdir, which would follow a symlinked folder
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_inside(path, top)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=TEMP_SUFFIX, dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, FILE_MODE)
        os.close(fd)
        yield tmp
        # Again: a writer that recreates the file (safetensors' save_file) drops the mode.
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# A file name holds at most 255 bytes on common file systems; the temporary adds 18 to its
# target's (".", ".", 8 random characters, ".partial"), so long targets are cut in its name.
_NAME_MAX = 255
_TEMP_EXTRA = 2 + 8 + len(TEMP_SUFFIX)


def _temp_prefix(name: str) -> str:
    # A cut inside a multi-byte character leaves bytes that fsdecode keeps as surrogate escapes:
    # they are written to disk as the same bytes, and only this temporary carries them.
    return f".{os.fsdecode(os.fsencode(name)[: _NAME_MAX - _TEMP_EXTRA])}."


def atomic_write_bytes(path: Path | str, data: bytes, root: Path | str | None = None) -> None:
    """Write ``data`` to a hidden temporary file beside ``path``, then rename it into place."""
    try:
        with atomic_output(path, root) as tmp, open(tmp, "wb") as handle:
            handle.write(data)
    except OSError as error:
        if error.filename is not None:
            raise
        # A failed write names no file (a full disk): say which one it was.
        raise OSError(error.errno, error.strerror or str(error), str(path)) from None


def remove_stale_temporaries(root: Path | str) -> int:
    """Delete our temporaries left by a run killed mid-write, under ``root``; returns how many.

    Only names this module creates are touched, and symlinked folders are not entered.
    """
    removed = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if _TEMP_NAME.match(name):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
                    removed += 1
    return removed


def remove_stale_temporaries_of(target: Path | str, min_age_s: float = 3600.0) -> int:
    """Delete the temporaries of ``target`` a killed writer left beside it (in a cache shared by
    processes): only those older than ``min_age_s``, so a live writer's is never touched."""
    target = Path(target)
    prefix, removed, now = _temp_prefix(target.name), 0, time.time()
    with contextlib.suppress(OSError), os.scandir(target.parent) as entries:
        for entry in entries:
            if not (entry.name.startswith(prefix) and _TEMP_NAME.match(entry.name)):
                continue
            with contextlib.suppress(OSError):
                if now - entry.stat(follow_symlinks=False).st_mtime > min_age_s:
                    os.unlink(entry.path)
                    removed += 1
    return removed


def sha256_file(path: Path | str, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# Control characters as escapes: a name with a newline stays on one line, and one with ESC
# cannot drive the terminal it is printed on.
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROL_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def printable(text: str) -> str:
    """``text`` with control characters (newline, ESC, ...) written as escapes."""
    return text.translate(_CONTROL_ESCAPES)


def display_name(path: Path | str) -> str:
    """A printable form of a file name: undecodable bytes appear as ``\\xe9`` escapes, control
    characters as ``\\n`` or ``\\x1b``."""
    return printable(os.fsencode(path).decode("utf-8", "backslashreplace"))


def mirror_names(relative: Sequence[PurePath | str], ext: str) -> list[PurePath]:
    """Output names for input paths (relative to their root) with the extension ``ext``:
    ``a.jpg`` -> ``a.png``.

    Where two inputs would land on one name (``a.jpg`` and ``a.png``), both keep their original
    extension in front of the new one (``a.jpg.png``, ``a.png.png``). A name still shared after
    that (``a.jpg.png`` is also an input), or a name that another output needs as a folder
    (``a.jpg`` -> ``a.png`` beside ``a.png/b.png``), is refused, naming both inputs.
    """
    paths = [PurePath(r) for r in relative]
    plain = [p.with_suffix(ext) for p in paths]
    counts: dict[PurePath, int] = {}
    for name in plain:
        counts[name] = counts.get(name, 0) + 1
    names = [
        p.parent / (p.name + ext) if counts[name] > 1 else name
        for p, name in zip(paths, plain, strict=True)
    ]
    owner: dict[PurePath, PurePath] = {}
    for source, name in zip(paths, names, strict=True):
        if name in owner:
            first, second = display_name(owner[name]), display_name(source)
            raise AdvpurifyError(
                f"inputs {first} and {second} would both be written to {display_name(name)}: "
                "rename one of them"
            )
        owner[name] = source
    for name, source in zip(names, paths, strict=True):
        for folder in name.parents:
            if folder in owner:  # one output would be a file where another needs a folder
                first, second = display_name(owner[folder]), display_name(source)
                raise AdvpurifyError(
                    f"inputs {first} and {second} clash: {display_name(folder)} would be both "
                    "a file and a folder of the output; rename one of them"
                )
    return names


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_outside(input_path: Path, output_dir: Path) -> None:
    """Refuse an output folder equal to or inside an input folder, or one holding the input:
    the input is never touched, and outputs never become inputs of the next run."""
    input_path, output_dir = Path(input_path), Path(output_dir)
    source, target = input_path.resolve(), output_dir.resolve()
    if input_path.is_dir() and _is_within(target, source):
        raise AdvpurifyError(
            f"output folder {output_dir} is inside the input folder {input_path}: "
            "choose a folder outside it, so the input is never touched"
        )
    if _is_within(source, target):
        raise AdvpurifyError(
            f"input {input_path} is inside the output folder {output_dir}: "
            "choose an output folder that does not contain the input"
        )


def check_input_folder(input_dir: Path) -> None:
    input_dir = Path(input_dir)
    if not input_dir.exists():
        raise AdvpurifyError(f"input folder {input_dir} does not exist")
    if not input_dir.is_dir():
        raise AdvpurifyError(f"input {input_dir} is not a folder")


def _probe_writable(folder: Path, label: str) -> None:
    """Prove a file can be written in ``folder``, or in its nearest existing ancestor when it
    does not exist yet (nothing is created): a real probe file, since permission bits say
    nothing to root, nor about read-only mounts."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise AdvpurifyError(f"{label}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=TEMP_SUFFIX, dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or error
        raise AdvpurifyError(f"{label}: cannot write in {existing} ({reason})") from None


def check_writable_folder(folder: Path | str, what: str = "output folder") -> None:
    """Refuse an output folder that cannot be written, before the work that fills it."""
    _probe_writable(Path(folder), f"{what} {folder}")


def check_writable_file(path: Path | str, what: str = "output file") -> None:
    """Refuse an output file that cannot be written, before the work that makes it."""
    path = Path(path)
    if path.is_dir():
        raise AdvpurifyError(f"{what} {path} is a folder; name a file")
    _probe_writable(path.parent, f"{what} {path}")


def settings_changes(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``"name: old -> new"`` for every setting of ``wanted`` that ``stored`` records otherwise;
    nested settings by their dotted name (``params.lr``), not as two whole dictionaries."""
    changes = []
    for key in wanted:
        old, new = stored.get(key, _MISSING), wanted[key]
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            changes += [f"{key}.{change}" for change in settings_changes(old, new)]
            changes += [f"{key}.{k}: {old[k]!r} -> (none)" for k in old if k not in new]
        elif old is _MISSING:
            changes.append(f"{key}: (none) -> {new!r}")
        elif old != new:
            changes.append(f"{key}: {old!r} -> {new!r}")
    return changes


_MISSING = object()  # a setting the stored record lacks, told apart from one stored as None


def refuse_other_settings(
    folder: Path | str,
    stored: Mapping[str, Any],
    wanted: Mapping[str, Any],
    error: type[AdvpurifyError] = AdvpurifyError,
) -> None:
    """A resume must use the settings the folder's results were made with."""
    changes = settings_changes(stored, wanted)
    changes += [f"{key}: {stored[key]!r} -> (none)" for key in stored if key not in wanted]
    if changes:
        raise error(
            f"{folder} holds results made with other settings ({', '.join(changes)}); "
            "use --overwrite to redo them, or another output folder"
        )
