"""Atomic file writes: a reader sees the old file or the complete new one.

Checkpoints, metrics, figures and downloads all go through
:func:`atomic_write`, so a crash, a full disk or Ctrl-C in the middle of a
write never leaves a half-written file in place of a good one.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import secrets

__all__ = ["atomic_write"]


@contextlib.contextmanager
def atomic_write(path):
    """Write ``path`` atomically; use as ``with atomic_write(p) as f: f.write(...)``.

    Yields a binary file opened on a uniquely named temporary file in the
    target's folder (created if needed). When the block ends normally the
    file is flushed, fsync'ed and renamed over ``path``, and the folder is
    fsync'ed so the rename itself survives a crash. When the block raises,
    the temporary file is removed and ``path`` is left as it was.

    The file gets the usual permissions (0o666 less the umask), not the
    0o600 of :func:`tempfile.mkstemp`.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
