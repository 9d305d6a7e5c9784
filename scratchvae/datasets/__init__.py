"""Datasets: the shipped binarized MNIST, grayscale MNIST, Fashion-MNIST, any IDX folder, a folder of
your images, and CelebA.

Every loader returns a :class:`Dataset` whose splits hold one flattened image
per row, ``(N, D)`` with ``D = prod(image_shape)`` (row-major): float32 pixel
intensities in ``[0, 1]`` for the MNIST-like datasets, uint8 pixel levels
(``levels = 256``) for the image datasets, which the trainer turns into
intensities batch by batch.

Six datasets are known (see :data:`DATASETS`; :data:`LOADERS` maps each name to its loader):

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
``"fashion-mnist"``
    Zalando's Fashion-MNIST (60,000 + 10,000 grayscale 28 x 28 images of
    10 kinds of clothing), read from ``data_dir`` or from where Debian's
    ``dataset-fashion-mnist`` package installs it; the same IDX reader and
    split rule as ``"mnist"``.
``"idx"``
    Any dataset in MNIST's IDX format (Fashion-MNIST, KMNIST, ...) found in
    ``data_dir`` under MNIST's four file names, validated by its headers.
``"folder"`` and ``"celeba"``
    Every image file under ``data_dir``, or CelebA as distributed, decoded
    once with Pillow and cached (:mod:`scratchvae.datasets.images`).

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
import hashlib
import importlib.resources
import io
import math
import pathlib

import numpy

from ..backend import array_module
from ..layers.base import init_rng

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
    "corrupt",
    "to_intensities",
    "bits_per_dim",
    "validate_images",
    "IMAGE_DATASETS",
]

#: Names accepted by :func:`load`.
DATASETS = ("binarized-mnist", "mnist", "fashion-mnist", "idx", "folder", "celeba")

#: The datasets of 8-bit images of any size (:mod:`scratchvae.datasets.images`): ``color`` and ``image_size`` apply.
IMAGE_DATASETS = ("folder", "celeba")

#: Fashion-MNIST's label names, by label value.
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")

#: Where Debian's ``dataset-fashion-mnist`` package puts the Fashion-MNIST IDX files.
FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")

#: Values accepted for ``binarize=`` by :func:`load`.
BINARIZATIONS = (None, "static", "dynamic")

#: The shipped file, relative to the ``scratchvae`` package.
_SHIPPED_BINARIZED_MNIST = "data/binarized_mnist.npz"

#: SHA-256 of ``scratchvae/data/binarized_mnist.npz`` (Larochelle & Murray's
#: static binarization, bit-packed; see ``load("binarized-mnist")``).
BINARIZED_MNIST_SHA256 = "6017fab13e2451d24cc581019dca665668d27f99c0f751e6db128bbcceff526b"

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




_DOWNLOAD_NAMES = ("download_mnist", "default_cache_dir", "MNIST_SHA256", "MNIST_MIRRORS")


def __getattr__(name):
    """The download names, imported on first use (the training path never loads urllib)."""
    if name in _DOWNLOAD_NAMES:
        from . import download
        return getattr(download, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    levels : int or None
        256 when the splits hold uint8 pixel levels instead of intensities
        (the image datasets): see :func:`to_intensities`.
    class_names : tuple of str or None
        The name of each label value (class subfolders), when known.
    attribute_names : tuple of str or None
        The names of the columns of ``attributes``.
    attributes : dict or None
        ``{"train": (N_train, A), "valid": ..., "test": ...}`` int8 arrays of
        per-image attributes (1 present, -1 or 0 absent), when known.
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
    levels: int | None = None
    class_names: tuple | None = None
    attribute_names: tuple | None = None
    attributes: dict | None = None

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
        The generator, or a seed (None: fresh OS entropy, as NumPy means it).

    Returns
    -------
    numpy.ndarray
        Same shape and dtype as ``x``, every value 0 or 1.
    """
    rng = init_rng(rng)
    out = numpy.empty_like(x)
    step = 8192
    for start in range(0, x.shape[0], step):
        out[start:start + step] = binarize_dynamic(x[start:start + step], rng)
    return out


def binarize_splits(splits, binarize, rng):
    if binarize == "static":
        rng = init_rng(rng)  # one generator for all splits, in order train, valid, test
        return tuple(None if x is None else binarize_static(x, rng) for x in splits)
    return tuple(splits)


def all_binary(splits):
    return all(bool(((x == 0) | (x == 1)).all()) for x in splits if x is not None)


def to_intensities(x, likelihood, rng=None):
    """uint8 pixel levels ``x`` (any backend) as intensities in [0, 1] for ``likelihood``, float32.

    Gaussian: uniform dequantization ``(x + u) / 256``, ``u ~ U(0, 1)`` from
    ``rng`` (a generator of ``x``'s backend), so that the model's density on
    [0, 1]^D bounds the probability of the discrete images: ``-log P(x) <=
    -log p((x + u) / 256) + D log 256`` in expectation (see
    :func:`bits_per_dim`). Bernoulli: ``x / 255``, grey levels as probabilities.
    """
    xp = array_module(x)
    if likelihood == "gaussian":
        return (x.astype(xp.float32) + rng.random(x.shape, dtype=xp.float32)) / xp.float32(256)
    return x.astype(xp.float32) / xp.float32(255)


def bits_per_dim(nll_nats: float, n_dims: int) -> float:
    """A dequantized model's negative log-likelihood (nats per image, on (x + u) / 256) as bits per
    dimension of the 8-bit images: ``(nll + D log 256) / (D log 2)``."""
    return (nll_nats + n_dims * math.log(256)) / (n_dims * math.log(2))


def corrupt(x, p, rng, *, binary):
    """A corrupted copy of the images ``x`` (N, D), for denoising models; any backend.

    ``binary`` data get salt-and-pepper noise: each pixel, with probability
    ``p``, is replaced by a fair coin's 0 or 1. Continuous data get Gaussian
    noise of standard deviation ``p``, clipped to [0, 1]. ``rng`` is a
    generator of ``x``'s backend.
    """
    xp = array_module(x)
    if binary:
        hit = rng.random(x.shape, dtype=x.dtype) < p
        coin = (rng.random(x.shape, dtype=x.dtype) < 0.5).astype(x.dtype)
        return xp.where(hit, coin, x)
    return xp.clip(x + x.dtype.type(p) * rng.standard_normal(x.shape, dtype=x.dtype), 0, 1)


# the submodules use the names above
from .idx import MNIST_FILES, IDXFormatError, find_idx_files, load_idx_files, read_idx  # noqa: E402
from .validate import (  # noqa: E402
    ImageDtypeError,
    ImageRangeError,
    ImageShapeError,
    InvalidImagesError,
    NonFiniteImagesError,
    validate_images,
)

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
         mirrors=None, timeout=30.0, n_valid=None, color="rgb", image_size=64, cache_dir=None,
         progress=None, max_image_pixels=None) -> Dataset:
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
        pixel once from Bernoulli(p) with ``rng`` (pass a seed: None draws
        fresh OS entropy), so the same seed always gives the same 0/1 dataset.  ``"dynamic"`` keeps the
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
    color, image_size, cache_dir, progress, max_image_pixels
        ``"folder"`` and ``"celeba"`` (:mod:`scratchvae.datasets.images`):
        ``"rgb"`` or ``"gray"``, the side of the square images, where the
        decoded images are cached (default ``default_cache_dir("images")``),
        whether decoding shows a progress bar, and the largest image decoded
        (default ``images.MAX_IMAGE_PIXELS``). ``rng`` is then the seed
        of a folder's drawn splits.

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
    options = _LoadOptions(key, data_dir, binarize, rng, log, mirrors, timeout, n_valid, color, image_size,
                           cache_dir, progress, max_image_pixels)
    return LOADERS[key](options)


@dataclasses.dataclass(frozen=True)
class _LoadOptions:
    """The arguments of :func:`load`, as every loader of :data:`LOADERS` receives them."""

    name: str
    data_dir: object
    binarize: str | None
    rng: object
    log: object
    mirrors: object
    timeout: float
    n_valid: int | None
    color: str
    image_size: int
    cache_dir: object
    progress: object
    max_image_pixels: int | None


def _binarized_mnist(o: _LoadOptions) -> Dataset:
    if o.n_valid is not None:
        raise ValueError("binarized-mnist has a fixed 50,000/10,000 train/valid split; leave n_valid=None")
    if o.data_dir is not None and o.log:
        o.log("binarized-mnist: ships with scratchvae; data_dir is not used")
    splits, test_labels = _load_binarized_mnist(o.log)
    splits = binarize_splits(splits, o.binarize, o.rng)  # a no-op on 0/1 pixels
    return Dataset(name=o.name, train=splits[0], valid=splits[1], test=splits[2],
                   test_labels=test_labels, image_shape=(1, 28, 28), binary=True,  # unpacked bits
                   dynamic_binarization=o.binarize == "dynamic")


def _mnist(o: _LoadOptions) -> Dataset:
    folder = _download().download_mnist(o.data_dir, mirrors=o.mirrors, timeout=o.timeout, log=o.log)
    # Read exactly the verified .gz files (not an unverified uncompressed copy beside them).
    paths = {role: folder / filename for role, filename in MNIST_FILES.items()}
    return load_idx_files(o.name, paths, o.n_valid, o.binarize, o.rng)


def _fashion_mnist(o: _LoadOptions) -> Dataset:
    folder = pathlib.Path(o.data_dir).expanduser() if o.data_dir is not None else FASHION_MNIST_DIR
    if not folder.is_dir():
        raise DatasetUnavailable(
            f"dataset 'fashion-mnist': {folder} is not a folder; install the files with "
            "`apt-get install dataset-fashion-mnist` (Debian, Ubuntu) or download the four IDX files "
            "from https://github.com/zalandoresearch/fashion-mnist and pass their folder as --data-dir",
            folder=folder)
    paths = find_idx_files(folder)
    if o.log:
        o.log(f"fashion-mnist: reading the IDX files in {folder}")
    ds = load_idx_files(o.name, paths, o.n_valid, o.binarize, o.rng)
    ds.class_names = FASHION_MNIST_CLASSES
    return ds


def _idx(o: _LoadOptions) -> Dataset:
    if o.data_dir is None:
        raise ValueError("dataset 'idx' needs data_dir=, the folder holding the four IDX files "
                         f"({', '.join(n[:-3] for n in MNIST_FILES.values())}, .gz or not)")
    folder = pathlib.Path(o.data_dir).expanduser()
    if not folder.is_dir():
        raise DatasetUnavailable(f"dataset 'idx': data_dir {folder} is not a folder", folder=folder)
    paths = find_idx_files(folder)
    if o.log:
        o.log("idx: reading " + ", ".join(p.name for p in paths.values()) + f" in {folder}")
    return load_idx_files(o.name, paths, o.n_valid, o.binarize, o.rng)


def _images(o: _LoadOptions) -> Dataset:
    """``folder`` and ``celeba``: 8-bit images decoded with Pillow (imported only for them)."""
    from . import images
    if o.binarize is not None:
        raise ValueError(f"dataset {o.name!r} holds 8-bit images: --binarize is not supported for it (grey levels "
                         "are Bernoulli probabilities, or dequantized for the Gaussian likelihood)")
    common = dict(color=o.color, image_size=o.image_size, cache_dir=o.cache_dir, log=o.log, progress=o.progress,
                  max_pixels=images.MAX_IMAGE_PIXELS if o.max_image_pixels is None else o.max_image_pixels)
    if o.name == "celeba":
        return images.load_celeba(o.data_dir, **common)
    if o.data_dir is None:
        raise ValueError("dataset 'folder' needs --data-dir, the folder of images")
    return images.load_folder(o.data_dir, seed=0 if o.rng is None else o.rng, **common)


#: Dataset name -> its loader (each takes :func:`load`'s arguments as a :class:`_LoadOptions`).
LOADERS = {"binarized-mnist": _binarized_mnist, "mnist": _mnist, "fashion-mnist": _fashion_mnist, "idx": _idx,
           "folder": _images, "celeba": _images}


def _download():
    from . import download
    return download
