"""One run per output folder: an exclusive ``flock`` on a lock file naming the owner's pid and host.

The kernel holds the lock for the owner's open file and drops it when the owner exits, however
it exits, so a lock nobody holds is stale by definition: no pid checks (pids are reused), and no
window between creating the file and writing into it in which a second run could take it.
Opened with ``O_NOFOLLOW``. A lock file left by a run on another host is refused (its process
cannot be checked from here, and a network file system may not share ``flock`` between hosts).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from advpurify.errors import AdvpurifyError

LOCK_FILE = "run.lock"


def _owner(fd: int) -> tuple[int, str] | None:
    """The pid and host written in the lock file (None: empty or unreadable)."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0))
        return int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


class OutputLock:
    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, folder: Path | str) -> OutputLock:
        path = Path(folder) / LOCK_FILE
        host = socket.gethostname()
        for _attempt in range(5):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as error:
                if error.errno == errno.ELOOP:
                    raise AdvpurifyError(
                        f"{path} is a symlink: refusing to use it as a lock; remove it"
                    ) from None
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _owner(fd)
                os.close(fd)
                cls._refuse(path, owner, host)
            if not _same_file(fd, path):
                os.close(fd)  # its owner released it (unlinked) meanwhile: open the new one
                continue
            owner = _owner(fd)
            if owner is not None and owner[1] != host:
                os.close(fd)
                raise AdvpurifyError(
                    f"{path.parent} is in use by a run on {owner[1]} (pid {owner[0]}); if that "
                    f"run is gone, delete {path}"
                )
            # Free on this host: its owner, if any, has exited. Take it over.
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": host}).encode(), 0)
            except OSError as error:  # a full disk: leave no lock file behind
                path.unlink(missing_ok=True)
                os.close(fd)
                raise OSError(error.errno, error.strerror, str(path)) from None
            return cls(path, fd)
        raise AdvpurifyError(f"{path}: could not take the lock (another run keeps taking it)")

    @staticmethod
    def _refuse(path: Path, owner: tuple[int, str] | None, host: str) -> None:
        if owner is not None and owner == (os.getpid(), host):
            raise AdvpurifyError(f"{path.parent}: this process already runs into it")
        who = f" (pid {owner[0]} on {owner[1]})" if owner is not None else ""
        raise AdvpurifyError(
            f"{path.parent} is in use by another run{who}: wait for it to finish, or use "
            "another output folder"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlinked while still held: a run that opened the old file sees it is gone and retries.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None
