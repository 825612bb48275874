"""One run per output_dir: a lock file naming the process that owns the folder.

Two runs writing one folder interleave their metrics and overwrite each other's checkpoints, so a
run takes ``OUTPUT_DIR/.sdft.lock`` (pid, host, start time) before it writes anything and drops it
when it ends. A second run refuses in one line naming the owner. A lock whose process is gone (a
``kill -9``, a crash) is stale: the next run on the same host says so and takes it over; a lock from
another host cannot be checked from here, so it is refused with the remedy (delete the file).
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".sdft.lock"


class RunLockedError(ValueError):
    """The output_dir is in use by another live run."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _owner(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text())
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half written: treated as a lock of unknown owner


def _describe(owner: dict) -> str:
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started', '?')}"


def holder(output_dir) -> str | None:
    """None when a run may take ``output_dir``, else why not (one line); changes nothing."""
    path = Path(output_dir) / LOCK_FILE
    owner = _owner(path)
    if owner is None or _stale(owner):
        return None
    return (f"output_dir {output_dir} is in use by another sdft run ({_describe(owner)}); wait for it, choose "
            f"another output_dir, or delete {path} if that run is gone")


def _stale(owner: dict) -> bool:
    if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        return True  # this process's own lock, left by an earlier call that did not end its run
    return owner.get("host") == socket.gethostname() and not _alive(owner["pid"])  # _owner: pid is an int


class RunLock:
    """``acquire()`` takes the folder (or raises ``RunLockedError``); ``release()`` gives it back."""

    def __init__(self, output_dir, report=print):
        self.path = Path(output_dir) / LOCK_FILE
        self.report = report
        self.held = False

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _owner(self.path)
                if owner is None:
                    continue  # released meanwhile: try again
                if not _stale(owner):
                    raise RunLockedError(holder(self.path.parent) or f"{self.path} is held") from None
                if owner.get("pid") != os.getpid():
                    self.report(f"sdft: {self.path} was left by a run that is gone ({_describe(owner)}); "
                                "taking it over")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
            self.held = True
            atexit.register(self.release)
            return self
        raise RunLockedError(f"could not take {self.path}: another run keeps taking it")

    def release(self):
        if not self.held:
            return
        self.held = False
        owner = _owner(self.path)
        if owner is not None and owner.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
