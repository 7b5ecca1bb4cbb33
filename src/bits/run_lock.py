"""One run at a time per experiment folder: an exclusive ``.lock`` file holding the owner's pid.

Two ``train.py`` processes writing the same folder would overwrite each other's checkpoints and
summary rows. The lock is created atomically (``O_EXCL``) before the run's first write and removed
when the run ends; a lock left by a process that died (same host, pid gone) is taken over, one
held by a live process (or by another host, which cannot be checked) is a clear error.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any, Dict, Optional

from src import storage
from src.errors import UsageError

_logger = logging.getLogger("robust_vits")

LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_holder(path: str) -> Optional[Dict[str, Any]]:
    try:
        holder = json.loads(storage.read_text(path))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_stale(holder: Optional[Dict[str, Any]]) -> bool:
    """A lock whose owner is known to be gone: same host, and no process with that pid."""
    if not holder or holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    return isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid)


class RunLock:
    """``with RunLock(folder):`` owns ``folder`` for the duration of the block."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = storage.join(folder, LOCK_NAME)
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            if self._create(json.dumps(me).encode()):
                self.held = True
                return
            holder = _read_holder(self.path)
            if not _is_stale(holder):
                who = (f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
                       if holder else "another run")
                raise UsageError(f"experiment folder {self.folder} is in use by {who} (lock file {self.path}); "
                                 "wait for that run to end or choose another --experiment (delete the lock "
                                 "file only if that run is really gone)")
            _logger.warning("removing the stale lock of process %s, which is no longer running", holder.get("pid"))
            storage.remove(self.path)
        raise UsageError(f"could not take the lock {self.path}: another run took it at the same time")

    def _create(self, data: bytes) -> bool:
        try:
            storage.makedirs(self.folder)
            return storage.create_exclusive(self.path, data)
        except OSError as e:
            raise UsageError(f"cannot write to the output folder {self.folder}: {e.strerror or e}") from None

    def release(self) -> None:
        if self.held:
            self.held = False
            holder = _read_holder(self.path)
            if holder is not None and holder.get("pid") == os.getpid():
                storage.remove(self.path)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
