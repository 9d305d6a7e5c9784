"""Checkpoint files: atomic writes, verified reads.

A checkpoint is one ``.npz`` file of host arrays:

* ``param/<name>``, ``adam_m/<name>``, ``adam_v/<name>`` for every parameter;
* ``meta``: a JSON document (stored as a 0-d string array) with the format
  version, the training position (epoch, step, ...), the random-generator
  state, the config, the metric history, and the SHA-256 of every array.

Writing goes to a temporary file in the same folder, which is flushed,
fsync'ed and renamed over the target: a crash or a full disk leaves the
previous checkpoint intact. Reading checks the zip structure, the format
version and every array's checksum, and names the file in every error.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import zipfile

import numpy

from .atomic import atomic_write

__all__ = ["CheckpointError", "save", "load", "FORMAT_VERSION"]

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupted, truncated or does not fit the model."""


def _digest(a: numpy.ndarray) -> str:
    a = numpy.ascontiguousarray(a)
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def save(path, arrays: dict, meta: dict) -> None:
    """Atomically write ``arrays`` (name -> host array) and ``meta`` (JSON-able) to ``path``."""
    host = {k: numpy.asarray(v) for k, v in arrays.items()}
    meta = dict(meta, format_version=FORMAT_VERSION, sha256={k: _digest(v) for k, v in host.items()})
    with atomic_write(path) as f:
        numpy.savez(f, meta=numpy.array(json.dumps(meta)), **host)


def load(path) -> tuple[dict, dict]:
    """Read and verify a checkpoint: returns ``(arrays, meta)``.

    Raises
    ------
    CheckpointError
        Naming the file and the problem: missing, not a checkpoint, truncated
        or corrupted (zip CRC or SHA-256 mismatch), or an unknown format version.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with numpy.load(path, allow_pickle=False) as z:
            names = list(z.files)
            if "meta" not in names:
                raise CheckpointError(f"checkpoint {path} has no 'meta' record: not a scratchvae checkpoint")
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in names if k != "meta"}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({type(err).__name__}: {err})") from err
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, this scratchvae reads {FORMAT_VERSION}")
    sums = meta.get("sha256", {})
    if set(sums) != set(arrays):
        raise CheckpointError(f"checkpoint {path} is incomplete: arrays {sorted(set(sums) ^ set(arrays))} "
                              "are listed but missing, or present but unlisted")
    for name, a in arrays.items():
        if _digest(a) != sums[name]:
            raise CheckpointError(f"checkpoint {path}: checksum mismatch in array {name!r} (the file is corrupted)")
    return arrays, meta
