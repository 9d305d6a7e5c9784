"""Convolution geometry, apart from the layers (as Chainer's ``utils/conv.py``): output sizes, the
image layouts, and the int-or-pair arguments. Python ints only; the layers and the kernels both use it."""
from __future__ import annotations

import numpy

__all__ = ["as_pair", "conv_output_size", "conv_transpose_output_size", "LAYOUTS", "check_layout"]


def as_pair(value, name: str) -> tuple[int, int]:
    """Accept an int or a pair of ints (for kernel_size, stride, padding)."""
    if isinstance(value, (int, numpy.integer)):
        pair = (int(value), int(value))
    else:
        try:
            pair = tuple(int(v) for v in value)
        except TypeError as err:
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from err
        if len(pair) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def conv_output_size(in_size, kernel_size, stride=1, padding=0) -> tuple[int, int]:
    """Spatial output size of a convolution (PyTorch's formula, no dilation).

    ``H_out = (H + 2*p - kh) // s + 1`` and likewise for the width.  The
    result may be < 1 when the padded input is smaller than the kernel;
    callers check.

    Parameters
    ----------
    in_size : int or pair (H, W)
    kernel_size, stride, padding : int or pair

    Returns
    -------
    (H_out, W_out) : tuple of int
    """
    (h, w), (kh, kw) = as_pair(in_size, "in_size"), as_pair(kernel_size, "kernel_size")
    (sh, sw), (ph, pw) = as_pair(stride, "stride"), as_pair(padding, "padding")
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def conv_transpose_output_size(in_size, kernel_size, stride=1, padding=0, output_padding=0) -> tuple[int, int]:
    """Spatial output size of a transposed convolution (PyTorch's formula).

    ``H_out = (H - 1)*s - 2*p + kh + output_padding`` and likewise for the
    width.  May be < 1 for a large padding; callers check.
    """
    (h, w), (kh, kw) = as_pair(in_size, "in_size"), as_pair(kernel_size, "kernel_size")
    (sh, sw), (ph, pw) = as_pair(stride, "stride"), as_pair(padding, "padding")
    oph, opw = as_pair(output_padding, "output_padding")
    return (h - 1) * sh - 2 * ph + kh + oph, (w - 1) * sw - 2 * pw + kw + opw


#: The image layouts of the conv stack: NCHW, and CHWB (batch innermost, the matrix products' order).
LAYOUTS = ("NCHW", "CHWB")


def check_layout(layout):
    """``layout`` when it is one of :data:`LAYOUTS` (the conv stack's image layouts), else ValueError."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout
