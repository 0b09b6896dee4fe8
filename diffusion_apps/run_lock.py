"""One run at a time in a run folder (a logger's version directory): an exclusive ``flock`` on
its ``.lock`` file, which holds the PID of the process that took it.

Two trainings into one version folder (``make demo`` twice, ``--trainer.logger.init_args.version
0``), or two ``--ckpt_path last`` resumes started together, would both train, interleaving
checkpoints and event files. The lock belongs to an open file: the kernel drops it when the
process ends however it ends (SIGKILL included), so a stale ``.lock`` of a dead process never
blocks; the file stays, the next holder writes its own PID in it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = ".lock"


class RunLocked(SystemExit):
    """Another live process holds the folder's lock; exits with the message (code 1)."""


class RunLock:
    """A held lock on a run folder; :meth:`release` (or the process's end) lets it go."""

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder, self._fd = folder, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the flock
            self._fd = None


def lock_run(folder: str | Path) -> RunLock:
    """Take ``folder``'s lock (creating the folder), or raise :class:`RunLocked` naming the PID
    that holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunLocked(
            f"error: {folder} is in use by another run (PID {holder}, holding {path}): wait for "
            "it to end, stop it, or train into another version (--trainer.logger.init_args."
            "version)"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunLock(folder, fd)
