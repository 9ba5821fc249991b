"""One `primer run` per run folder: a lock file naming its holder.

Two runs writing one folder would delete each other's temporary files and commit the same
parts twice, so `run_recipe` holds `RUN/_lock` for its whole length. The file says who holds
it (host, pid, start time, command) and a heartbeat the holder refreshes every
`HEARTBEAT_S` seconds. A second run exits at once with that holder in its message.

How a lock is judged, in order:
1. An OS lock (`fcntl.lockf`) on the file. The kernel drops it when its process dies, even
   by SIGKILL, and NFS (v4, or v3 with lockd) extends it to every client of the share.
   Held by someone else: the folder is in use.
2. The file's contents. A holder on another host whose heartbeat is fresh is live even if
   the OS lock was granted (some shared filesystems, FUSE bucket mounts among them, only
   lock per host). A holder on this host whose process is gone, or any holder whose
   heartbeat is older than `STALE_S`, left a stale lock: it is taken over, with a warning.
An empty file is a free lock: a finished run empties it rather than deleting it, so nobody
can be waiting on a name that is about to disappear.

    with RunLock("runs/quickstart", "primer run configs/quickstart.yaml"):
        ...
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("primer")

LOCK_FILE = "_lock"
HEARTBEAT_S = 30.0
STALE_S = 5 * HEARTBEAT_S


class RunLocked(RuntimeError):
    """The run folder is held by another live primer run."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _describe(holder: dict[str, Any]) -> str:
    return (
        f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since "
        f"{holder.get('started', '?')}: {holder.get('command', '?')}"
    )


class RunLock:
    """Hold `run_dir/_lock` for a run (a context manager); see the module docstring."""

    def __init__(self, run_dir: str | Path, command: str | None = None) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.command = command or " ".join(sys.argv)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.info: dict[str, Any] = {}

    def _read(self) -> dict[str, Any] | None:
        assert self._fd is not None
        os.lseek(self._fd, 0, os.SEEK_SET)
        raw = b""
        while chunk := os.read(self._fd, 1 << 16):
            raw += chunk
        if not raw.strip():
            return None
        try:
            holder = json.loads(raw)
        except ValueError:
            return {"host": "?", "pid": 0, "heartbeat": 0.0, "unreadable": True}
        return holder if isinstance(holder, dict) else {"unreadable": True, "heartbeat": 0.0}

    def _write(self) -> None:
        assert self._fd is not None
        data = json.dumps(self.info | {"heartbeat": time.time()}).encode() + b"\n"
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, data)
        os.fsync(self._fd)

    def _os_lock(self) -> bool | None:
        """True: granted; False: held by another process; None: not supported here."""
        import fcntl

        assert self._fd is not None
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return None
            raise

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        granted = self._os_lock()
        holder = self._read()
        host = socket.gethostname()
        if granted is False:
            self._close()
            what = _describe(holder) if holder else "a process that has not written its name yet"
            raise RunLocked(
                f"{self.path.parent} is in use by another primer run ({what}); wait for it to "
                f"finish or stop it, or use another --output"
            )
        if holder is not None:
            age = time.time() - float(holder.get("heartbeat") or 0.0)
            same_host = holder.get("host") == host
            if same_host:
                live = int(holder.get("pid") or 0) not in (0, os.getpid()) and _pid_alive(
                    int(holder.get("pid") or 0)
                )
                live = live and granted is None  # granted: the kernel says its holder is gone
            else:
                live = age < STALE_S
            if live:
                self._close()
                raise RunLocked(
                    f"{self.path.parent} is in use by another primer run ({_describe(holder)}, "
                    f"heartbeat {age:.0f} s ago); wait for it to finish or stop it, or use "
                    f"another --output. A lock whose holder died is taken over after "
                    f"{STALE_S:.0f} s without a heartbeat."
                )
            log.warning(
                "run lock: taking over %s, left by a run that stopped without releasing it (%s)",
                self.path,
                _describe(holder),
            )
        self.info = {
            "host": host,
            "pid": os.getpid(),
            "started": _now(),
            "command": self.command,
        }
        self._write()
        self._beat = threading.Thread(target=self._heartbeat, name="primer-lock", daemon=True)
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                self._write()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lockf lock
            self._fd = None

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                os.fsync(self._fd)
        self._close()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
