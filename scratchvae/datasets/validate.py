"""The checks that data must pass before training: shape, dtype, finiteness, range.

:func:`validate_images` refuses, with a message naming the problem, data that
would make the loss meaningless; each problem has its own exception class.
"""
from __future__ import annotations

import math

import numpy

from ..backend import array_module

__all__ = ["validate_images", "InvalidImagesError", "ImageShapeError", "ImageDtypeError", "NonFiniteImagesError",
           "ImageRangeError"]


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
