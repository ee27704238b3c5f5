"""HTTP download with resume, a progress bar, size and checksum checks, and an atomic move.

Bytes go to ``<target>.part``. A later call (or a retry after a dropped connection) asks the
server for the rest with an HTTP ``Range`` header and appends; a server that ignores ``Range``
sends the whole file again and the part is restarted. Only a file whose size and checksum match
what was expected is moved to ``<target>``; a file that does not match is deleted, so a corrupt
partial never reaches the cache.
"""

from __future__ import annotations

import http.client
import os
import re
import urllib.error
import urllib.request
from contextlib import nullcontext
from pathlib import Path

from advpurify.files import sha256_file
from advpurify.weights.registry import WeightsError

CHUNK = 1 << 16
USER_AGENT = "advpurify-weights/1"


class DownloadError(WeightsError):
    """The server could not be reached or the transfer failed after every retry."""


class _Interrupted(Exception):
    """The connection dropped in the middle of the body; the part file keeps what arrived."""


class ChecksumError(WeightsError):
    """A file whose size or checksum is not the expected one."""


def verify_file(
    path: Path,
    *,
    size: int | None = None,
    sha256: str | None = None,
    sha1: str | None = None,
    label: str | None = None,
) -> None:
    """Raise :class:`ChecksumError` naming expected and found values on any mismatch."""
    label = label or str(path)
    found_size = path.stat().st_size
    if size is not None and found_size != size:
        raise ChecksumError(f"{label}: size {found_size} bytes, expected {size}")
    for algorithm, expected in (("sha256", sha256), ("sha1", sha1)):
        if expected is None:
            continue
        found = sha256_file(path, algorithm)
        if found != expected.lower():
            raise ChecksumError(f"{label}: {algorithm} {found}, expected {expected.lower()}")


def download(
    url: str,
    target: Path,
    *,
    size: int | None = None,
    sha256: str | None = None,
    sha1: str | None = None,
    retries: int = 3,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``target`` (resuming ``target.part``), verify it, move it in place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    last_error: Exception | None = None
    for _attempt in range(retries + 1):
        try:
            _transfer(url, part, size=size, timeout=timeout, progress=progress)
            break
        except _Interrupted as error:
            last_error = error  # a dropped connection: the next attempt resumes from the part
        except urllib.error.HTTPError as error:
            raise DownloadError(f"{url}: HTTP {error.code} {error.reason}") from None
        except (OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", None) or error
            raise DownloadError(f"{url}: cannot download ({reason})") from None
    else:
        raise DownloadError(
            f"{url}: transfer interrupted {retries + 1} times ({last_error}); "
            f"run the command again to resume from {part}"
        )
    try:
        verify_file(part, size=size, sha256=sha256, sha1=sha1, label=f"download of {url}")
    except ChecksumError:
        part.unlink(missing_ok=True)  # never keep (or resume) bytes known to be wrong
        raise
    os.replace(part, target)
    return target


def _transfer(url: str, part: Path, *, size: int | None, timeout: float, progress: bool) -> None:
    """One request that leaves the whole file in ``part``, or raises (:class:`_Interrupted`
    when the body was cut short)."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()  # longer than the file can be: garbage, start again
        have = 0
    if size is not None and have == size:
        return
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        with error:  # its response, closed either way
            if error.code != 416 or not have:
                raise
            # "Range not satisfiable": the part is whole if it has the file's size (the
            # expected one, else the one the server states as "bytes */SIZE").
            stated = re.fullmatch(r"bytes \*/(\d+)", error.headers.get("Content-Range") or "")
            whole = size if size is not None else (int(stated.group(1)) if stated else None)
            if have == whole:
                return
            part.unlink()  # larger than the file, or of unknown size: start again
            raise _Interrupted(f"server refused to resume at byte {have}; restarting") from None
    with response:
        if have and response.status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != have:
                raise DownloadError(f"{url}: server resumed at byte {start}, expected {have}")
            mode = "ab"
        else:
            have, mode = 0, "wb"  # full body: the server ignored Range (or none was sent)
        length = (response.headers.get("Content-Length") or "").strip()
        remaining = int(length) if length.isascii() and length.isdigit() else None
        total = have + remaining if remaining is not None else size
        received = 0
        with open(part, mode) as out, _progress_bar(progress, part.name[:-5], total) as bar:
            task = bar.add_task("download", total=total, completed=have) if bar else None
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    if bar is not None:
                        bar.update(task, advance=len(chunk))
            except (OSError, http.client.HTTPException) as error:
                got = have + received
                raise _Interrupted(f"{type(error).__name__} after {got} bytes") from None
        if remaining is not None and received < remaining:
            raise _Interrupted(f"connection closed after {have + received} of {total} bytes")


def _content_range_start(header: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-", header or "")
    return int(match.group(1)) if match else None


def _progress_bar(enabled: bool, name: str, total: int | None):
    if not enabled:
        return nullcontext(None)
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn(name),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )
