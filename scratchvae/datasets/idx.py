"""IDX files, MNIST's format: parsing, checking, and the MNIST file layout.

:func:`read_idx` reads one file (plain or gzip-compressed) and checks its
header against its size; :func:`find_idx_files` finds MNIST's four file
names in a folder; :func:`load_idx_files` turns them into a
:class:`~scratchvae.datasets.Dataset`.
"""
from __future__ import annotations

import gzip
import math
import pathlib
import struct
import zlib

import numpy

from .core import Dataset, DatasetUnavailable, all_binary, binarize_splits

__all__ = ["read_idx", "IDXFormatError", "MNIST_FILES", "find_idx_files", "load_idx_files"]

#: MNIST's four official IDX files, by role.
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

#: Number of training images MNIST-style datasets hold out for validation
#: (MNIST: the last 10,000 of 60,000) is ``n_train // _VALID_FRACTION``.
_VALID_FRACTION = 6

# IDX element types: the third magic byte -> big-endian dtype.
_IDX_DTYPES = {
    0x08: numpy.dtype(">u1"),
    0x09: numpy.dtype(">i1"),
    0x0B: numpy.dtype(">i2"),
    0x0C: numpy.dtype(">i4"),
    0x0D: numpy.dtype(">f4"),
    0x0E: numpy.dtype(">f8"),
}
_IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3-D (count, rows, cols)
_IDX_LABELS_MAGIC = 0x00000801  # uint8, 1-D (count,)




class IDXFormatError(ValueError):
    """An IDX file is malformed (bad magic, truncated, trailing bytes, ...).

    Attributes
    ----------
    path : pathlib.Path
        The offending file.
    """

    def __init__(self, path, problem):
        self.path = pathlib.Path(path)
        super().__init__(f"{self.path}: {problem}")


def read_idx(path) -> numpy.ndarray:
    """Read an IDX file (MNIST's format), plain or gzip-compressed.

    The header is validated: two zero bytes, a known element type, at least
    one dimension, and a byte count that matches the dimensions exactly.
    Gzip compression is detected from the file's first bytes, not its name.

    Parameters
    ----------
    path : str or os.PathLike
        The file, e.g. ``t10k-images-idx3-ubyte.gz``.

    Returns
    -------
    numpy.ndarray
        A writable array in native byte order with the header's shape and
        element type (uint8 for MNIST's images and labels).

    Raises
    ------
    IDXFormatError
        Bad gzip stream, bad magic number, truncated data or trailing bytes;
        the message names the file.
    FileNotFoundError
        No such file.
    """
    path = pathlib.Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as err:
            raise IDXFormatError(path, f"corrupt or truncated gzip data ({err})") from err
    if len(raw) < 4:
        raise IDXFormatError(path, f"too short for an IDX header ({len(raw)} bytes)")
    magic = struct.unpack(">I", raw[:4])[0]
    code, ndim = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise IDXFormatError(
            path, f"not an IDX file: magic number 0x{magic:08x}; expected 0x0000TTNN with a type "
                  f"TT in {{{', '.join(f'0x{t:02x}' for t in _IDX_DTYPES)}}} and NN >= 1 dimensions "
                  f"(MNIST images: 0x{_IDX_IMAGES_MAGIC:08x}, labels: 0x{_IDX_LABELS_MAGIC:08x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXFormatError(path, f"truncated header: magic 0x{magic:08x} announces {ndim} dimensions "
                                   f"({header} header bytes) but the data has {len(raw)} bytes")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "trailing bytes after the data"
        raise IDXFormatError(
            path, f"{problem}: header announces shape {dims} of {dtype.newbyteorder('=').name} "
                  f"({expected} bytes with the header), but the data has {len(raw)} bytes")
    array = numpy.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


def _check_idx_kind(path, array, kind):
    """Check that an array read from ``path`` is MNIST-style images or labels."""
    magic = {"images": _IDX_IMAGES_MAGIC, "labels": _IDX_LABELS_MAGIC}[kind]
    ndim = 3 if kind == "images" else 1
    if array.dtype != numpy.uint8 or array.ndim != ndim:
        code = {v.newbyteorder("="): k for k, v in _IDX_DTYPES.items()}[array.dtype]
        found = (code << 8) | array.ndim
        raise IDXFormatError(
            path, f"expected an IDX {kind} file (magic 0x{magic:08x}: uint8, {ndim}-D), found magic "
                  f"0x{found:08x} ({array.dtype}, {array.ndim}-D, shape {array.shape})")
    if kind == "images" and (array.shape[1] == 0 or array.shape[2] == 0):
        raise IDXFormatError(path, f"images have an empty size {array.shape[1]}x{array.shape[2]}")


def load_idx_files(name, paths, n_valid, binarize, rng):
    """Build a Dataset from the four MNIST-style IDX files in ``paths``."""
    arrays = {}
    for role, path in paths.items():
        arrays[role] = read_idx(path)
        _check_idx_kind(path, arrays[role], role.split("_")[1])
    for split in ("train", "test"):
        n_images = arrays[f"{split}_images"].shape[0]
        n_labels = arrays[f"{split}_labels"].shape[0]
        if n_images != n_labels:
            raise IDXFormatError(
                paths[f"{split}_labels"],
                f"holds {n_labels} labels but {paths[f'{split}_images'].name} holds {n_images} images")
        if n_images == 0:
            raise IDXFormatError(paths[f"{split}_images"], "holds no images")
    train_hw = arrays["train_images"].shape[1:]
    test_hw = arrays["test_images"].shape[1:]
    if train_hw != test_hw:
        raise IDXFormatError(
            paths["test_images"],
            f"images are {test_hw[0]}x{test_hw[1]} but {paths['train_images'].name} "
            f"holds {train_hw[0]}x{train_hw[1]} images")

    n_train_all = arrays["train_images"].shape[0]
    if n_valid is None:
        n_valid = n_train_all // _VALID_FRACTION
    n_valid = int(n_valid)
    if not 0 <= n_valid < n_train_all:
        raise ValueError(f"{name}: n_valid={n_valid} must be in [0, {n_train_all}) "
                         f"(the training file holds {n_train_all} images)")
    cut = n_train_all - n_valid

    def pixels(images):
        return images.reshape(images.shape[0], -1).astype(numpy.float32) / numpy.float32(255)

    train_x = pixels(arrays["train_images"])
    test_x = pixels(arrays["test_images"])
    train_y, test_y = arrays["train_labels"], arrays["test_labels"]
    valid_x = train_x[cut:] if n_valid else None
    valid_y = train_y[cut:] if n_valid else None
    train_x, train_y = train_x[:cut], train_y[:cut]
    splits = binarize_splits((train_x, valid_x, test_x), binarize, rng)
    return Dataset(
        name=name, train=splits[0], valid=splits[1], test=splits[2],
        train_labels=train_y.copy(), valid_labels=None if valid_y is None else valid_y.copy(),
        test_labels=test_y, image_shape=(1,) + tuple(int(s) for s in train_hw),
        binary=all_binary(splits), dynamic_binarization=binarize == "dynamic")


def find_idx_files(folder):
    """The four MNIST file names in ``folder``, uncompressed or ``.gz``."""
    paths, missing = {}, []
    for role, gz_name in MNIST_FILES.items():
        plain = folder / gz_name[:-3]
        gz = folder / gz_name
        # The uncompressed file wins when both exist (it is faster to read).
        if plain.is_file():
            paths[role] = plain
        elif gz.is_file():
            paths[role] = gz
        else:
            missing.append(f"{gz_name[:-3]}[.gz]")
    if missing:
        raise DatasetUnavailable(
            f"dataset 'idx': {len(missing)} of 4 IDX files missing in {folder}: {', '.join(missing)}. "
            f"The folder must hold MNIST's four file names, gzip-compressed or not: "
            f"{', '.join(n[:-3] for n in MNIST_FILES.values())}",
            files=missing, folder=folder)
    return paths
