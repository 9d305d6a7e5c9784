"""A run folder belongs to one run.

:class:`RunFolder` is what the trainer opens before it does any work:

* ``--out`` is checked first: not empty, not a file, creatable and writable;
* an OS-level lock (``fcntl.flock`` on ``.lock``, released by the kernel when
  the process dies, ``kill -9`` included) keeps a second process out, and the
  message names the holder's PID;
* a folder that already holds a run (a checkpoint, metrics, a summary,
  figures) is refused unless the caller resumes it or asks to overwrite it,
  in which case exactly that run's files are deleted first;
* temporary files left by interrupted atomic writes are removed;
* a folder the run created and never wrote into is removed again when the
  run fails, so a bad flag leaves nothing behind.

Every file a run writes records the run's identity (:func:`new_run_id`), so a
reader can refuse a file that another run left in the same folder.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pathlib
import uuid

from .atomic import remove_stale_temporaries

__all__ = ["RunFolder", "RunFolderError", "RUN_FILES", "new_run_id"]

# Every file a training run writes into its folder (evaluate_run.py adds the last two).
RUN_FILES = ("checkpoint.npz", "best.npz", "metrics.jsonl", "summary.json", "samples.png", "reconstructions.png",
             "curves.png", "posterior.png", "latent.png", "manifold.png", "interpolation.png", "denoising.png", "evaluation-best.json",
             "evaluation-last.json")
LOCK_NAME = ".lock"


class RunFolderError(RuntimeError):
    """``--out`` cannot be used for this run; the message says why and what to do."""


def new_run_id() -> str:
    """A fresh identity for a run (32 hex digits)."""
    return uuid.uuid4().hex


class RunFolder:
    """The output folder of one run, locked for as long as the object is open.

    Parameters
    ----------
    path : str or os.PathLike
        The folder (``--out``).
    mode : {"new", "resume", "overwrite"}
        ``new`` refuses a folder that holds a run; ``resume`` expects one;
        ``overwrite`` deletes that run's files (:data:`RUN_FILES`) first.

    Use as a context manager; ``removed_temporaries`` lists the stale
    temporary files that were deleted on opening.
    """

    def __init__(self, path, mode: str = "new"):
        if mode not in ("new", "resume", "overwrite"):
            raise ValueError(f"RunFolder: mode must be 'new', 'resume' or 'overwrite', got {mode!r}")
        if not str(path).strip():
            raise RunFolderError("--out is empty; name the folder the run should write into")
        self.path = pathlib.Path(path)
        self.mode = mode
        self.created = False
        self.removed_temporaries: list[str] = []
        self._lock_fd = None

    # -- opening -------------------------------------------------------------------
    def __enter__(self) -> RunFolder:
        self._make_folder()
        try:
            self._lock()
            self.removed_temporaries = remove_stale_temporaries(self.path)
            self._check_contents()
        except BaseException:
            self.close(failed=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(failed=exc_type is not None)

    def _make_folder(self):
        p = self.path
        if p.exists() and not p.is_dir():
            raise RunFolderError(f"--out {p} is a file, not a folder; choose a folder for the run's outputs")
        self.created = not p.exists()
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunFolderError(f"cannot create the run folder --out {p}: {err.strerror}") from err

    def _lock(self):
        lock = self.path / LOCK_NAME
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise RunFolderError(f"cannot write into the run folder --out {self.path}: {err.strerror}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderError(f"the run folder {self.path} is in use by another process (PID {holder}); "
                                     "wait for it to finish or choose another --out") from None
            raise RunFolderError(f"cannot lock the run folder {self.path}: {err.strerror}") from err
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:
            os.close(fd)
            raise RunFolderError(f"cannot write into the run folder --out {self.path}: {err.strerror}") from err
        self._lock_fd = fd

    def _check_contents(self):
        present = self.run_files()
        if self.mode == "new" and present:
            raise RunFolderError(
                f"--out {self.path} already holds a run ({', '.join(present)}); pass --resume {self.path} to "
                f"continue it, or --overwrite to delete its files and start a new run there")
        if self.mode == "overwrite":
            for name in present:
                try:
                    (self.path / name).unlink()
                except OSError as err:
                    raise RunFolderError(f"--overwrite: cannot delete {self.path / name}: {err.strerror}") from err

    def run_files(self) -> list[str]:
        """The names of :data:`RUN_FILES` present in the folder."""
        return [name for name in RUN_FILES if (self.path / name).exists()]

    # -- closing ---------------------------------------------------------------------
    def close(self, failed: bool = False) -> None:
        """Release the lock; after a failure, remove a folder this run created and left empty."""
        fd, self._lock_fd = self._lock_fd, None
        empty = False
        if failed and self.created and self.path.is_dir():
            empty = {p.name for p in self.path.iterdir()} <= {LOCK_NAME}
            if empty and fd is not None:
                with contextlib.suppress(OSError):
                    (self.path / LOCK_NAME).unlink()
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        if empty:
            with contextlib.suppress(OSError):
                self.path.rmdir()
