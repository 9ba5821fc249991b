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
can be waiting on a name that is about to disappear. A run folder on object storage holds
`URI/_lock` the same way, judged by its contents alone (`RemoteLock`).

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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def describe_holder(holder: dict[str, Any]) -> str:
    return (
        f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since "
        f"{holder.get('started', '?')}: {holder.get('command', '?')}"
    )


def holder_is_live(holder: dict[str, Any], os_lock_granted: bool | None) -> tuple[bool, float]:
    """(is the run that wrote `holder` alive, seconds since its heartbeat). A holder on this
    host is judged by its process (unless the OS lock was granted, which says it is gone),
    one on another host by its heartbeat."""
    age = time.time() - float(holder.get("heartbeat") or 0.0)
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid") or 0)
        return pid not in (0, os.getpid()) and pid_alive(pid) and os_lock_granted is None, age
    return age < STALE_S, age


class Heartbeat:
    """Calls `write` every `HEARTBEAT_S` seconds on a daemon thread until `stop()`; a
    failed write is retried at the next beat."""

    def __init__(self, write: Any) -> None:
        self._write = write
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="primer-lock", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):
                self._write()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class RunLock:
    """Hold `run_dir/_lock` for a run (a context manager); see the module docstring."""

    def __init__(self, run_dir: str | Path, command: str | None = None) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.command = command or " ".join(sys.argv)
        self._fd: int | None = None
        self._beat: Heartbeat | None = None
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
            what = (
                describe_holder(holder) if holder else "a process that has not written its name yet"
            )
            raise RunLocked(
                f"{self.path.parent} is in use by another primer run ({what}); wait for it to "
                f"finish or stop it, or use another --output"
            )
        if holder is not None:
            live, age = holder_is_live(holder, granted)
            if live:
                self._close()
                raise RunLocked(
                    f"{self.path.parent} is in use by another primer run ({describe_holder(holder)}, "
                    f"heartbeat {age:.0f} s ago); wait for it to finish or stop it, or use "
                    f"another --output. A lock whose holder died is taken over after "
                    f"{STALE_S:.0f} s without a heartbeat."
                )
            log.warning(
                "run lock: taking over %s, left by a run that stopped without releasing it (%s)",
                self.path,
                describe_holder(holder),
            )
        self.info = {
            "host": host,
            "pid": os.getpid(),
            "started": _now(),
            "command": self.command,
        }
        self._write()
        self._beat = Heartbeat(self._write)
        return self

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lockf lock
            self._fd = None

    def release(self) -> None:
        if self._beat is not None:
            self._beat.stop()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                os.fsync(self._fd)
        self._close()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class RemoteLock:
    """`URI/_lock` of a run on object storage (pipeline/remote.py), judged like the local
    file by its contents: a holder whose heartbeat is fresh refuses a second run; one on
    this host whose process is gone, or any holder silent for `STALE_S`, is taken over with
    a warning. Object stores have no exclusive create, so two runs started within the same
    second could both pass."""

    def __init__(self, fs: Any, path: str, uri: str, command: str) -> None:
        self.fs, self.path, self.uri = fs, path, uri
        self.info: dict[str, Any] = {
            "host": socket.gethostname(), "pid": os.getpid(), "command": command,
        }  # fmt: skip
        self._beat: Heartbeat | None = None

    def _write(self) -> None:
        self.fs.pipe_file(self.path, json.dumps(self.info | {"heartbeat": time.time()}).encode())

    def __enter__(self) -> RemoteLock:
        try:
            holder = json.loads(self.fs.cat_file(self.path))
        except (FileNotFoundError, ValueError):
            holder = None
        if isinstance(holder, dict):
            live, age = holder_is_live(holder, None)
            if live:
                raise RunLocked(
                    f"{self.uri} is in use by another primer run ({describe_holder(holder)}, "
                    f"heartbeat {age:.0f} s ago); wait for it to finish or stop it. A lock "
                    f"whose holder died is taken over after {STALE_S:.0f} s without a heartbeat."
                )
            log.warning("run lock: taking over %s/_lock (%s)", self.uri, describe_holder(holder))
        self.info["started"] = _now()
        self._write()
        self._beat = Heartbeat(self._write)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._beat is not None:
            self._beat.stop()
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path)
