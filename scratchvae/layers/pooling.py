"""Max-pooling and up-sampling, with PyTorch's semantics, NCHW ``(B, C, H, W)``.

The encoders the VAE explainers describe compress with max-pooling and their
decoders up-sample before a convolution; these are those two layers, as
forward/backward pairs:

* :func:`maxpool2d_forward` / :func:`maxpool2d_backward`, behind
  :class:`MaxPool2d` (``torch.nn.MaxPool2d(kernel_size, stride=None,
  padding=0)``): padding counts as -inf, the output is
  ``floor((H + 2 p - k) / s) + 1`` on each side, and the gradient goes to the
  argmax of each window; of equal values the first in row-major window order
  wins (as in PyTorch), so ties are resolved deterministically. Overlapping
  windows add their gradients.
* :func:`upsample2d_forward` / :func:`upsample2d_backward`, behind
  :class:`Upsample2d` (``torch.nn.Upsample(scale_factor=s, mode=...)`` with an
  integer ``s``; ``"nearest"``, or ``"bilinear"`` with
  ``align_corners=False``). Both modes are linear and separable::

      y = A_h @ x @ A_w.T        A_h (s H, H), A_w (s W, W): interpolation weights

  so the backward pass is the adjoint, ``dx = A_h.T @ dy @ A_w``.
"""
from __future__ import annotations

import numpy

from ..backend import array_module
from ..conv_utils import as_pair, check_layout
from .base import Layer

__all__ = ["MaxPool2d", "Upsample2d", "maxpool2d_forward", "maxpool2d_backward", "upsample2d_forward",
           "upsample2d_backward", "interpolation_matrix", "UPSAMPLE_MODES"]

UPSAMPLE_MODES = ("nearest", "bilinear")


# -- max-pooling -------------------------------------------------------------------------------

def pool_output_size(size, kernel_size, stride, padding) -> tuple[int, int]:
    """(Ho, Wo) of a max-pooling of an (H, W) image, as PyTorch computes them (no ceil mode)."""
    (H, W), (kh, kw), (sh, sw), (ph, pw) = size, kernel_size, stride, padding
    return (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1


def maxpool2d_forward(x, kernel_size, stride=None, padding=0):
    """Max over each ``kernel_size`` window.

    Parameters
    ----------
    x : array (B, C, H, W)
    kernel_size, stride, padding : int or (int, int)
        ``stride`` defaults to ``kernel_size``; ``padding`` (at most half the
        kernel) counts as -inf.

    Returns
    -------
    out : array (B, C, Ho, Wo)
    cache : tuple
        The winning offset ``u * kw + v`` of every output, (B, C, Ho, Wo), and the geometry.
    """
    xp = array_module(x)
    k = as_pair(kernel_size, "kernel_size")
    s = k if stride is None else as_pair(stride, "stride")
    p = as_pair(padding, "padding")
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"maxpool2d: padding {p} must be at most half the kernel {k} (as in PyTorch)")
    B, C, H, W = x.shape
    Ho, Wo = pool_output_size((H, W), k, s, p)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"maxpool2d: a {k} kernel does not fit the {H}x{W} input with padding {p}")
    xpad = xp.full((B, C, H + 2 * p[0], W + 2 * p[1]), -xp.inf, dtype=x.dtype)   # (B, C, Hp, Wp)
    xpad[:, :, p[0]:p[0] + H, p[1]:p[1] + W] = x
    out = xp.full((B, C, Ho, Wo), -xp.inf, dtype=x.dtype)
    arg = xp.zeros((B, C, Ho, Wo), dtype=xp.int32)
    for u in range(k[0]):
        for v in range(k[1]):
            window = xpad[:, :, u:u + s[0] * (Ho - 1) + 1:s[0], v:v + s[1] * (Wo - 1) + 1:s[1]]   # (B, C, Ho, Wo)
            better = window > out                   # strict: the first of equal values keeps the win
            out = xp.where(better, window, out)
            arg = xp.where(better, u * k[1] + v, arg)
    return out, (arg, x.shape, k, s, p)


def maxpool2d_backward(dout, cache):
    """dx (B, C, H, W): each output's gradient added to its window's argmax."""
    xp = array_module(dout)
    arg, shape, k, s, p = cache
    B, C, H, W = shape
    Ho, Wo = dout.shape[2:]
    dpad = xp.zeros((B, C, H + 2 * p[0], W + 2 * p[1]), dtype=dout.dtype)
    zero = dout.dtype.type(0)
    for u in range(k[0]):
        for v in range(k[1]):
            dpad[:, :, u:u + s[0] * (Ho - 1) + 1:s[0], v:v + s[1] * (Wo - 1) + 1:s[1]] += \
                xp.where(arg == u * k[1] + v, dout, zero)
    return xp.ascontiguousarray(dpad[:, :, p[0]:p[0] + H, p[1]:p[1] + W])


def _to_nchw(a, layout):
    """A (B, C, H, W) view of an image array in ``layout`` (no copy)."""
    return a.transpose(3, 0, 1, 2) if layout == "CHWB" else a


def _from_nchw(a, layout):
    """``a`` (B, C, H, W) in ``layout``, C-contiguous."""
    xp = array_module(a)
    return xp.ascontiguousarray(a.transpose(1, 2, 3, 0) if layout == "CHWB" else a)


class _ImageLayer(Layer):
    """What the two layers share: images in ``layout`` in and out, a pure NCHW forward/backward
    pair (:meth:`_forward` / :meth:`_backward`) in between, one cache."""

    def __init__(self, layout="NCHW", **kw):
        super().__init__(**kw)
        self.layout = check_layout(layout)

    def forward(self, x):
        self._check_input(x, (None, None, None, None))
        out, self._cache = self._forward(_to_nchw(x, self.layout))     # (B, C, Ho, Wo)
        out = _from_nchw(out, self.layout)
        self._out_shape = out.shape
        return out

    def backward(self, dy):
        cache = self._get_cache()
        self._check_dy(dy, self._out_shape)
        return _from_nchw(self._backward(_to_nchw(dy, self.layout), cache), self.layout)


class MaxPool2d(_ImageLayer):
    """``torch.nn.MaxPool2d(kernel_size, stride=None, padding=0)``: (B, C, H, W) -> (B, C, Ho, Wo).

    ``layout="CHWB"`` takes and returns (C, H, W, B) arrays, for the batch-innermost conv stacks.
    """

    def __init__(self, kernel_size, stride=None, padding=0, layout="NCHW", **kw):
        super().__init__(layout=layout, **kw)
        self.kernel_size = as_pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else as_pair(stride, "stride")
        self.padding = as_pair(padding, "padding")

    def _forward(self, x):
        return maxpool2d_forward(x, self.kernel_size, self.stride, self.padding)

    def _backward(self, dy, cache):
        return maxpool2d_backward(dy, cache)

    def __repr__(self):
        return f"MaxPool2d(kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding})"


# -- up-sampling ---------------------------------------------------------------------------------

def interpolation_matrix(size: int, scale: int, mode: str, dtype) -> numpy.ndarray:
    """A (scale * size, size) host matrix: row i holds the weights output pixel i gives each input pixel.

    ``"nearest"``: input ``floor(i / scale)``. ``"bilinear"`` (``align_corners=False``):
    the source coordinate ``(i + 0.5) / scale - 0.5``, clamped at 0, between its two
    neighbours (the last one repeated at the edge), as PyTorch computes it.
    """
    n_out = size * scale
    A = numpy.zeros((n_out, size), dtype=numpy.float64)
    rows = numpy.arange(n_out)
    if mode == "nearest":
        A[rows, rows // scale] = 1.0
    elif mode == "bilinear":
        src = numpy.maximum((rows + 0.5) / scale - 0.5, 0.0)
        i0 = numpy.minimum(numpy.floor(src).astype(numpy.int64), size - 1)
        i1 = numpy.minimum(i0 + 1, size - 1)
        frac = src - i0
        numpy.add.at(A, (rows, i0), 1.0 - frac)
        numpy.add.at(A, (rows, i1), frac)
    else:
        raise ValueError(f"upsample: mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
    return A.astype(dtype)


def upsample2d_forward(x, A_h, A_w):
    """y = A_h @ x @ A_w.T: (B, C, H, W) -> (B, C, s H, s W); cache ``(A_h, A_w)``."""
    xp = array_module(x)
    return xp.matmul(xp.matmul(A_h, x), A_w.T), (A_h, A_w)


def upsample2d_backward(dout, cache):
    """dx = A_h.T @ dout @ A_w, (B, C, H, W): the adjoint of the forward pass."""
    xp = array_module(dout)
    A_h, A_w = cache
    return xp.matmul(xp.matmul(A_h.T, dout), A_w)


class Upsample2d(_ImageLayer):
    """``torch.nn.Upsample(scale_factor, mode)`` for an integer factor: (B, C, H, W) -> (B, C, sH, sW).

    ``mode`` is ``"nearest"`` or ``"bilinear"`` (``align_corners=False``, PyTorch's default);
    ``layout="CHWB"`` takes and returns (C, H, W, B) arrays.
    """

    def __init__(self, scale_factor=2, mode="nearest", layout="NCHW", **kw):
        super().__init__(layout=layout, **kw)
        if int(scale_factor) != scale_factor or scale_factor < 1:
            raise ValueError(f"Upsample2d: scale_factor must be a positive integer, got {scale_factor!r}")
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"Upsample2d: mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
        self.scale_factor, self.mode = int(scale_factor), mode
        self._matrices = {}

    def _matrix(self, size):
        if size not in self._matrices:
            host = interpolation_matrix(size, self.scale_factor, self.mode, self.dtype)
            self._matrices[size] = self.backend.asarray(host)
        return self._matrices[size]

    def _forward(self, x):
        return upsample2d_forward(x, self._matrix(x.shape[2]), self._matrix(x.shape[3]))

    def _backward(self, dy, cache):
        return upsample2d_backward(dy, cache)

    def __repr__(self):
        return f"Upsample2d(scale_factor={self.scale_factor}, mode={self.mode!r})"
