"""One writer per run folder: :class:`RunLock`.

An ``flock`` on ``<output_dir>/.lock``, released by the kernel when the process ends (even by
``kill -9``), refuses a second process with one line naming the holder (:class:`RunLockedError`);
a lock file left by a dead process is taken over (issue 17).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
from pathlib import Path
from typing import Callable

from .checkpoint import CheckpointError, say_once

LOCK_FILE = ".lock"


class RunLockedError(CheckpointError):
    """Another process holds the run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder (``<output_dir>/.lock``), held by the one process that writes it.

    ``acquire()`` takes an ``flock`` on the lock file, so the kernel releases it when the process ends
    however it ends (``kill -9`` included): a lock file left behind is *stale* and is taken over with a
    line saying so. A second live process gets :class:`RunLockedError` naming the holder (pid, host,
    start time). Where ``flock`` is not supported the holder's pid is checked instead (same host).
    ``release()`` (or leaving the ``with`` block) frees it; a folder that the lock itself created and
    that holds nothing else is removed again, so a failed start leaves nothing behind. Within one
    process the lock is shared (counted): a second trainer on the same folder in the same process
    (tests, notebooks) is not a second writer running at the same time.
    """

    _held: dict[str, list] = {}  # resolved path -> [fd, holders] of the locks this process holds

    def __init__(self, out_dir: str | Path, *, report: Callable[[str], None] | None = say_once):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self.report = report
        self._fd: int | None = None
        self._created_dir = False

    def _holder(self) -> dict:
        try:
            data = json.loads(self.path.read_text() or "{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _describe(self, h: dict) -> str:
        return (f"pid {h.get('pid', '?')} on {h.get('host', '?')}" + (f", since {h['since']}" if h.get("since") else ""))

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        key = str(self.path.resolve())
        if key in RunLock._held:
            RunLock._held[key][1] += 1
            self._fd = RunLock._held[key][0]
            return self
        if not self.out_dir.exists():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._created_dir = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                locked = self._flock(fd)
            except BaseException:
                os.close(fd)
                raise
            if locked is False:
                os.close(fd)
                self._refuse(self._holder())
            try:  # the file may have been replaced between open and lock: lock the one at the path
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = self._holder()
        if locked is None and previous.get("host") == socket.gethostname() and isinstance(previous.get("pid"), int) \
                and previous["pid"] != os.getpid() and _alive(previous["pid"]):
            os.close(fd)
            self._refuse(previous)
        if previous.get("pid") and previous.get("pid") != os.getpid() and self.report is not None:
            self.report(f"note: {self.out_dir} had a stale lock of {self._describe(previous)}, which is no longer "
                        f"running; taking it over")
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        RunLock._held[str(self.path.resolve())] = [fd, 1]
        return self

    @staticmethod
    def _flock(fd: int) -> bool | None:
        """True: locked; False: held by another process; None: this filesystem has no flock."""
        try:
            import fcntl
        except ImportError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            return None

    def _refuse(self, holder: dict) -> None:
        if self._created_dir:
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()
        raise RunLockedError(f"run folder {self.out_dir} is in use by another training process "
                             f"({self._describe(holder)}); wait for it to finish or stop it before "
                             f"resuming (two writers would interleave its metrics and checkpoints)")

    def release(self) -> None:
        if self._fd is None:
            return
        key = str(self.path.resolve())
        held = RunLock._held.get(key)
        if held is not None and held[1] > 1:
            held[1] -= 1
            self._fd = None
            return
        RunLock._held.pop(key, None)
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # no holder; the file stays (unlinking a locked file races)
        os.close(self._fd)
        self._fd = None
        if self._created_dir and [p.name for p in self.out_dir.iterdir()] == [LOCK_FILE]:
            with contextlib.suppress(OSError):
                self.path.unlink()
                self.out_dir.rmdir()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["LOCK_FILE", "RunLock", "RunLockedError"]
