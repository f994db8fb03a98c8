"""One run per output folder: an exclusive lock file, and checks on the ``OUTPUT_DIR`` path itself.

``train.py`` calls :func:`lock_output_dir` before it writes anything into ``OUTPUT_DIR``; a second
``train.py`` started on the same folder (training or ``--eval-only``, same options or not) is refused
at once with one sentence naming the process that holds it. The lock is an OS lock (``flock``) on
``OUTPUT_DIR/run.lock``: the kernel drops it when its holder exits, however it exits, so a crashed
or killed run never leaves the folder stuck; the file also records the holder's PID, host and start
time for the message, and is deleted when the run ends normally. A file left behind by a dead run is
simply taken over. On a file system without ``flock`` (some Lustre / NFS mounts) the PID recorded in
the file is checked instead, which only detects a live holder on the same host.

Under ``torchrun`` only rank 0 takes the lock (one lock per run, not one per rank); the other ranks
write nothing to the folder.

Also here: the default output root of a backbone with random weights (:func:`default_output_root`).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import os.path as osp
import socket
import sys
import time
from typing import Any, Optional

from restore.evaluation.results import DEFAULT_OUTPUT_ROOT, LOCK_FILE, RANDOM_OUTPUT_ROOT

from .distributed import is_main_process

__all__ = ["LOCK_FILE", "OutputDirError", "OutputDirInUse", "OutputLock", "check_output_dir", "lock_output_dir",
           "output_dir_holder", "DEFAULT_OUTPUT_ROOT", "RANDOM_OUTPUT_ROOT", "default_output_root"]

# flock is not available on this file system: fall back to the PID recorded in the file
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class OutputDirError(ValueError):
    """``OUTPUT_DIR`` cannot be used (it is a file, or another run holds it); the message is one sentence."""


class OutputDirInUse(OutputDirError):
    """Another live process holds the folder's lock."""


def check_output_dir(path: str, flag: str = "--output-dir") -> None:
    """Raise :class:`OutputDirError` if ``path`` exists and is not a folder (e.g. a user's ``notes.txt``)."""
    if osp.exists(path) and not osp.isdir(path):
        raise OutputDirError(f"{flag} {path} is an existing file, not a folder: give a folder name (it will hold "
                             "log.txt, config.yaml, checkpoints and results.json); the file was not touched.")


def _read_holder(path: str, tries: int = 5) -> dict[str, Any]:
    """The holder record of a lock file ({} if unreadable); retried briefly while its holder writes it."""
    for i in range(tries):
        try:
            with open(path) as f:
                data = json.loads(f.read() or "{}")
            if isinstance(data, dict) and data:
                return data
        except (OSError, ValueError):
            pass
        if i + 1 < tries:
            time.sleep(0.05)
    return {}


def _describe(holder: dict[str, Any]) -> str:
    pid, host = holder.get("pid", "unknown"), holder.get("host", "unknown")
    started = f", started {holder['started']}" if holder.get("started") else ""
    return f"PID {pid} on host {host}{started}"


def _busy(folder: str, holder: dict[str, Any]) -> OutputDirInUse:
    return OutputDirInUse(f"{folder} is in use by another run ({_describe(holder)}): wait for it to finish or stop "
                          "it, or choose another output folder.")


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, TypeError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class OutputLock:
    """The held lock of one output folder; :meth:`release` (or leaving the ``with`` block) frees it.

    ``previous`` is the record of a run that ended without releasing it (crashed or killed), or None.
    """

    def __init__(self, path: Optional[str] = None, fd: Optional[int] = None,
                 previous: Optional[dict[str, Any]] = None) -> None:
        self.path, self._fd, self.previous = path, fd, previous

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Delete the lock file and drop the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self.path is not None and osp.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.remove(self.path)  # before unlocking: a waiting run re-checks the inode and retries
        except OSError:
            pass
        finally:
            os.close(fd)  # drops the flock

    def takeover_note(self) -> Optional[str]:
        """One sentence if the lock was taken over from a run that ended without releasing it, else None."""
        if not self.previous or self.path is None:
            return None
        return (f"Note: the previous run in {osp.dirname(self.path)} ({_describe(self.previous)}) ended without "
                "releasing its lock (crashed or killed); this run takes the folder over.")

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(sep=" ", timespec="seconds"), "argv": list(sys.argv)}


def lock_output_dir(folder: str, flag: str = "--output-dir") -> OutputLock:
    """Create ``folder`` if needed and take its exclusive lock; call before writing anything into it.

    Raises :class:`OutputDirError` if ``folder`` is an existing file, :class:`OutputDirInUse` (one
    sentence with the holder's PID and host) if another live run holds it. Under ``torchrun`` the
    ranks other than 0 get an empty lock (rank 0's lock covers the run).
    """
    folder = folder or "."
    check_output_dir(folder, flag)
    if not is_main_process():
        return OutputLock()
    path = osp.join(folder, LOCK_FILE)
    try:
        os.makedirs(folder, exist_ok=True)
        return _lock(folder, path)
    except PermissionError as err:
        raise OutputDirError(f"Cannot write into {folder} ({err.strerror}): choose an output folder you can write "
                             "to.") from None


def _lock(folder: str, path: str) -> OutputLock:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(folder, _read_holder(path)) from None
        except OSError as err:
            if err.errno not in _NO_FLOCK:
                os.close(fd)
                raise
            return _take_without_flock(folder, path, fd)
        try:  # a run that was releasing may have deleted the file we opened: lock the current one instead
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    return _write_record(path, fd, _read_holder(path, tries=1) or None)


def _write_record(path: str, fd: int, previous: Optional[dict[str, Any]]) -> OutputLock:
    data = (json.dumps(_record()) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
    return OutputLock(path, fd, previous)


def _take_without_flock(folder: str, path: str, fd: int) -> OutputLock:
    """No ``flock`` here: refuse only a holder recorded as alive on this host (best effort)."""
    holder = _read_holder(path, tries=1)
    if (holder.get("host") == socket.gethostname() and holder.get("pid") != os.getpid()
            and _pid_alive(holder.get("pid"))):
        os.close(fd)
        raise _busy(folder, holder)
    return _write_record(path, fd, holder or None)


def output_dir_holder(folder: str) -> Optional[str]:
    """The sentence :func:`lock_output_dir` would refuse ``folder`` with, or None if no live run holds it.

    Takes nothing and creates nothing (the sweep runner asks before it writes into a step's folder).
    """
    path = osp.join(folder, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return str(_busy(folder, _read_holder(path)))
    except OSError:  # no flock on this file system
        holder = _read_holder(path, tries=1)
        alive = holder.get("host") == socket.gethostname() and _pid_alive(holder.get("pid"))
        return str(_busy(folder, holder)) if alive else None
    finally:
        os.close(fd)
    return None


def default_output_root(backbone: str, output: str = DEFAULT_OUTPUT_ROOT) -> str:
    """:data:`RANDOM_OUTPUT_ROOT` if ``output`` is the default root and ``backbone`` has random weights
    (``tiny``, ``tiny-rn``, ``open_clip:<MODEL>`` without weights), else ``output`` unchanged."""
    from restore.clip.loader import is_random_backbone

    if osp.normpath(output) == DEFAULT_OUTPUT_ROOT and is_random_backbone(backbone):
        return RANDOM_OUTPUT_ROOT
    return output
