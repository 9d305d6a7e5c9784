"""A run folder belongs to one run.

:class:`RunFolder` is what the trainer opens before it does any work:

* ``--out`` is checked first: not empty, not a file, creatable and writable;
* an OS-level lock (``fcntl.flock`` on ``.lock``, released by the kernel when
  the process dies, ``kill -9`` included) keeps a second process out, and the
  message names the holder's PID;
* a folder that already holds a run (a checkpoint, metrics, a summary,
  figures) is refused unless the caller resumes it or asks to overwrite it,
  in which case exactly that run's files are deleted first;
* resuming checks identity: every file the folder already holds must carry
  the resumed run's identity, so a checkpoint copied out of run A can never
  continue into run B's folder and replace B's files;
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
import json
import os
import pathlib
import uuid

from . import checkpoint
from .atomic import remove_stale_temporaries

__all__ = ["RunFolder", "RunFolderError", "RUN_FILES", "new_run_id", "run_ids", "new_run_folder", "point_latest"]

# Every file a training run writes into its folder (evaluate_run.py adds the last two).
RUN_FILES = ("checkpoint.npz", "best.npz", "metrics.jsonl", "summary.json", "samples.png", "reconstructions.png",
             "curves.png", "posterior.png", "latent.png", "manifold.png", "interpolation.png", "denoising.png", "pseudo_inputs.png", "evaluation-best.json",
             "evaluation-last.json")
LOCK_NAME = ".lock"


class RunFolderError(RuntimeError):
    """``--out`` cannot be used for this run; the message says why and what to do."""


def new_run_id() -> str:
    """A fresh identity for a run (32 hex digits)."""
    return uuid.uuid4().hex


def new_run_folder(root="runs", now=None) -> pathlib.Path:
    """A folder name no run has taken yet: ``root/YYYY-MM-DD_HH-MM-SS``, then ``_2``, ``_3``, ... within one second
    (the default ``--out``: each run gets its own folder, as TensorBoard's ``runs/<date>``)."""
    import datetime
    now = datetime.datetime.now() if now is None else now
    base = pathlib.Path(root) / now.strftime("%Y-%m-%d_%H-%M-%S")
    path, n = base, 1
    while path.exists() or path.is_symlink():
        n += 1
        path = base.with_name(f"{base.name}_{n}")
    return path


def point_latest(folder) -> str | None:
    """Make ``latest`` beside ``folder`` a symbolic link to it (replaced atomically); returns a note when a
    ``latest`` that is not a link (an older scratchvae's default run folder) is left alone, else None."""
    folder = pathlib.Path(folder)
    link = folder.parent / "latest"
    if link.exists() and not link.is_symlink():
        return f"note: {link} is a folder, not a link, so it was left as it is; this run is in {folder}"
    tmp = folder.parent / f".latest.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(folder.name, tmp)
    os.replace(tmp, link)
    return None


class RunFolder:
    """The output folder of one run, locked for as long as the object is open.

    Parameters
    ----------
    path : str or os.PathLike
        The folder (``--out``).
    mode : {"new", "resume", "overwrite"}
        ``new`` refuses a folder that holds a run; ``resume`` accepts an
        empty folder or one whose files all belong to run ``run_id``;
        ``overwrite`` deletes that run's files (:data:`RUN_FILES`) first.
    run_id : str, optional
        With ``resume``: the identity of the run being continued.
    checkpoint : path, optional
        With ``resume``: the checkpoint file being continued from. One without
        an identity (written before runs had one) can continue only in its own
        folder, or into a folder without run files.

    Use as a context manager; ``removed_temporaries`` lists the stale
    temporary files that were deleted on opening.
    """

    def __init__(self, path, mode: str = "new", run_id: str | None = None, checkpoint=None):
        if mode not in ("new", "resume", "overwrite"):
            raise ValueError(f"RunFolder: mode must be 'new', 'resume' or 'overwrite', got {mode!r}")
        if not str(path).strip():
            raise RunFolderError("--out is empty; name the folder the run should write into")
        self.path = pathlib.Path(path)
        self.mode = mode
        self.run_id = run_id
        self.checkpoint = None if checkpoint is None else pathlib.Path(checkpoint)
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
            if "checkpoint.npz" not in present:
                raise RunFolderError(
                    f"--out {self.path} holds the files of a run that stopped before writing its first checkpoint "
                    f"({', '.join(present)}), so there is nothing to resume; pass --overwrite to delete them and "
                    "start a new run there, or choose another --out")
            raise RunFolderError(
                f"--out {self.path} already holds a run ({', '.join(present)}); pass --resume {self.path} to "
                f"continue it, or --overwrite to delete its files and start a new run there")
        if self.mode == "resume" and self.run_id is None:
            own = self.checkpoint is not None and self.checkpoint.resolve() == (self.path / "checkpoint.npz").resolve()
            if present and not own:
                raise RunFolderError(
                    f"--out {self.path} holds a run ({', '.join(present)}) and the checkpoint {self.checkpoint} "
                    "records no run identity (an old format), so it cannot be shown to be that run's; continue "
                    "into a new folder with --out")
        elif self.mode == "resume":
            others = {name: rid for name, rid in run_ids(self.path).items() if rid != self.run_id}
            damaged = [name for name, rid in others.items() if rid in ("unreadable", "several")]
            if damaged:
                name = damaged[0]
                raise RunFolderError(
                    f"{self.path / name} is damaged ({'not valid JSON' if others[name] == 'unreadable' else 'lines of several runs'}), "
                    f"so it cannot be shown to belong to the run being resumed ({self.run_id}); the checkpoint "
                    f"holds the run's whole history and the file is written anew from it: move {name} out of "
                    f"{self.path} and resume again")
            if others:
                name, rid = next(iter(others.items()))
                raise RunFolderError(
                    f"--out {self.path} holds another run ({name} belongs to run {rid}, the checkpoint being "
                    f"resumed to run {self.run_id}); continuing here would replace that run's files. Continue "
                    "into a new folder with --out, or resume that folder's own checkpoint.npz")
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


def run_ids(folder) -> dict:
    """The run identity recorded in each run file of ``folder`` that records one: name -> run_id.

    Checkpoints' metadata is read through :mod:`scratchvae.checkpoint`;
    JSON files by their ``run_id`` field (``metrics.jsonl``: every line's).
    A file that cannot be read is reported as ``"unreadable"``.
    """
    folder, ids = pathlib.Path(folder), {}
    for name in ("checkpoint.npz", "best.npz"):
        if (folder / name).exists():
            ids[name] = checkpoint.load_meta(folder / name).get("run_id")
    for name in ("summary.json", "evaluation-best.json", "evaluation-last.json", "metrics.jsonl"):
        path = folder / name
        if not path.exists():
            continue
        try:
            text = path.read_text(encoding="utf-8")
            records = ([json.loads(line) for line in text.splitlines() if line.strip()] if name.endswith(".jsonl")
                       else [json.loads(text)])
        except (OSError, ValueError):
            ids[name] = "unreadable"
            continue
        found = {r.get("run_id") if isinstance(r, dict) else "unreadable" for r in records}
        if found:
            ids[name] = found.pop() if len(found) == 1 else "several"
    return ids
