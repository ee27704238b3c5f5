"""One run per output folder: a lock file holding the pid and host of the run that owns it.

Created with ``O_EXCL`` (exactly one creator wins) and ``O_NOFOLLOW``. A lock left by a dead
process on this host is stale and taken over; a live one, or one from another host (whose
process cannot be checked from here), refuses the second run with the first one's pid and host.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

from advpurify.errors import AdvpurifyError

LOCK_FILE = "run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


class OutputLock:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def acquire(cls, folder: Path | str) -> OutputLock:
        path = Path(folder) / LOCK_FILE
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
        for _attempt in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except FileExistsError:
                cls._refuse_or_clear(path)
                continue
            with os.fdopen(fd, "wb") as handle:
                handle.write(body)
            return cls(path)
        raise AdvpurifyError(f"{path}: could not take the lock (another run keeps taking it)")

    @staticmethod
    def _refuse_or_clear(path: Path) -> None:
        """Remove a stale lock; refuse while its owner may still be running."""
        if path.is_symlink():
            raise AdvpurifyError(f"{path} is a symlink: refusing to use it as a lock; remove it")
        try:
            owner = json.loads(path.read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError, KeyError, TypeError):
            pid, host = -1, socket.gethostname()  # unreadable (a crash mid-write): stale
        same_host = host == socket.gethostname()
        if same_host and (pid == os.getpid() or (pid > 0 and _alive(pid))):
            if pid == os.getpid():
                raise AdvpurifyError(f"{path.parent}: this process already runs into it")
            raise AdvpurifyError(
                f"{path.parent} is in use by another run (pid {pid} on {host}): wait for it "
                f"to finish, or use another output folder"
            )
        if not same_host:
            raise AdvpurifyError(
                f"{path.parent} is in use by a run on {host} (pid {pid}); if that run is gone, "
                f"delete {path}"
            )
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # the owner is dead: take the lock over

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
