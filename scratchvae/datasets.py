"""Datasets: the shipped binarized MNIST, grayscale MNIST, any IDX folder.

Every loader returns a :class:`Dataset` whose splits are ``(N, D)`` float32
arrays of pixel intensities in ``[0, 1]``, one flattened image per row
(row-major, ``D = prod(image_shape)``).

Three datasets are known (see :data:`DATASETS`):

``"binarized-mnist"`` (the default)
    The static binarization of Larochelle & Murray (2011), the standard
    benchmark for VAE log-likelihoods: 50,000 train / 10,000 valid / 10,000
    test images of 0/1 pixels.  It ships inside the package
    (``scratchvae/data/binarized_mnist.npz``, bit-packed), so it needs no
    network; its SHA-256 is checked on every load.
``"mnist"``
    The official grayscale MNIST IDX files, downloaded on first use from
    public mirrors into a cache folder and checked against their published
    SHA-256 sums (see :func:`download_mnist`).  The last 10,000 of the
    60,000 training images are held out as the validation split, which
    matches the 50k/10k split of the binarized version.
``"idx"``
    Any dataset in MNIST's IDX format (Fashion-MNIST, KMNIST, ...) found in
    ``data_dir`` under MNIST's four file names, validated by its headers.

Pixels of the grayscale datasets are probabilities (``byte / 255``); pass
``binarize="static"`` to sample them to 0/1 once with a fixed seed, or
``binarize="dynamic"`` to keep the probabilities and flag the dataset for
resampling every epoch with :func:`binarize_dynamic`.

Before training, :func:`validate_images` refuses data that would make the
loss meaningless (NaN, wrong shape, integers, values outside ``[0, 1]``).

Examples
--------
>>> from scratchvae import datasets
>>> ds = datasets.load()                      # doctest: +SKIP
>>> ds.train.shape, ds.binary                 # doctest: +SKIP
((50000, 784), True)
"""
from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib
import http.client
import importlib.resources
import io
import math
import os
import pathlib
import socket
import struct
import urllib.error
import urllib.request
import zlib

import numpy

from .atomic import atomic_write
from .backend import array_module

__all__ = [
    "DATASETS",
    "BINARIZATIONS",
    "MNIST_FILES",
    "MNIST_SHA256",
    "MNIST_MIRRORS",
    "BINARIZED_MNIST_SHA256",
    "Dataset",
    "DatasetUnavailable",
    "DatasetIntegrityError",
    "IDXFormatError",
    "InvalidImagesError",
    "ImageShapeError",
    "ImageDtypeError",
    "NonFiniteImagesError",
    "ImageRangeError",
    "load",
    "download_mnist",
    "default_cache_dir",
    "read_idx",
    "binarize_dynamic",
    "binarize_static",
    "validate_images",
]

#: Names accepted by :func:`load`.
DATASETS = ("binarized-mnist", "mnist", "idx")

#: Values accepted for ``binarize=`` by :func:`load`.
BINARIZATIONS = (None, "static", "dynamic")

#: The shipped file, relative to the ``scratchvae`` package.
_SHIPPED_BINARIZED_MNIST = "data/binarized_mnist.npz"

#: SHA-256 of ``scratchvae/data/binarized_mnist.npz`` (Larochelle & Murray's
#: static binarization, bit-packed; see ``load("binarized-mnist")``).
BINARIZED_MNIST_SHA256 = "6017fab13e2451d24cc581019dca665668d27f99c0f751e6db128bbcceff526b"

#: MNIST's four official IDX files, by role.
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

#: SHA-256 of each official MNIST file, byte for byte as published.
#: The two t10k sums were computed here from the published files (whose MD5
#: sums, 9fb629c4... and ec29112d..., are the well-known ones).  The two
#: train files are not available offline on the development machines, so
#: their sums are the widely published ones (TensorFlow Datasets, torchrb,
#: tensorflow-haskell, ...), which other projects pair with the well-known
#: MD5 sums f68b3c2dcbeaaa9fbdd348bbdeb94873 (train images) and
#: d53e105ee54ea40749a09fcbcd1e9432 (train labels).  Read at call time, so a
#: test may monkeypatch this dict (or pass ``sha256=`` to
#: :func:`download_mnist`).
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

#: Public mirrors of the MNIST files, tried in order.  Each is a URL prefix
#: to which a file name is appended (``file://`` URLs work too).
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

#: Number of training images MNIST-style datasets hold out for validation
#: (MNIST: the last 10,000 of 60,000) is ``n_train // _VALID_FRACTION``.
_VALID_FRACTION = 6

_CHUNK = 1 << 16
_UNREACHABLE_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}
_USER_AGENT = "scratchvae-datasets (python urllib)"

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



# --------------------------------------------------------------------------
# errors


class DatasetUnavailable(RuntimeError):
    """A dataset's files are missing and could not be fetched.

    The message lists the files, the folder they are expected in and every
    download attempt (mirror and reason), so an offline user knows what to
    copy where.

    Attributes
    ----------
    files : list of str
        The files that are still missing or unverified.
    folder : pathlib.Path
        The folder they are expected in.
    mirrors : list of str
        The mirrors that were tried (empty when nothing is downloaded).
    attempts : list of tuple
        ``(file, url, reason)`` for each failed attempt.
    """

    def __init__(self, message, files=(), folder=None, mirrors=(), attempts=()):
        super().__init__(message)
        self.files = list(files)
        self.folder = folder
        self.mirrors = list(mirrors)
        self.attempts = list(attempts)


class DatasetIntegrityError(RuntimeError):
    """A file that ships with scratchvae is missing or corrupted.

    Usually an incomplete or damaged install: reinstall the package.
    """


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


class InvalidImagesError(ValueError):
    """Base class of the errors raised by :func:`validate_images`."""


class ImageShapeError(InvalidImagesError):
    """Images are not a 2-D ``(N, D)`` array with the expected ``D``."""


class ImageDtypeError(InvalidImagesError):
    """Images are not a floating-point array."""


class NonFiniteImagesError(InvalidImagesError):
    """Images contain NaN or infinite values."""


class ImageRangeError(InvalidImagesError):
    """Image values fall outside the range the likelihood accepts."""


# --------------------------------------------------------------------------
# the Dataset container


@dataclasses.dataclass
class Dataset:
    """Splits of an image dataset, one flattened image per row.

    Attributes
    ----------
    name : str
        The dataset's name, as given to :func:`load`.
    train : numpy.ndarray
        ``(N_train, D)`` float32 in ``[0, 1]``.
    valid : numpy.ndarray or None
        ``(N_valid, D)`` float32 in ``[0, 1]``, or None without a valid split.
    test : numpy.ndarray
        ``(N_test, D)`` float32 in ``[0, 1]``.
    train_labels : numpy.ndarray or None
        ``(N_train,)`` uint8 class labels, when known.
    test_labels : numpy.ndarray or None
        ``(N_test,)`` uint8 class labels, when known.
    image_shape : tuple of int
        ``(channels, rows, cols)``; ``D == prod(image_shape)``.
    binary : bool
        True when every pixel of every split is exactly 0 or 1.
    valid_labels : numpy.ndarray or None
        ``(N_valid,)`` uint8 class labels, when known.
    dynamic_binarization : bool
        True when the splits hold probabilities that the trainer should
        resample to 0/1 every epoch with :func:`binarize_dynamic`.
    """

    name: str
    train: numpy.ndarray
    valid: numpy.ndarray | None
    test: numpy.ndarray
    train_labels: numpy.ndarray | None = None
    test_labels: numpy.ndarray | None = None
    image_shape: tuple = (1, 28, 28)
    binary: bool = False
    valid_labels: numpy.ndarray | None = None
    dynamic_binarization: bool = False

    def __post_init__(self):
        self.image_shape = tuple(int(s) for s in self.image_shape)
        d = self.n_features
        for split in ("train", "valid", "test"):
            x = getattr(self, split)
            if x is None:
                if split != "valid":
                    raise ValueError(f"Dataset {self.name!r}: the {split} split is required, got None")
                continue
            if x.ndim != 2 or x.shape[1] != d:
                raise ValueError(
                    f"Dataset {self.name!r}: {split} has shape {tuple(x.shape)}, expected (N, {d}) "
                    f"for image_shape {self.image_shape}")
            labels = getattr(self, f"{split}_labels")
            if labels is not None and tuple(labels.shape) != (x.shape[0],):
                raise ValueError(
                    f"Dataset {self.name!r}: {split}_labels has shape {tuple(labels.shape)}, "
                    f"expected ({x.shape[0]},) to match {split}")

    @property
    def n_features(self) -> int:
        """Pixels per image, ``prod(image_shape)``."""
        return int(math.prod(self.image_shape))

    def __repr__(self):
        def shape(a):
            return None if a is None else tuple(a.shape)
        return (f"Dataset(name={self.name!r}, train={shape(self.train)}, valid={shape(self.valid)}, "
                f"test={shape(self.test)}, image_shape={self.image_shape}, binary={self.binary}, "
                f"dynamic_binarization={self.dynamic_binarization}, "
                f"labels={'train ' if self.train_labels is not None else ''}"
                f"{'valid ' if self.valid_labels is not None else ''}"
                f"{'test' if self.test_labels is not None else ''})")


# --------------------------------------------------------------------------
# binarization


def binarize_dynamic(x, rng):
    """Sample 0/1 pixels from Bernoulli(``x``), fresh every call.

    Call once per epoch on probabilities in ``[0, 1]`` (dynamic
    binarization).  Works on NumPy and CuPy arrays alike, given a generator
    of the same backend.

    Parameters
    ----------
    x : array
        Pixel probabilities in ``[0, 1]``.
    rng : Generator
        ``numpy.random.Generator`` (or CuPy's) with a ``random(shape)`` method.

    Returns
    -------
    array
        Same shape and dtype as ``x``, every value 0 or 1.
    """
    return (x > rng.random(x.shape)).astype(x.dtype)


def binarize_static(x, rng=None):
    """Sample 0/1 pixels from Bernoulli(``x``) once, reproducibly.

    Equivalent to ``binarize_dynamic(x, numpy.random.default_rng(seed))`` but
    processed in row chunks to bound memory.

    Parameters
    ----------
    x : numpy.ndarray
        ``(N, D)`` pixel probabilities in ``[0, 1]``.
    rng : None, int or numpy.random.Generator
        The generator, or a seed; None means seed 0.

    Returns
    -------
    numpy.ndarray
        Same shape and dtype as ``x``, every value 0 or 1.
    """
    rng = _as_generator(rng)
    out = numpy.empty_like(x)
    step = 8192
    for start in range(0, x.shape[0], step):
        out[start:start + step] = binarize_dynamic(x[start:start + step], rng)
    return out


def _as_generator(rng):
    if rng is None:
        return numpy.random.default_rng(0)
    if isinstance(rng, numpy.random.Generator):
        return rng
    if isinstance(rng, (int, numpy.integer)) and not isinstance(rng, bool):
        return numpy.random.default_rng(int(rng))
    raise TypeError(f"rng must be None, an int seed or a numpy.random.Generator, got {type(rng).__name__}")


# --------------------------------------------------------------------------
# validation


def validate_images(x, likelihood, name="data", expected_shape=None, value_range=(0.0, 1.0)):
    """Refuse data that a VAE cannot train on, with a message naming the problem.

    Checks, in order: ``x`` is a 2-D ``(N, D)`` array with ``N > 0``; ``D``
    matches ``expected_shape``; the dtype is floating point; every value is
    finite; every value lies in the range the likelihood accepts.

    Grayscale probabilities in ``[0, 1]`` are accepted for the Bernoulli
    likelihood: its loss is a cross-entropy, which is well defined for soft
    targets.  Only values outside ``[0, 1]`` are refused.

    Parameters
    ----------
    x : array
        NumPy or CuPy array, one flattened image per row.
    likelihood : str
        The decoder's likelihood, e.g. ``"bernoulli"`` or ``"gaussian"``.
        For ``"bernoulli"`` values must lie in ``[0, 1]`` whatever
        ``value_range`` says.
    name : str
        What to call ``x`` in messages (``"train"``, ``"valid"``, ...).
    expected_shape : None, int or tuple of int
        Pixels per image (an int) or the image shape (its product is the
        expected ``D``); None skips this check.
    value_range : tuple of float or None
        Inclusive ``(low, high)`` bounds for likelihoods other than
        Bernoulli; None skips the range check for them.

    Returns
    -------
    array
        ``x`` itself, unchanged.

    Raises
    ------
    ImageShapeError
        Not 2-D, no rows, or the wrong number of features.
    ImageDtypeError
        Not a floating-point array (e.g. uint8 bytes not yet divided by 255).
    NonFiniteImagesError
        NaN or infinite values (the message counts them and locates the first).
    ImageRangeError
        Values outside the accepted range (counted, first located).
    """
    if not isinstance(likelihood, str):
        raise TypeError(f"likelihood must be a string such as 'bernoulli', got {likelihood!r}")
    if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
        raise ImageShapeError(f"{name}: expected a NumPy or CuPy array, got {type(x).__name__}")
    if x.ndim != 2:
        hint = " (flatten images to rows: x.reshape(len(x), -1))" if x.ndim > 2 else ""
        raise ImageShapeError(f"{name}: expected a 2-D array (N, D), got shape {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise ImageShapeError(f"{name}: has no rows (shape {tuple(x.shape)})")
    if expected_shape is not None:
        if isinstance(expected_shape, (int, numpy.integer)):
            d, what = int(expected_shape), f"{int(expected_shape)} features"
        else:
            d = int(math.prod(expected_shape))
            what = f"{d} features (image shape {tuple(expected_shape)})"
        if x.shape[1] != d:
            raise ImageShapeError(f"{name}: has {x.shape[1]} features per row, expected {what}; "
                                  f"shape is {tuple(x.shape)}")
    if x.dtype.kind != "f":
        hint = ""
        if x.dtype.kind in "ui":
            hint = "; convert bytes with x.astype('float32') / 255"
        elif x.dtype.kind == "b":
            hint = "; convert with x.astype('float32')"
        raise ImageDtypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}{hint}")

    xp = array_module(x)
    finite = xp.isfinite(x)
    if not bool(finite.all()):
        n_nan = int(xp.isnan(x).sum())
        n_inf = int(x.size - int(finite.sum()) - n_nan)
        row, col = (int(i) for i in xp.argwhere(~finite)[0])
        raise NonFiniteImagesError(
            f"{name}: {n_nan} NaN and {n_inf} infinite value(s) out of {x.size}; "
            f"first at row {row}, column {col} (value {float(x[row, col])})")

    if likelihood.lower() == "bernoulli":
        low, high = 0.0, 1.0
        why = ("the Bernoulli likelihood needs targets in [0, 1] (0/1 pixels or grayscale "
               "probabilities)")
    elif value_range is not None:
        low, high = float(value_range[0]), float(value_range[1])
        why = f"the accepted range for likelihood {likelihood!r} is [{low}, {high}]"
    else:
        return x
    outside = (x < low) | (x > high)
    if bool(outside.any()):
        n_out = int(outside.sum())
        row, col = (int(i) for i in xp.argwhere(outside)[0])
        raise ImageRangeError(
            f"{name}: {n_out} value(s) out of {x.size} outside [{low}, {high}] "
            f"(min {float(x.min())}, max {float(x.max())}); first at row {row}, column {col} "
            f"(value {float(x[row, col])}); {why}")
    return x


# --------------------------------------------------------------------------
# IDX files


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


def _load_idx_files(name, paths, n_valid, binarize, rng):
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
    splits = _binarize_splits((train_x, valid_x, test_x), binarize, rng)
    return Dataset(
        name=name, train=splits[0], valid=splits[1], test=splits[2],
        train_labels=train_y.copy(), valid_labels=None if valid_y is None else valid_y.copy(),
        test_labels=test_y, image_shape=(1,) + tuple(int(s) for s in train_hw),
        binary=_all_binary(splits), dynamic_binarization=binarize == "dynamic")


def _binarize_splits(splits, binarize, rng):
    if binarize == "static":
        rng = _as_generator(rng)  # one generator for all splits, in order train, valid, test
        return tuple(None if x is None else binarize_static(x, rng) for x in splits)
    return tuple(splits)


def _all_binary(splits):
    return all(bool(((x == 0) | (x == 1)).all()) for x in splits if x is not None)


def _find_idx_files(folder):
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


# --------------------------------------------------------------------------
# download


def default_cache_dir(name="mnist") -> pathlib.Path:
    """The folder downloads go to: ``$XDG_CACHE_HOME/scratchvae/<name>``.

    Falls back to ``~/.cache/scratchvae/<name>`` when ``XDG_CACHE_HOME`` is
    unset or not an absolute path.
    """
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = pathlib.Path(base) if base and os.path.isabs(base) else pathlib.Path.home() / ".cache"
    return root / "scratchvae" / name


def _sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _url(mirror, filename):
    return mirror.rstrip("/") + "/" + filename


def _fetch_one(opener, url, folder, filename, expected_sha256, timeout):
    """Download ``url`` to ``folder/filename`` atomically; return None or the reason it failed.

    The body goes to a temporary file in ``folder``, is checked against
    ``Content-Length`` and ``expected_sha256``, flushed and fsynced, then
    renamed over the target.  The temporary file never survives a failure.
    """
    try:
        with atomic_write(folder / filename) as out:
            request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
            with opener.open(request, timeout=timeout) as response:
                announced = response.headers.get("Content-Length")
                digest = hashlib.sha256()
                received = 0
                for block in iter(lambda: response.read(_CHUNK), b""):
                    digest.update(block)
                    out.write(block)
                    received += len(block)
            if announced is not None and announced.strip().isdigit() and received != int(announced):
                raise _Rejected(f"truncated download: received {received} of {int(announced)} bytes")
            actual = digest.hexdigest()
            if actual != expected_sha256:
                raise _Rejected(f"SHA-256 mismatch ({received} bytes): got {actual}, expected {expected_sha256}")
    except _Rejected as rejected:  # atomic_write has removed the temporary file
        return str(rejected)
    return None


class _Rejected(Exception):
    """A download that arrived but must not be kept (the message says why)."""


def _unreachable(err):
    """True for errors that say the mirror's host is down or unknown (not a bad or missing file)."""
    if isinstance(err, urllib.error.HTTPError):
        return False
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, (socket.gaierror, ConnectionRefusedError, TimeoutError)):
        return True
    return isinstance(reason, OSError) and reason.errno in _UNREACHABLE_ERRNOS


def download_mnist(data_dir=None, *, mirrors=None, sha256=None, timeout=30.0, log=None) -> pathlib.Path:
    """Make sure MNIST's four official files are in a folder, downloading what is missing.

    A file already present with the right SHA-256 is not downloaded again; a
    present file with a wrong SHA-256 is downloaded again (never used).  Each
    download is tried on every mirror in turn: a network error, an HTTP
    error, a truncated body or a hash mismatch moves on to the next mirror.
    A mirror that cannot be reached at all is skipped for the remaining files
    of this call.  Each file is written to a temporary file in the same
    folder, flushed, fsynced and atomically renamed into place, so the folder
    never holds a partial file under a final name.

    Parameters
    ----------
    data_dir : str, os.PathLike or None
        The folder; None means :func:`default_cache_dir` ``("mnist")``.
        Created if needed.
    mirrors : sequence of str or None
        URL prefixes tried in order (a file name is appended); None means
        :data:`MNIST_MIRRORS`.  ``file://`` URLs work.
    sha256 : dict or None
        File name -> expected SHA-256 hex digest; None means
        :data:`MNIST_SHA256` (read at call time).
    timeout : float
        Seconds to wait on each connection or read.
    log : callable or None
        Called with one progress message (str) at a time.

    Returns
    -------
    pathlib.Path
        The folder, holding the four verified files.

    Raises
    ------
    DatasetUnavailable
        When some file could not be obtained from any mirror; the message
        lists the files, the folder and every attempt.
    """
    folder = pathlib.Path(data_dir).expanduser() if data_dir is not None else default_cache_dir("mnist")
    if isinstance(mirrors, str):
        raise TypeError(f"mirrors must be a sequence of URL prefixes, got one string {mirrors!r}; "
                        f"wrap it in a list")
    mirrors = list(MNIST_MIRRORS if mirrors is None else mirrors)
    if not all(isinstance(m, str) for m in mirrors):
        raise TypeError(f"mirrors must be a sequence of URL prefixes (str), got {mirrors!r}")
    hashes = dict(MNIST_SHA256 if sha256 is None else sha256)
    say = log or (lambda message: None)
    filenames = list(MNIST_FILES.values())
    unknown = [f for f in filenames if f not in hashes]
    if unknown:
        raise ValueError(f"sha256 is missing the expected digest of {', '.join(unknown)}")

    needed, stale = [], {}
    if folder.is_dir():
        for filename in filenames:
            target = folder / filename
            if target.is_file():
                actual = _sha256_of(target)
                if actual == hashes[filename]:
                    say(f"{filename}: present in {folder}, SHA-256 verified")
                    continue
                stale[filename] = actual
                say(f"{filename}: present in {folder} but its SHA-256 is {actual}, expected "
                    f"{hashes[filename]}; downloading it again")
            needed.append(filename)
    else:
        needed = filenames
    if not needed:
        return folder

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatasetUnavailable(
            f"MNIST: cannot create the folder {folder} for {', '.join(needed)} ({err}); point "
            f"--data-dir (data_dir= in Python) at a writable folder", files=needed, folder=folder) from err

    opener = urllib.request.build_opener()
    attempts, dead, failed = [], set(), []
    for filename in needed:
        for mirror in mirrors:
            url = _url(mirror, filename)
            if mirror in dead:
                attempts.append((filename, url, "skipped: mirror unreachable earlier in this call"))
                continue
            say(f"{filename}: downloading {url}")
            try:
                reason = _fetch_one(opener, url, folder, filename, hashes[filename], timeout)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
                # URLError covers HTTPError, DNS and refused connections; OSError
                # covers resets and timeouts mid-body; ValueError a malformed URL.
                reason = f"{type(err).__name__}: {err}"
                if _unreachable(err):
                    dead.add(mirror)
            if reason is None:
                say(f"{filename}: saved to {folder / filename}, SHA-256 verified")
                break
            say(f"{filename}: {url} failed ({reason})")
            attempts.append((filename, url, reason))
        else:
            failed.append(filename)

    if failed:
        lines = [f"MNIST is unavailable: could not obtain {len(failed)} of {len(filenames)} files "
                 f"for the folder {folder}.", "Files missing or unverified:"]
        for filename in failed:
            note = f"; the copy present has SHA-256 {stale[filename]} and is not used" if filename in stale else ""
            lines.append(f"  {folder / filename}  (expected SHA-256 {hashes[filename]}{note})")
        lines.append("Mirrors tried: " + (", ".join(mirrors) if mirrors else "none (mirrors=[])"))
        lines.append("Attempts:")
        lines += [f"  {url}: {reason}" for filename, url, reason in attempts if filename in failed]
        lines.append(
            f"Offline? Copy the official files ({', '.join(filenames)}) into {folder}, or point "
            f"--data-dir (data_dir= in Python) at a folder that holds them; from Python, mirrors= "
            f"also takes URL prefixes that serve them (file:// works). The 'binarized-mnist' "
            f"dataset (the default --dataset) ships with scratchvae and needs no download.")
        raise DatasetUnavailable("\n".join(lines), files=failed, folder=folder, mirrors=mirrors,
                                 attempts=attempts)
    return folder


# --------------------------------------------------------------------------
# loaders


def _load_binarized_mnist(log):
    resource = importlib.resources.files("scratchvae").joinpath(_SHIPPED_BINARIZED_MNIST)
    where = f"scratchvae/{_SHIPPED_BINARIZED_MNIST}"
    try:
        raw = resource.read_bytes()
    except (FileNotFoundError, OSError) as err:
        raise DatasetIntegrityError(
            f"the shipped file {where} is missing ({err}); the scratchvae install is incomplete "
            f"(package data not installed): reinstall scratchvae") from err
    actual = hashlib.sha256(raw).hexdigest()
    if actual != BINARIZED_MNIST_SHA256:
        raise DatasetIntegrityError(
            f"the shipped file {where} is corrupted: SHA-256 {actual}, expected "
            f"{BINARIZED_MNIST_SHA256} ({len(raw)} bytes); reinstall scratchvae")
    if log:
        log(f"binarized-mnist: loaded {where}, SHA-256 verified")
    with numpy.load(io.BytesIO(raw), allow_pickle=False) as npz:
        packed = {key: npz[key] for key in ("train", "valid", "test", "test_labels")}
    splits = tuple(numpy.unpackbits(packed[s], axis=1, count=784).astype(numpy.float32)
                   for s in ("train", "valid", "test"))
    return splits, packed["test_labels"]


def load(name="binarized-mnist", data_dir=None, binarize=None, rng=None, log=None, *,
         mirrors=None, timeout=30.0, n_valid=None) -> Dataset:
    """Load a dataset by name as float32 pixel rows in ``[0, 1]``.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS` (case and ``_``/``-`` do not matter):

        ``"binarized-mnist"``
            Larochelle & Murray's static binarization, shipped with the
            package: 50,000 train / 10,000 valid / 10,000 test, binary, test
            labels only.  ``data_dir`` is not used.
        ``"mnist"``
            Grayscale MNIST, downloaded on first use (see
            :func:`download_mnist`) into ``data_dir`` or
            ``default_cache_dir("mnist")``.  The last ``n_valid`` (default
            10,000) of the 60,000 training images are the valid split.
        ``"idx"``
            The four MNIST-named IDX files (``.gz`` or not) in ``data_dir``,
            validated by their headers, with the same train/valid split rule.
    data_dir : str, os.PathLike or None
        Folder of the files (required for ``"idx"``).
    binarize : None, "static" or "dynamic"
        None keeps grayscale probabilities.  ``"static"`` samples every
        pixel once from Bernoulli(p) with ``rng`` (seed 0 by default), so the
        same seed always gives the same 0/1 dataset.  ``"dynamic"`` keeps the
        probabilities and sets ``dynamic_binarization=True`` so the trainer
        resamples each epoch with :func:`binarize_dynamic`.  Binarizing
        already binary data changes nothing.
    rng : None, int or numpy.random.Generator
        Generator or seed for ``binarize="static"``.
    log : callable or None
        Called with progress messages (str).
    mirrors : sequence of str or None
        ``"mnist"`` only: URL prefixes to download from, default
        :data:`MNIST_MIRRORS`.
    timeout : float
        ``"mnist"`` only: seconds per connection or read.
    n_valid : int or None
        ``"mnist"``/``"idx"``: training images held out (the last ones) as
        the valid split; None means ``n_train // 6`` (10,000 of MNIST's
        60,000); 0 means no valid split (``valid`` is None).  Must be None
        for ``"binarized-mnist"``, whose split is fixed.

    Returns
    -------
    Dataset

    Raises
    ------
    ValueError
        Unknown name or ``binarize`` value (the message lists the valid ones).
    DatasetUnavailable
        Files missing and not downloadable (the message says what goes where).
    DatasetIntegrityError
        The shipped binarized MNIST is missing or corrupted.
    IDXFormatError
        A malformed IDX file (the message names it).
    """
    key = str(name).lower().replace("_", "-")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(map(repr, DATASETS))}")
    if binarize not in BINARIZATIONS:
        raise ValueError(f"unknown binarize={binarize!r}; choose one of None, 'static', 'dynamic'")

    if key == "binarized-mnist":
        if n_valid is not None:
            raise ValueError("binarized-mnist has a fixed 50,000/10,000 train/valid split; leave n_valid=None")
        if data_dir is not None and log:
            log("binarized-mnist: ships with scratchvae; data_dir is not used")
        splits, test_labels = _load_binarized_mnist(log)
        splits = _binarize_splits(splits, binarize, rng)  # a no-op on 0/1 pixels
        return Dataset(name=key, train=splits[0], valid=splits[1], test=splits[2],
                       test_labels=test_labels, image_shape=(1, 28, 28), binary=True,  # unpacked bits
                       dynamic_binarization=binarize == "dynamic")

    if key == "mnist":
        folder = download_mnist(data_dir, mirrors=mirrors, timeout=timeout, log=log)
        # Read exactly the verified .gz files (not an unverified uncompressed copy beside them).
        paths = {role: folder / filename for role, filename in MNIST_FILES.items()}
        return _load_idx_files(key, paths, n_valid, binarize, rng)

    # key == "idx"
    if data_dir is None:
        raise ValueError("dataset 'idx' needs data_dir=, the folder holding the four IDX files "
                         f"({', '.join(n[:-3] for n in MNIST_FILES.values())}, .gz or not)")
    folder = pathlib.Path(data_dir).expanduser()
    if not folder.is_dir():
        raise DatasetUnavailable(f"dataset 'idx': data_dir {folder} is not a folder", folder=folder)
    paths = _find_idx_files(folder)
    if log:
        log("idx: reading " + ", ".join(p.name for p in paths.values()) + f" in {folder}")
    return _load_idx_files(key, paths, n_valid, binarize, rng)
