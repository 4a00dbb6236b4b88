"""One driver per run folder: an advisory lock on `<run>/.lock`, held for the driver's life.

The lock is `flock(LOCK_EX | LOCK_NB)` on the file; the file holds who took it (host, pid, start
time, command) so that a refused driver can say whom to stop. The kernel drops the lock when
its holder exits or dies, however it dies, so a lock whose holder is gone is simply taken: the
old contents then only say who held it last ("taken over a stale lock"). A clean exit empties
the file.

What is guaranteed where:
- On a local file system: two drivers on one machine never both hold a run folder.
- On NFS (Linux clients), `flock` is sent to the server as a whole-file POSIX lock (NFSv4, or
  NFSv3 with lockd running), so drivers on different hosts exclude each other too. Mounts with
  `nolock` or `local_lock=flock|all` keep locks on each client: then only drivers on the same
  host are excluded. When a host dies while holding the lock, the server frees it only once
  that client's lease expires (NFSv4: about 90 s).
- Other shared file systems: as their `flock` is; check before running two hosts on one folder.
The lock is advisory: it binds this orchestrator, not other programs writing into the folder.
"""

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".lock"


class LockError(OSError):
    """The lock file cannot be created or opened (permissions, a read-only file system)."""


class LockHeld(RuntimeError):
    """Another live driver holds the run folder.

    Attributes:
        holder: what the holder wrote (host, pid, started, command), or {} if unreadable.
    """

    def __init__(self, root: Path, holder: dict[str, Any]) -> None:
        self.holder = holder
        host, pid = holder.get("host", "?"), holder.get("pid", "?")
        here = host == socket.gethostname()
        how = f"kill -INT {pid}" if here else f"ssh {host} kill -INT {pid}"
        super().__init__(
            f"{root}: another driver is running this sweep (pid {pid} on host {host}, since "
            f"{holder.get('started', '?')}: {holder.get('command', '?')}); one driver per run "
            f"folder. Fix: wait for it to finish, or stop it with Ctrl-C in its terminal or "
            f"`{how}` (it stops cleanly: finished shards are kept), then rerun; or write the "
            "results elsewhere (--output, or another run: name)"
        )


def read_holder(path: Path) -> dict[str, Any]:
    """The JSON a lock file holds ({} when empty or unreadable)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    try:
        data = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


class RunLock:
    """The lock of one run folder.

    Args:
        root: the run folder (created if missing when the lock is acquired).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self._fd: int | None = None
        self.stale: dict[str, Any] = {}

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, attempts: int = 5) -> None:
        """Take the lock, or raise at once (a few tries over half a second, so that a
        `status` probing the lock is not mistaken for a driver).

        After success, `self.stale` holds what a previous holder that died left in the file.

        Raises:
            LockHeld: a live process holds it.
            LockError: the folder cannot be created or the file opened.
        """
        if self._fd is not None:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise LockError(
                f"{self.path}: cannot open the run folder's lock ({err.strerror or err}); fix: "
                "make the folder writable, or write the results elsewhere (--output)"
            ) from err
        for attempt in range(attempts):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == attempts - 1:
                    os.close(fd)
                    raise LockHeld(self.root, read_holder(self.path)) from None
                time.sleep(0.1)
        self._fd = fd
        self.stale = read_holder(self.path)
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        """Empty the file and drop the lock (a no-op when not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # the folder may have been deleted under us
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(root: Path) -> dict[str, Any] | None:
    """Who holds `root`'s lock now (None: nobody). Briefly takes a shared lock to find out."""
    path = Path(root) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_holder(path) or {"host": "?", "pid": "?"}
    finally:
        os.close(fd)
    return None
