"""One writer per run folder: an exclusive, non-blocking fcntl.flock on <run_dir>/.lock, held for the whole run.

    lock = runlock.acquire(run_dir)   # rank 0, before anything in run_dir is touched; RunLocked if another run holds it
    lock.note                         # "a previous run ... did not exit cleanly" when the file names a dead pid here
    lock.release()                    # at the end of the run (the kernel also drops the flock when the process dies)

The file holds the holder's host, pid and start time (JSON), for the refusal message. The flock, not the file, is
the lock: a file left by a killed run has no flock holder and is simply re-taken. A clean release empties the file
(the file itself stays: unlinking a locked path lets a second run lock a new inode next to the first).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path


class RunLocked(RuntimeError):
    """Another live process holds the run folder's lock; the message says who and what to do."""


class RunLock:
    def __init__(self, path: Path, fd: int, note: str | None):
        self.path, self._fd, self.note = path, fd, note

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.ftruncate(fd, 0)  # emptied while still held: a file naming a pid means that run did not release it
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def acquire(run_dir: str | Path) -> RunLock:
    """Take <run_dir>/.lock (creating run_dir); -> the held lock. Raises RunLocked naming the holder if it is held."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        h = _holder(fd)
        os.close(fd)
        raise RunLocked(f"{run_dir} is in use by pid {h.get('pid', '?')} on host {h.get('host', '?')} since "
                        f"{h.get('since', '?')}; wait for it or use another --train.name") from None
    prev, note = _holder(fd), None
    if prev.get("host") == socket.gethostname() and isinstance(prev.get("pid"), int) and not _alive(prev["pid"]):
        note = (f"{path}: a previous run (pid {prev['pid']}, since {prev.get('since', '?')}) did not exit cleanly; "
                f"its lock is taken over")
    info = {"host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    os.fsync(fd)
    return RunLock(path, fd, note)
