"""One run per run directory: a lock file naming the host and PID of the run that owns it.

RUN/run.lock is created atomically by rank 0 when training starts and removed when it ends. While
the run lives, a daemon thread refreshes the file's modification time (a heartbeat), so that a
lock can be judged from any node: its owner is alive when it is on this host and its PID exists,
or, on another host, when its heartbeat is recent. A second run started in the same directory (a
requeued job while the old one is still dying, ranks left behind by a killed launcher) is refused
with the owner named; a lock left by an owner that is gone is taken over, and the log says so.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Optional

from megatron_plugin.errors import UserError

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT_S = 20.0
# A lock whose heartbeat is older than this has no live owner, whatever its PID says (a PID can
# be reused by another process, and another host's PIDs cannot be checked from here).
STALE_AFTER_S = 120.0


class RunDirInUse(UserError):
    """Another live run owns the run directory."""


@dataclass(frozen=True)
class LockOwner:
    host: str
    pid: int
    started: str
    heartbeat_age_s: float

    def describe(self) -> str:
        return f"PID {self.pid} on host {self.host} (started {self.started}, last heartbeat {self.heartbeat_age_s:.0f} s ago)"

    def is_alive(self) -> bool:
        if self.heartbeat_age_s > STALE_AFTER_S:
            return False
        if self.host != socket.gethostname():
            return True
        return _pid_exists(self.pid)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def read_owner(path: str) -> Optional[LockOwner]:
    """The owner recorded in a lock file, or None if there is no lock."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    try:
        record = json.loads(raw)
        return LockOwner(str(record["host"]), int(record["pid"]), str(record.get("started", "?")), age)
    except (ValueError, KeyError, TypeError):
        # Half written by an owner killed while creating it, or not ours: no live owner to name.
        return LockOwner("?", -1, "?", float("inf"))


class RunDirLock:
    """The lock on one run directory, held by this process until `release()`."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> "RunDirLock":
        os.makedirs(self.run_dir, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return self
            owner = read_owner(self.path)
            if owner is None:
                continue  # released in the meantime
            if owner.is_alive():
                raise RunDirInUse(
                    f"run.dir {self.run_dir} is in use by another run: {owner.describe()}. Stop that "
                    f"run (kill {owner.pid} on {owner.host}) or start this one with another run.dir; "
                    f"if you are sure it is gone, delete {self.path}"
                )
            # Move the stale lock aside first: of two runs taking it over at once, one rename wins.
            stale = f"{self.path}.stale.{os.getpid()}"
            try:
                os.rename(self.path, stale)
            except FileNotFoundError:
                continue
            os.remove(stale)
            logger.warning("run.dir %s: taking over the lock left by %s, which is no longer running",
                           self.run_dir, owner.describe())
        raise RunDirInUse(f"run.dir {self.run_dir}: could not take {self.path}; another run is starting there")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        owner = read_owner(self.path)
        if owner is not None and owner.host == socket.gethostname() and owner.pid == os.getpid():
            os.remove(self.path)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except FileNotFoundError:
                    return

        self._thread = threading.Thread(target=beat, name="run-dir-lock-heartbeat", daemon=True)
        self._thread.start()


def hold_run_dir(run_dir: str) -> Optional[RunDirLock]:
    """Rank 0 takes the run directory's lock; every rank raises RunDirInUse if it could not, so
    that no rank goes on alone. Returns the lock on rank 0, None elsewhere (a lock holds a thread
    and cannot travel between processes, so the ranks agree on a flag)."""
    from megatron_plugin.runtime.distributed import decided_on_rank0

    held: list[RunDirLock] = []

    def take() -> bool:
        held.append(RunDirLock(run_dir).acquire())
        return True

    decided_on_rank0(take)
    return held[0] if held else None
