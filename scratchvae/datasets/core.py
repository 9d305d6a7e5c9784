"""What every dataset module shares: the :class:`Dataset` container, the errors, binarization, and the
conversions between stored pixels and what a model sees. The package (:mod:`scratchvae.datasets`) and its
loaders (IDX files, downloads, image folders) import these from here."""
from __future__ import annotations

import dataclasses
import math

import numpy

from ..backend import array_module
from ..layers.base import init_rng


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
