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
import pathlib

import numpy

from .core import (
    Dataset,
    DatasetIntegrityError,
    DatasetUnavailable,
    all_binary,  # noqa: F401  (a name of the package, used by its loaders)
    binarize_dynamic,
    binarize_splits,
    binarize_static,
    bits_per_dim,
    corrupt,
    to_intensities,
)
from .idx import MNIST_FILES, IDXFormatError, find_idx_files, load_idx_files, read_idx
from .validate import (
    ImageDtypeError,
    ImageRangeError,
    ImageShapeError,
    InvalidImagesError,
    NonFiniteImagesError,
    validate_images,
)

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

_DOWNLOAD_NAMES = ("download_mnist", "default_cache_dir", "MNIST_SHA256", "MNIST_MIRRORS")


def __getattr__(name):
    """The download names, imported on first use (the training path never loads urllib)."""
    if name in _DOWNLOAD_NAMES:
        from . import download
        return getattr(download, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")



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
