"""Atomic file writes: a reader sees the old file or the complete new one.

Checkpoints, metrics, figures and downloads all go through
:func:`atomic_write`, so a crash, a full disk or Ctrl-C in the middle of a
write never leaves a half-written file in place of a good one.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import secrets

__all__ = ["atomic_write", "write_json", "to_jsonable", "remove_stale_temporaries", "TEMP_PATTERN"]

# the temporary files atomic_write makes: .<name>.<pid>.<8 hex>.tmp
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


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
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from err
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(path)) from err
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


def remove_stale_temporaries(folder) -> list[str]:
    """Delete the temporary files that interrupted :func:`atomic_write` calls left in ``folder``.

    A write killed with ``kill -9`` (or a power cut) leaves its
    ``.<name>.<pid>.<hex>.tmp`` behind; the target itself is untouched.
    Only files of that pattern whose writer process is gone are removed
    (a live writer in another process keeps its file). Returns their names.
    """
    removed = []
    folder = pathlib.Path(folder)
    for entry in folder.iterdir() if folder.is_dir() else ():
        m = TEMP_PATTERN.match(entry.name)
        if m is None or not entry.is_file() or _process_alive(int(m.group("pid"))):
            continue
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed.append(entry.name)
    return sorted(removed)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from before: this process is not writing it now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path, obj) -> None:
    """Atomically write ``obj`` as indented JSON (a ``str`` is written as it is)."""
    text = obj if isinstance(obj, str) else json.dumps(to_jsonable(obj), indent=2) + "\n"
    with atomic_write(path) as f:
        f.write(text.encode())


def to_jsonable(obj):
    """Recursively turn NumPy scalars and arrays, and tuples, into plain Python (for JSON)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    tolist = getattr(obj, "tolist", None)     # NumPy arrays and scalars (CuPy arrays must be fetched first)
    if tolist is not None and type(obj).__module__.startswith("numpy"):
        return to_jsonable(tolist())
    return obj


def describe_os_error(err: OSError) -> str:
    """One line for an OS error: what happened, and to which file."""
    what = err.strerror or str(err)
    if err.errno == 28:
        what = f"disk full ({what})"
    return f"{what}: {err.filename}" if err.filename else what
