"""Checkpoint files: atomic writes, verified reads.

A checkpoint is one ``.npz`` file of host arrays:

* ``param/<name>``, ``adam_m/<name>``, ``adam_v/<name>`` for every parameter;
* ``meta``: a JSON document (stored as a 0-d string array) with the format
  version, the run's identity, the training position (epoch, step, ...), the
  noise scheme, the config, the metric history, the SHA-256 of the data the
  run trains on, and the dtype, shape and SHA-256 of every array.

Writing goes to a temporary file in the same folder, which is flushed,
fsync'ed and renamed over the target: a crash or a full disk leaves the
previous checkpoint intact. Reading checks the zip structure, the format
version, every array's header against the metadata and the file (before any
array is read: a crafted header cannot make it allocate 373 GiB) and every
array's checksum, and names the file in every error: any malformed archive
(a bad zip, an unknown compression or version, a garbled ``.npy`` header)
is a :class:`CheckpointError`. Format 1 files (no
identity, no array list) still load.
"""
from __future__ import annotations

import hashlib
import json
import math
import pathlib
import zipfile

import numpy

from .atomic import atomic_write
from .config import TrainConfig

__all__ = ["CheckpointError", "save", "load", "load_meta", "load_run", "FORMAT_VERSION"]

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


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
    meta = dict(meta, format_version=FORMAT_VERSION, sha256={k: _digest(v) for k, v in host.items()},
                arrays={k: [v.dtype.str, list(v.shape)] for k, v in host.items()})
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
        with zipfile.ZipFile(path) as zf:
            # every header first, checked against its member's size, before any array is allocated
            headers = {info.filename[:-4]: (info, *_header(zf, info, path)) for info in zf.infolist()
                       if info.filename.endswith(".npy")}
            if "meta" not in headers:
                raise CheckpointError(f"checkpoint {path} has no 'meta' record: not a scratchvae checkpoint")
            meta = json.loads(str(_read_member(zf, *headers["meta"], path)))
            if not isinstance(meta, dict):
                raise CheckpointError(f"checkpoint {path}: its meta record is not a JSON object")
            version = meta.get("format_version")
            if version not in READABLE_VERSIONS:
                raise CheckpointError(f"checkpoint {path} has format version {version!r}; this scratchvae reads "
                                      f"versions {', '.join(map(str, READABLE_VERSIONS))}")
            if version >= 2:
                _check_listed(path, meta.get("arrays"), {k: h[1] for k, h in headers.items()})
            arrays = {k: _read_member(zf, *h, path) for k, h in headers.items() if k != "meta"}
    except CheckpointError:
        raise
    except Exception as err:   # noqa: BLE001 - a damaged archive fails in zipfile, numpy's header parser, json, ...
        # every malformed-archive error (bad zip, "encrypted" or unknown-version members, a garbled .npy
        # header, truncation) is the same fact for the user: this file is not a readable checkpoint
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({type(err).__name__}: {err})") from err
    sums = meta.get("sha256", {})
    if set(sums) != set(arrays):
        raise CheckpointError(f"checkpoint {path} is incomplete: arrays {sorted(set(sums) ^ set(arrays))} "
                              "are listed but missing, or present but unlisted")
    for name, a in arrays.items():
        if _digest(a) != sums[name]:
            raise CheckpointError(f"checkpoint {path}: checksum mismatch in array {name!r} (the file is corrupted)")
    return arrays, meta


def load_meta(path) -> dict:
    """A checkpoint's metadata alone (its run identity, say), without reading or verifying the arrays;
    a damaged file is a :class:`CheckpointError` naming it, as in :func:`load`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with zipfile.ZipFile(path) as zf, zf.open("meta.npy") as f:
            meta = json.loads(str(numpy.lib.format.read_array(f, allow_pickle=False)))
    except Exception as err:   # noqa: BLE001 - as in load(): any malformed archive is one error naming the file
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({type(err).__name__}: {err})") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: its meta record is not a JSON object")
    return meta


def _header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path) -> tuple:
    """``((dtype, shape), fortran_order, header_bytes)`` of one ``.npy`` member, read from its header
    alone; refuses a header that claims more data than the member holds."""
    with zf.open(info) as f:
        version = numpy.lib.format.read_magic(f)
        read = numpy.lib.format.read_array_header_1_0 if version == (1, 0) else numpy.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(f)
        header_bytes = f.tell()
    if dtype.hasobject:
        raise CheckpointError(f"checkpoint {path}: array {info.filename!r} holds Python objects; refused")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > info.file_size:
        raise CheckpointError(f"checkpoint {path}: array {info.filename!r} claims {shape} {dtype} "
                              f"({nbytes:,} bytes) but the file holds {info.file_size:,} bytes; it is corrupted")
    return (dtype.str, list(shape)), fortran_order, header_bytes


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, spec: tuple, fortran_order: bool, header_bytes: int,
                 path) -> numpy.ndarray:
    """The array of one ``.npy`` member whose header :func:`_header` has read: its data bytes, read to
    the member's end (so that zipfile checks the CRC), into a new writable array."""
    dtype, shape = numpy.dtype(spec[0]), tuple(spec[1])
    raw = numpy.empty(math.prod(shape) * dtype.itemsize, numpy.uint8)
    with zf.open(info) as f:
        f.read(header_bytes)
        got = f.readinto(raw)
        if got != raw.size or f.read(1):
            raise CheckpointError(f"checkpoint {path}: array {info.filename!r} does not hold the "
                                  f"{raw.size:,} bytes its header claims; it is corrupted")
    return raw.view(dtype).reshape(shape, order="F" if fortran_order else "C")


def _check_listed(path, listed, headers: dict) -> None:
    """Every array header must match the dtype and shape the metadata lists for it."""
    present = {k: v for k, v in headers.items() if k != "meta"}
    if not isinstance(listed, dict) or set(listed) != set(present):
        names = sorted(set(listed or {}) ^ set(present)) if isinstance(listed, dict) else "all"
        raise CheckpointError(f"checkpoint {path} is incomplete: arrays {names} are listed but missing, "
                              "or present but unlisted")
    for name, spec in present.items():
        if listed[name] != list(spec):
            raise CheckpointError(f"checkpoint {path}: array {name!r} is {spec[1]} {spec[0]} in the file but "
                                  f"{listed[name]} in its metadata; the file is corrupted")


# -- a training run's checkpoint: its arrays and its metadata --------------------------

# Every key a training checkpoint's meta may hold, with its JSON type(s).
RUN_META = {"run_id": (str, type(None)), "epoch": int, "step": int, "batch_in_epoch": int, "adam_step": int,
            "rng_state": dict, "epoch_rng_state": (dict, type(None)), "config": dict, "history": list,
            "partial": (dict, type(None)), "initial_test": (dict, type(None)), "best": dict,
            "format_version": int, "sha256": dict, "arrays": dict, "world_size": int,
            "data_sha256": (str, type(None))}
RUN_META_REQUIRED = ("epoch", "step", "batch_in_epoch", "adam_step", "rng_state", "config", "history")


def run_arrays(model, opt_state, be) -> dict:
    """The host arrays of a training checkpoint: ``param/``, ``adam_m/``, ``adam_v/`` per parameter."""
    arrays = {}
    for name, p in model.params.items():
        arrays[f"param/{name}"] = be.asnumpy(p)
        arrays[f"adam_m/{name}"] = be.asnumpy(opt_state.m[name])
        arrays[f"adam_v/{name}"] = be.asnumpy(opt_state.v[name])
    return arrays


def restore(path, arrays: dict, model, opt_state, be) -> None:
    """Copy ``arrays`` (from the file ``path``) into the model's parameters and, unless
    ``opt_state`` is None, the Adam moments.

    Every array is checked against its target (name, shape, dtype) and must be
    finite; nothing unknown may be left over.
    """
    arrays = _top_level_names(arrays, getattr(model, "levels", 1))
    for name, p in model.params.items():
        targets = [("param", p)]
        if opt_state is not None:
            targets += [("adam_m", opt_state.m[name]), ("adam_v", opt_state.v[name])]
        for prefix, target in targets:
            key = f"{prefix}/{name}"
            if key not in arrays:
                raise CheckpointError(f"checkpoint {path} does not fit the model: no array {key!r}")
            a = arrays[key]
            if a.shape != target.shape or a.dtype != target.dtype:
                raise CheckpointError(
                    f"checkpoint {path} does not fit the model: {key} is {a.shape} {a.dtype}, "
                    f"the model needs {tuple(target.shape)} {target.dtype}")
            if not numpy.isfinite(a).all():
                raise CheckpointError(f"checkpoint {path}: {key} holds NaN or Inf values; refusing to use it")
            if prefix == "adam_v" and (a < 0).any():
                raise CheckpointError(f"checkpoint {path}: {key} holds negative values, which Adam's second moment "
                                      "(a running mean of squares) cannot; refusing to use it")
            target[...] = be.asarray(a)
    extra = {k.split("/", 1)[1] for k in arrays} - set(model.params)
    if extra:
        raise CheckpointError(f"checkpoint {path} does not fit the model: unknown parameters {sorted(extra)}")


def _top_level_names(arrays: dict, levels: int) -> dict:
    """The arrays with the names of today's models: a hierarchy's top level was first written as
    ``q{T}.x``, ``q{T}.mu`` and ``q{T}.log_sigma``; it now has the one-level names ``encoder``, ``mu``
    and ``log_sigma`` (the same arrays, so such a checkpoint loads, resumes and evaluates unchanged)."""
    old = {f"q{levels}.x.": "encoder.", f"q{levels}.mu.": "mu.", f"q{levels}.log_sigma.": "log_sigma."}
    if levels < 2 or not any(k.split("/", 1)[1].startswith(tuple(old)) for k in arrays):
        return arrays
    renamed = {}
    for key, a in arrays.items():
        prefix, name = key.split("/", 1)
        for was, now in old.items():
            if name.startswith(was):
                name = now + name[len(was):]
                break
        renamed[f"{prefix}/{name}"] = a
    return renamed


def check_run_meta(meta: dict, path) -> dict:
    """Refuse a training checkpoint's meta with unknown keys, missing keys, wrong types or
    impossible values (hand-edited or from another program); returns ``meta``."""
    unknown = sorted(set(meta) - set(RUN_META))
    if unknown:
        raise CheckpointError(f"checkpoint {path}: unknown metadata keys {unknown}")
    missing = [k for k in RUN_META_REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path}: metadata lacks {missing}; not a training checkpoint")
    for key, kinds in RUN_META.items():
        if key in meta:
            value = meta[key]
            kinds = kinds if isinstance(kinds, tuple) else (kinds,)
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise CheckpointError(f"checkpoint {path}: metadata {key!r} is {value!r}, expected "
                                      f"{' or '.join(k.__name__ for k in kinds)}")
    for key in ("epoch", "step", "batch_in_epoch", "adam_step"):
        if meta[key] < 0:
            raise CheckpointError(f"checkpoint {path}: metadata {key!r} is {meta[key]}, expected >= 0")
    if meta.get("world_size", 1) < 1:
        raise CheckpointError(f"checkpoint {path}: metadata 'world_size' is {meta['world_size']}, expected >= 1")
    if len(meta["history"]) != meta["epoch"] or not all(isinstance(h, dict) for h in meta["history"]):
        raise CheckpointError(f"checkpoint {path}: metadata 'history' has {len(meta['history'])} entries for "
                              f"epoch {meta['epoch']}; the file was edited or is corrupted")
    if meta["batch_in_epoch"] > 0 and meta.get("partial") is None:
        raise CheckpointError(f"checkpoint {path}: a mid-epoch checkpoint without the epoch's sums ('partial')")
    best = meta.get("best", {"epoch": 0, "valid_loss": math.inf})
    if not (isinstance(best.get("epoch"), int) and 0 <= best["epoch"] <= meta["epoch"]
            and isinstance(best.get("valid_loss"), (int, float))):
        raise CheckpointError(f"checkpoint {path}: metadata 'best' is {best!r}")
    return meta


def load_run(path) -> tuple[dict, dict, TrainConfig]:
    """Read and verify a training checkpoint: ``(arrays, meta, config)``.

    :func:`load`, then :func:`check_run_meta`, then the stored config through
    :meth:`TrainConfig.from_dict` (unknown keys and bad values are refused,
    naming the file).
    """
    arrays, meta = load(path)
    meta = check_run_meta(meta, path)
    return arrays, meta, TrainConfig.from_dict(meta["config"], source=f"checkpoint {path}")


def load_parameters(path, model, be, *, run_id=None) -> dict:
    """Load the parameters of a checkpoint or ``best.npz`` into ``model`` (checked); returns the file's meta.

    With ``run_id`` given, a file written by another run is refused.
    """
    arrays, meta = load(path)
    if run_id is not None and meta.get("run_id") != run_id:
        raise CheckpointError(f"{path} was written by another run (run {meta.get('run_id')}, not {run_id}); "
                              "it does not belong to this run's checkpoint")
    restore(path, {k: a for k, a in arrays.items() if k.startswith("param/")}, model, None, be)
    return meta
