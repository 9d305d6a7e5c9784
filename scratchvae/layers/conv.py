"""2-D convolution and transposed convolution, NCHW, via im2col/col2im.

Layout
------
Images are NCHW, ``(B, C, H, W)``, by default.  Every function and layer also
takes ``layout="CHWB"``: images ``(C, H, W, B)``, batch innermost, which is
the layout the products below work in.  A stack of convolutions in CHWB
skips the two transposing copies per layer (to and from NCHW, in forward and
backward); :class:`~scratchvae.layers.ToCHWB`
and :class:`~scratchvae.layers.FromCHWB` convert at the ends of the stack.
Weights have the same shapes in both layouts.

:func:`im2col` unfolds the (zero-padded)
input into a matrix of patches with the batch index innermost::

    cols[(c, u, v), (i, j, b)] = x_pad[b, c, i*sh + u, j*sw + v]

of shape ``(C*kh*kw, Ho*Wo*B)``.  The rows are ordered like the trailing axes
of a Conv2d weight ``(C_out, C, kh, kw)``, so the weight flattens for free to
``W2 = W.reshape(C_out, C*kh*kw)``, and the whole batch is folded into the
columns, so that each product is ONE large matrix product on contiguous
arrays::

    Conv2d forward     out2  = W2 @ cols                 (C_out, Ho*Wo*B)
    Conv2d backward    dW2   = dout2 @ cols.T            (C_out, C*kh*kw)
                       dcols = W2.T @ dout2  -> col2im   (C*kh*kw, Ho*Wo*B)

(Conv2d carries its bias inside the first two: a row of ones under
``cols`` and the bias column beside ``W2``; ConvTranspose2d adds its bias
in col2im's pass.)

To build ``cols``, the input is copied once (padded) into the channel-major,
batch-innermost layout (C, Hp, Wp, B); then a loop over the ``kh*kw`` kernel
offsets (not over pixels or images) copies one strided slice per offset.  With
the batch innermost, every slice is made of contiguous runs of B elements, so
the gather runs at memory speed (with NCHW slices the runs would be Wo
elements long, a few pixels).
:func:`col2im` is the adjoint of :func:`im2col`: one strided slice-add per
kernel offset into a zero (C, Hp, Wp, B) buffer, then a crop and a copy back
to NCHW.

:class:`ConvTranspose2d` is the adjoint of :class:`Conv2d` (its forward is
Conv2d's input gradient): a matrix product then col2im; its backward uses
im2col.  No zeros are inserted between input pixels.

Each layer keeps its large temporaries in a :class:`Workspace` and reuses
them from one step to the next (fresh multi-megabyte arrays cost page
faults); outputs and gradients handed back are always fresh arrays.

Everything stays in the input dtype (float32 in, float32 out), and the array
module (NumPy or CuPy) is picked from the arguments with
:func:`~scratchvae.backend.array_module`.
"""
from __future__ import annotations

import math

from ..backend import array_module
from ..conv_utils import LAYOUTS, as_pair, check_layout, conv_output_size, conv_transpose_output_size
from ..fused import kernels as fused_kernels
from .base import Layer, init_rng

__all__ = ["Conv2d", "ConvTranspose2d", "Workspace", "LAYOUTS", "conv_output_size", "conv_transpose_output_size",
           "im2col", "col2im", "conv2d_forward", "conv2d_backward",
           "conv_transpose2d_forward", "conv_transpose2d_backward"]


# -- scratch buffers --------------------------------------------------------------

class Workspace:
    """Scratch arrays reused from one call to the next, one per key.

    The large temporaries of a convolution (the padded input, the columns,
    the matrix products) are the same shape at every training step.  Fresh
    multi-megabyte NumPy arrays come from newly mapped memory, and touching
    it for the first time (page faults) costs about as much as the copy
    itself, so they are reused.  Each key keeps one flat store, the largest
    asked for so far, and a smaller request is a view of its start: the
    evaluation's larger chunks and the epoch's short last batch do not make
    the next training step map and fault its buffers again.  A layer owns one
    workspace; the pure functions take one as an optional keyword.

    A cache returned by a forward function given a workspace aliases its
    buffers: it stays valid until the next forward call with that
    workspace (layers keep exactly one cache, so this is what they need).
    Returned outputs and gradients never alias a workspace.
    """

    def __init__(self, kernels=None):
        self._stores: dict = {}   # key -> flat array, the largest size asked for
        # scratchvae.kernels, for a fused layer: im2col/col2im of NumPy CHWB images run as Numba loops
        self.kernels = kernels

    def get(self, key: str, shape: tuple, dtype, xp, zero: bool = False):
        """A C-contiguous buffer of ``shape`` for ``key``: a view of its store, which is (re)allocated only
        when it is too small or of another dtype or module.

        With ``zero=True`` it is filled with zeros; otherwise its content is
        arbitrary.
        """
        size = math.prod(shape)
        store = self._stores.get(key)
        if store is None or store.size < size or store.dtype != dtype or not isinstance(store, xp.ndarray):
            store = self._stores[key] = xp.empty(size, dtype=dtype)
        buf = store[:size].reshape(shape)
        if zero:
            buf.fill(0)
        return buf

    def clear(self) -> None:
        """Drop every buffer."""
        self._stores.clear()


def _buffer(workspace, key, shape, dtype, xp, zero=False):
    if workspace is None:
        return xp.zeros(shape, dtype=dtype) if zero else xp.empty(shape, dtype=dtype)
    return workspace.get(key, shape, dtype, xp, zero)


def _nchw_shape(x, layout):
    """(B, C, H, W) of an image array in ``layout``."""
    if layout == "CHWB":
        C, H, W, B = x.shape
        return B, C, H, W
    return tuple(x.shape)


# -- im2col / col2im --------------------------------------------------------------

def _fused(workspace, xp, layout) -> bool:
    """Whether a fused layer's workspace runs this unfold in the Numba kernels (NumPy, CHWB)."""
    return workspace is not None and workspace.kernels is not None and layout == "CHWB" and xp.__name__ == "numpy"


def im2col(x, kernel_size, stride=1, padding=0, *, workspace=None, layout="NCHW", out=None):
    """Unfold the patches of ``x`` into columns (batch innermost).

    ``x`` is first copied, zero-padded, into the channel-major layout
    ``x_t`` of shape (C, Hp, Wp, B) (batch innermost); then each of the
    ``kh*kw`` kernel offsets copies one strided slice of ``x_t`` (inner runs
    of B contiguous elements) into a contiguous block of ``cols``.

    Parameters
    ----------
    x : array, shape (B, C, H, W), or (C, H, W, B) with ``layout="CHWB"``
    kernel_size, stride, padding : int or pair
        ``(kh, kw)``, ``(sh, sw)``, ``(ph, pw)``; zero padding.
    workspace : Workspace, optional
        Reuse its ``"pad"`` and ``"cols"`` buffers; ``cols`` is then one of
        them (overwritten by the next call).
    layout : "NCHW" or "CHWB"
    out : C-contiguous array, shape (C*kh*kw, Ho*Wo*B), optional
        Write the columns here (then ``cols`` is ``out``).

    Returns
    -------
    cols : C-contiguous array, shape (C*kh*kw, Ho*Wo*B), dtype of ``x``
        ``cols[(c, u, v), (i, j, b)] = x_pad[b, c, i*sh + u, j*sw + v]``,
        where ``x_pad`` is ``x`` zero-padded by ``(ph, pw)`` and
        ``(Ho, Wo) = conv_output_size((H, W), ...)``.  Rows are ordered like
        the trailing axes (C, kh, kw) of a Conv2d weight; columns are
        (i, j, b) with the batch index fastest.
    """
    xp = array_module(x)
    kh, kw = as_pair(kernel_size, "kernel_size")
    sh, sw = as_pair(stride, "stride")
    ph, pw = as_pair(padding, "padding")
    B, C, H, W = _nchw_shape(x, check_layout(layout))
    Ho, Wo = conv_output_size((H, W), (kh, kw), (sh, sw), (ph, pw))
    if Ho < 1 or Wo < 1:
        raise ValueError(f"im2col: input size {(H, W)} with padding {(ph, pw)} is smaller than the kernel {(kh, kw)}")
    if out is None:
        out = _buffer(workspace, "cols", (C * kh * kw, Ho * Wo * B), x.dtype, xp)
    elif tuple(out.shape) != (C * kh * kw, Ho * Wo * B) or not out.flags.c_contiguous:
        raise ValueError(f"im2col: out must be C-contiguous of shape {(C * kh * kw, Ho * Wo * B)}, got "
                         f"{tuple(out.shape)}")
    if _fused(workspace, xp, layout):   # one Numba pass, padding included (bit-identical)
        return workspace.kernels.im2col_chwb(xp.ascontiguousarray(x), out, (kh, kw), (sh, sw), (ph, pw))
    x_t = _buffer(workspace, "pad", (C, H + 2 * ph, W + 2 * pw, B), x.dtype, xp)  # (C, Hp, Wp, B)
    if ph:
        x_t[:, :ph] = 0
        x_t[:, ph + H:] = 0
    if pw:
        x_t[:, :, :pw] = 0
        x_t[:, :, pw + W:] = 0
    x_t[:, ph:ph + H, pw:pw + W, :] = x if layout == "CHWB" else x.transpose(1, 2, 3, 0)  # (C, H, W, B)
    cols6 = out.reshape(C, kh, kw, Ho, Wo, B)
    for u in range(kh):
        u_end = u + sh * (Ho - 1) + 1
        for v in range(kw):
            v_end = v + sw * (Wo - 1) + 1
            cols6[:, u, v] = x_t[:, u:u_end:sh, v:v_end:sw, :]  # (C, Ho, Wo, B)
    return out


def col2im(cols, x_shape, kernel_size, stride=1, padding=0, *, workspace=None, layout="NCHW", bias=None):
    """Fold columns back into an image, summing overlaps: the adjoint of :func:`im2col`.

    Each of the ``kh*kw`` kernel offsets adds one block of ``cols`` into a
    strided slice of a zero buffer of shape (C, Hp, Wp, B); the padding is
    then cropped and the result copied to a new NCHW array.

    Parameters
    ----------
    cols : array, shape (C*kh*kw, Ho*Wo*B)
        Laid out as the output of :func:`im2col`: rows (c, u, v), columns
        (i, j, b).
    x_shape : tuple (B, C, H, W)
        The shape of the image that :func:`im2col` unfolded, in NCHW order
        whatever the layout.
    kernel_size, stride, padding : int or pair
    workspace : Workspace, optional
        Reuse its ``"pad"`` buffer.
    layout : "NCHW" or "CHWB"
        The layout of the returned image.
    bias : array, shape (C,), optional
        Added to every pixel of its channel after the sums (one pass less
        for a transposed convolution's bias: the fused loop adds it while
        the channel is in cache).

    Returns
    -------
    x : new C-contiguous array, shape (B, C, H, W) (or (C, H, W, B)), dtype of ``cols``
        ``x[b, c, h, w] = sum of cols[(c, u, v), (i, j, b)]`` over all
        ``(u, v, i, j)`` with ``i*sh + u - ph == h`` and ``j*sw + v - pw == w``
        (plus ``bias[c]``).
    """
    xp = array_module(cols)
    kh, kw = as_pair(kernel_size, "kernel_size")
    sh, sw = as_pair(stride, "stride")
    ph, pw = as_pair(padding, "padding")
    B, C, H, W = (int(s) for s in x_shape)
    Ho, Wo = conv_output_size((H, W), (kh, kw), (sh, sw), (ph, pw))
    if Ho < 1 or Wo < 1:
        raise ValueError(f"col2im: image size {(H, W)} with padding {(ph, pw)} is smaller than the kernel {(kh, kw)}")
    if tuple(cols.shape) != (C * kh * kw, Ho * Wo * B):
        raise ValueError(f"col2im: cols has shape {tuple(cols.shape)}, expected {(C * kh * kw, Ho * Wo * B)}")
    if _fused(workspace, xp, layout):   # one Numba pass into a new image (bit-identical)
        return workspace.kernels.col2im_chwb(xp.ascontiguousarray(cols), xp.empty((C, H, W, B), dtype=cols.dtype),
                                             (kh, kw), (sh, sw), (ph, pw), bias=bias)
    cols6 = cols.reshape(C, kh, kw, Ho, Wo, B)
    x_t = _buffer(workspace, "pad", (C, H + 2 * ph, W + 2 * pw, B), cols.dtype, xp, zero=True)  # (C, Hp, Wp, B)
    for u in range(kh):
        u_end = u + sh * (Ho - 1) + 1
        for v in range(kw):
            v_end = v + sw * (Wo - 1) + 1
            x_t[:, u:u_end:sh, v:v_end:sw, :] += cols6[:, u, v]  # (C, Ho, Wo, B)
    crop = x_t[:, ph:ph + H, pw:pw + W, :]  # (C, H, W, B)
    if bias is not None:
        crop += bias[:, None, None, None]
    if check_layout(layout) == "CHWB":
        return crop.copy() if workspace is not None or ph or pw else crop
    return xp.ascontiguousarray(crop.transpose(3, 0, 1, 2))  # (B, C, H, W)


# -- pure forward / backward pairs --------------------------------------------------

def _product_with_transpose(a, c, xp):
    """``a @ c.T`` for a weight gradient: ``a`` (M, N) and ``c`` (K, N), summed over the long N.

    When both M and K are at least 64 it is computed as ``(c @ a.T).T`` (a
    transposed view): the same sums, which OpenBLAS's kernels ran 1.07 to 1.4
    times faster in that orientation for these shapes (long N, M of 64 to
    256, K of 512 to 2049; AMD EPYC Zen 4: ``benchmarks/README.md``), and
    1.15 to 2.7 times slower when one side is small (the 16 or 17 rows of a
    layer on a 1-channel image), which keeps the direct product.
    """
    if min(a.shape[0], c.shape[0]) >= 64:
        return xp.matmul(c, a.T).T  # (M, K), stored as (K, M)
    return xp.matmul(a, c.T)  # (M, K)


def conv2d_forward(x, W, b, stride=1, padding=0, *, workspace=None, layout="NCHW"):
    """2-D convolution (cross-correlation, like PyTorch's ``conv2d``).

    ``out[b, o, i, j] = bias[o] + sum_{c,u,v} W[o, c, u, v] * x_pad[b, c, i*sh + u, j*sw + v]``

    The bias rides in the matrix product: below the unfolded columns sits
    a row of ones, and beside the flattened weight the bias column, so that
    ``[W2 | b] @ [cols; 1] = W2 @ cols + b 1^T`` is the output in one
    product, with no pass of its own (and the backward's ``db`` comes out of
    the ``dW`` product the same way).

    Parameters
    ----------
    x : array, shape (B, C_in, H, W), or (C_in, H, W, B) with ``layout="CHWB"``
    W : array, shape (C_out, C_in, kh, kw)
    b : array, shape (C_out,)
    stride, padding : int or pair
    workspace : Workspace, optional
        Scratch buffers to reuse (see :class:`Workspace`).
    layout : "NCHW" or "CHWB"
        Of ``x`` and ``out``.

    Returns
    -------
    out : new C-contiguous array, shape (B, C_out, Ho, Wo) (or (C_out, Ho, Wo, B)),
        ``Ho = (H + 2*ph - kh) // sh + 1`` (likewise ``Wo``).
    cache : tuple ``(cols1, W, x_shape, stride, padding, layout)`` for
        :func:`conv2d_backward`; ``x_shape`` is (B, C_in, H, W) and
        ``cols1`` is ``im2col(x)`` (C_in*kh*kw, Ho*Wo*B) with a row of ones
        below it.
    """
    xp = array_module(x, W, b)
    stride, padding = as_pair(stride, "stride"), as_pair(padding, "padding")
    x_shape = _nchw_shape(x, check_layout(layout))
    B = x_shape[0]
    C_out, C_in, kh, kw = W.shape
    K = C_in * kh * kw
    Ho, Wo = conv_output_size(x_shape[2:], (kh, kw), stride, padding)
    cols1 = _buffer(workspace, "cols1", (K + 1, Ho * Wo * B), x.dtype, xp)  # (K+1, Ho*Wo*B)
    im2col(x, (kh, kw), stride, padding, workspace=workspace, layout=layout, out=cols1[:K])
    cols1[K] = 1                                                              # the row of ones
    W2b = xp.concatenate([W.reshape(C_out, K), b[:, None]], axis=1)           # [W2 | b]  (C_out, K+1)
    if layout == "CHWB":  # the product is the output: write it into a fresh array
        out2 = xp.empty((C_out, Ho * Wo * B), dtype=x.dtype)
    else:
        out2 = _buffer(workspace, "out2", (C_out, Ho * Wo * B), x.dtype, xp)
    xp.matmul(W2b, cols1, out=out2)  # W2 @ cols + b 1^T   (C_out, Ho*Wo*B)
    out = out2.reshape(C_out, Ho, Wo, B)  # (C_out, Ho, Wo, B)
    if layout == "NCHW":
        out = xp.ascontiguousarray(out.transpose(3, 0, 1, 2))  # (B, C_out, Ho, Wo)
    return out, (cols1, W, x_shape, stride, padding, layout)


def conv2d_backward(dout, cache, *, workspace=None, need_dx=True):
    """Backward of :func:`conv2d_forward`.

    Parameters
    ----------
    dout : array, shape (B, C_out, Ho, Wo) (or (C_out, Ho, Wo, B): the forward's layout)
        Upstream gradient dL/dout (not modified).
    cache : tuple from :func:`conv2d_forward`
    workspace : Workspace, optional
        Scratch buffers to reuse (uses none that the cache aliases).
    need_dx : bool
        False skips the input gradient (a product and col2im), for data input.

    Returns
    -------
    dx : array, shape (B, C_in, H, W) (or (C_in, H, W, B))   ``col2im(W2.T @ dout2)``
    dW : array, shape (C_out, C_in, kh, kw)   ``dout2 @ cols.T``
    db : array, shape (C_out,)   ``dout2 @ 1`` = ``dout.sum((0, 2, 3))``

    where ``dout2`` is ``dout`` laid out as (C_out, Ho*Wo*B) and ``W2`` is
    ``W`` flattened to (C_out, C_in*kh*kw); ``dW`` and ``db`` are the two
    blocks of one product, ``dout2 @ [cols; 1].T = [dout2 @ cols.T | dout2 @ 1]``.
    """
    cols1, W, x_shape, stride, padding, layout = cache
    xp = array_module(dout, cols1, W)
    C_out, C_in, kh, kw = W.shape
    K, N = C_in * kh * kw, cols1.shape[1]
    if layout == "CHWB":
        dout2 = xp.ascontiguousarray(dout).reshape(C_out, N)  # (C_out, Ho*Wo*B), a view
    else:
        dout2 = _buffer(workspace, "dout2", (C_out, N), dout.dtype, xp)
        dout2.reshape(C_out, *dout.shape[2:], dout.shape[0])[...] = dout.transpose(1, 2, 3, 0)  # (C_out, Ho*Wo*B)
    dWb = _product_with_transpose(dout2, cols1, xp)  # dout2 @ [cols; 1].T = [dW2 | db]  (C_out, K+1)
    dW, db = dWb[:, :K].reshape(W.shape), dWb[:, K]  # (C_out, C_in, kh, kw), (C_out,)
    if not need_dx:  # the input is data: skip a matrix product and col2im
        return None, dW, db
    dcols = _buffer(workspace, "dcols", (K, N), cols1.dtype, xp)
    xp.matmul(W.reshape(C_out, K).T, dout2, out=dcols)  # W2.T @ dout2   (C_in*kh*kw, Ho*Wo*B)
    dx = col2im(dcols, x_shape, (kh, kw), stride, padding, workspace=workspace, layout=layout)  # (B, C_in, H, W)
    return dx, dW, db


def conv_transpose2d_forward(x, W, b, stride=1, padding=0, output_padding=0, *, workspace=None, layout="NCHW"):
    """2-D transposed convolution (like PyTorch's ``conv_transpose2d``).

    The adjoint of :func:`conv2d_forward` with the same ``W``, plus a bias:
    ``out[b, o, i*sh - ph + u, j*sw - pw + v] += x[b, c, i, j] * W[c, o, u, v]``
    summed over ``(c, i, j, u, v)``, for targets inside the output.

    Parameters
    ----------
    x : array, shape (B, C_in, H, W), or (C_in, H, W, B) with ``layout="CHWB"``
    W : array, shape (C_in, C_out, kh, kw)
    b : array, shape (C_out,)
    stride, padding, output_padding : int or pair
        ``output_padding`` (< stride) adds rows/columns at the bottom/right.
    workspace : Workspace, optional
        Scratch buffers to reuse (see :class:`Workspace`).
    layout : "NCHW" or "CHWB"
        Of ``x`` and ``out``.

    Returns
    -------
    out : new C-contiguous array, shape (B, C_out, Ho, Wo) (or (C_out, Ho, Wo, B)),
        ``Ho = (H - 1)*sh - 2*ph + kh + output_padding_h`` (likewise ``Wo``).
    cache : tuple ``(x2, W, out_shape, stride, padding, layout)`` for
        :func:`conv_transpose2d_backward`; ``x2`` is ``x`` laid out as
        (C_in, H*W*B) and ``out_shape`` is (B, C_out, Ho, Wo).
    """
    xp = array_module(x, W, b)
    stride, padding = as_pair(stride, "stride"), as_pair(padding, "padding")
    B, _, H_in, W_in = _nchw_shape(x, check_layout(layout))
    C_in, C_out, kh, kw = W.shape
    Ho, Wo = conv_transpose_output_size((H_in, W_in), (kh, kw), stride, padding, output_padding)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"conv_transpose2d: output size {(Ho, Wo)} is < 1 for input size {(H_in, W_in)}")
    if layout == "CHWB":
        x2 = xp.ascontiguousarray(x).reshape(C_in, H_in * W_in * B)  # (C_in, H*W*B), a view
    else:
        x2 = _buffer(workspace, "x2", (C_in, H_in * W_in * B), x.dtype, xp)
        x2.reshape(C_in, H_in, W_in, B)[...] = x.transpose(1, 2, 3, 0)  # (C_in, H*W*B)
    W2 = W.reshape(C_in, C_out * kh * kw)  # (C_in, C_out*kh*kw)
    cols = _buffer(workspace, "cols", (C_out * kh * kw, H_in * W_in * B), x.dtype, xp)
    xp.matmul(W2.T, x2, out=cols)  # (C_out*kh*kw, H*W*B)
    out_shape = (B, C_out, Ho, Wo)
    out = col2im(cols, out_shape, (kh, kw), stride, padding, workspace=workspace, layout=layout, bias=b)
    return out, (x2, W, out_shape, stride, padding, layout)


def conv_transpose2d_backward(dout, cache, *, workspace=None):
    """Backward of :func:`conv_transpose2d_forward`.

    Parameters
    ----------
    dout : array, shape (B, C_out, Ho, Wo) (or (C_out, Ho, Wo, B): the forward's layout)
        Upstream gradient dL/dout (not modified).
    cache : tuple from :func:`conv_transpose2d_forward`
    workspace : Workspace, optional
        Scratch buffers to reuse (uses none that the cache aliases).

    Returns
    -------
    dx : array, shape (B, C_in, H, W) (or (C_in, H, W, B))   ``W2 @ im2col(dout)``  (a Conv2d forward)
    dW : array, shape (C_in, C_out, kh, kw)   ``x2 @ im2col(dout).T``
    db : array, shape (C_out,)   ``dout.sum((0, 2, 3))``
    """
    x2, W, out_shape, stride, padding, layout = cache
    xp = array_module(dout, x2, W)
    C_in, C_out, kh, kw = W.shape
    B = out_shape[0]
    cols = im2col(dout, (kh, kw), stride, padding, workspace=workspace, layout=layout)  # (C_out*kh*kw, H*W*B)
    H_in, W_in = conv_output_size(out_shape[2:], (kh, kw), stride, padding)
    W2 = W.reshape(C_in, C_out * kh * kw)  # (C_in, C_out*kh*kw)
    if layout == "CHWB":  # the product is dx: write it into a fresh array
        dx = xp.matmul(W2, cols).reshape(C_in, H_in, W_in, B)  # (C_in, H, W, B)
        db = dout.reshape(C_out, -1).sum(axis=1)  # (C_out,)
    else:
        dx2 = _buffer(workspace, "dx2", (C_in, H_in * W_in * B), dout.dtype, xp)
        xp.matmul(W2, cols, out=dx2)  # (C_in, H*W*B)
        dx = xp.ascontiguousarray(dx2.reshape(C_in, H_in, W_in, B).transpose(3, 0, 1, 2))  # (B, C_in, H, W)
        db = dout.sum(axis=(0, 2, 3))  # (C_out,)
    dW = _product_with_transpose(x2, cols, xp).reshape(W.shape)  # x2 @ cols.T  (C_in, C_out, kh, kw)
    return dx, dW, db


# -- layers ---------------------------------------------------------------------------

def _check_geometry(name, in_channels, out_channels, kernel_size, stride, padding):
    if int(in_channels) < 1 or int(out_channels) < 1:
        raise ValueError(f"{name}: in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
    if min(kernel_size) < 1:
        raise ValueError(f"{name}: kernel_size must be >= 1, got {kernel_size}")
    if min(stride) < 1:
        raise ValueError(f"{name}: stride must be >= 1, got {stride}")
    if min(padding) < 0:
        raise ValueError(f"{name}: padding must be >= 0, got {padding}")


def _in_layout(nchw_shape, layout):
    """An NCHW shape (B, C, H, W) written in ``layout``."""
    B, C, H, W = nchw_shape
    return (C, H, W, B) if layout == "CHWB" else (B, C, H, W)


def _check_image(layer, x, channels):
    expected = (channels, None, None, None) if layer.layout == "CHWB" else (None, channels, None, None)
    layer._check_input(x, expected, what=f"input ({layer.layout})")


def _layout_repr(layout):
    return "" if layout == "NCHW" else f", layout={layout!r}"


class Conv2d(Layer):
    """2-D convolution over NCHW images (PyTorch's ``nn.Conv2d``, no dilation/groups).

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, padding : int or pair of ints
        Zero padding of ``padding`` on each side.
    layout : "NCHW" (default) or "CHWB"
        Of the input and output images: (B, C, H, W) or (C, H, W, B).
    backend, dtype :
        See :class:`~scratchvae.layers.base.Layer`.
    rng : numpy.random.Generator, int seed or None
        For the initialization.
    fused : bool
        Run im2col and col2im (NumPy arrays, CHWB layout) as the Numba loops
        of :mod:`scratchvae.kernels` instead of array code: the same
        numbers, bit for bit, in one pass each.

    Notes
    -----
    ``params["W"]`` has shape (out_channels, in_channels, kh, kw) and
    ``params["b"]`` shape (out_channels,).  Initialization is PyTorch's
    default: W and b ~ U(-k, k) with k = 1/sqrt(fan_in),
    fan_in = in_channels*kh*kw, drawn on the host in float64 (W first, then b).

    Input (B, in_channels, H, W) -> output (B, out_channels, Ho, Wo) with
    ``Ho = (H + 2*ph - kh) // sh + 1`` (likewise ``Wo``); in CHWB, input
    (in_channels, H, W, B) -> output (out_channels, Ho, Wo, B).

    Set ``input_grad = False`` on a layer whose input is data (the first
    layer of an encoder): ``backward`` then skips dL/dx and returns None.
    """

    input_grad = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, *,
                 layout="NCHW", backend=None, dtype="float32", rng=None, fused=False):
        super().__init__(backend=backend, dtype=dtype)
        self.layout = check_layout(layout)
        self.kernel_size = as_pair(kernel_size, "kernel_size")
        self.stride = as_pair(stride, "stride")
        self.padding = as_pair(padding, "padding")
        _check_geometry("Conv2d", in_channels, out_channels, self.kernel_size, self.stride, self.padding)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        kh, kw = self.kernel_size
        gen = init_rng(rng)
        k = 1.0 / math.sqrt(self.in_channels * kh * kw)
        self._add_param("W", gen.uniform(-k, k, size=(self.out_channels, self.in_channels, kh, kw)))
        self._add_param("b", gen.uniform(-k, k, size=(self.out_channels,)))
        self._workspace = Workspace(fused_kernels() if fused else None)

    def output_size(self, in_size) -> tuple[int, int]:
        """(Ho, Wo) for an input of spatial size ``in_size`` (int or (H, W))."""
        return conv_output_size(in_size, self.kernel_size, self.stride, self.padding)

    def forward(self, x):
        """x: (B, C_in, H, W) -> (B, C_out, Ho, Wo) (CHWB: (C_in, H, W, B) -> (C_out, Ho, Wo, B))."""
        _check_image(self, x, self.in_channels)
        B, _, H, W = _nchw_shape(x, self.layout)
        Ho, Wo = self.output_size((H, W))
        if Ho < 1 or Wo < 1:
            raise ValueError(f"Conv2d: input spatial size {(H, W)} is too small for "
                             f"kernel_size={self.kernel_size}, padding={self.padding} "
                             f"(output size would be {(Ho, Wo)})")
        y, self._cache = conv2d_forward(x, self.params["W"], self.params["b"], self.stride, self.padding,
                                        workspace=self._workspace, layout=self.layout)
        return y

    def backward(self, dy):
        """dy: like the forward output -> dx: like its input; accumulates dW, db."""
        cache = self._get_cache()
        x_shape = cache[2]
        self._check_dy(dy, _in_layout((x_shape[0], self.out_channels) + self.output_size(x_shape[2:]), self.layout))
        dx, dW, db = conv2d_backward(dy, cache, workspace=self._workspace, need_dx=self.input_grad)
        self.grads["W"] += dW
        self.grads["b"] += db
        return dx

    def __repr__(self):
        return (f"Conv2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}" + _layout_repr(self.layout) + ")")


class ConvTranspose2d(Layer):
    """2-D transposed convolution over NCHW images (PyTorch's ``nn.ConvTranspose2d``,
    no dilation/groups): the adjoint of :class:`Conv2d`, plus a bias.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, padding : int or pair of ints
    output_padding : int or pair of ints
        Extra rows/columns at the bottom/right of the output; must be
        smaller than ``stride`` (as in PyTorch).
    layout : "NCHW" (default) or "CHWB"
        Of the input and output images: (B, C, H, W) or (C, H, W, B).
    backend, dtype :
        See :class:`~scratchvae.layers.base.Layer`.
    rng : numpy.random.Generator, int seed or None
        For the initialization.
    fused : bool
        Run im2col and col2im (NumPy arrays, CHWB layout) as the Numba loops
        of :mod:`scratchvae.kernels` instead of array code: the same
        numbers, bit for bit, in one pass each.

    Notes
    -----
    ``params["W"]`` has shape (in_channels, out_channels, kh, kw) and
    ``params["b"]`` shape (out_channels,).  Initialization is PyTorch's
    default: W and b ~ U(-k, k) with k = 1/sqrt(fan_in), where PyTorch takes
    fan_in from ``weight.shape[1]``, i.e. fan_in = out_channels*kh*kw; drawn
    on the host in float64 (W first, then b).

    Input (B, in_channels, H, W) -> output (B, out_channels, Ho, Wo) with
    ``Ho = (H - 1)*sh - 2*ph + kh + output_padding_h`` (likewise ``Wo``); in
    CHWB, input (in_channels, H, W, B) -> output (out_channels, Ho, Wo, B).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 output_padding=0, *, layout="NCHW", backend=None, dtype="float32", rng=None, fused=False):
        super().__init__(backend=backend, dtype=dtype)
        self.layout = check_layout(layout)
        self.kernel_size = as_pair(kernel_size, "kernel_size")
        self.stride = as_pair(stride, "stride")
        self.padding = as_pair(padding, "padding")
        self.output_padding = as_pair(output_padding, "output_padding")
        _check_geometry("ConvTranspose2d", in_channels, out_channels, self.kernel_size, self.stride, self.padding)
        if min(self.output_padding) < 0 or any(op >= s for op, s in zip(self.output_padding, self.stride)):
            raise ValueError(f"ConvTranspose2d: output_padding must be >= 0 and smaller than stride, "
                             f"got output_padding={self.output_padding}, stride={self.stride}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        kh, kw = self.kernel_size
        gen = init_rng(rng)
        k = 1.0 / math.sqrt(self.out_channels * kh * kw)
        self._add_param("W", gen.uniform(-k, k, size=(self.in_channels, self.out_channels, kh, kw)))
        self._add_param("b", gen.uniform(-k, k, size=(self.out_channels,)))
        self._workspace = Workspace(fused_kernels() if fused else None)

    def output_size(self, in_size) -> tuple[int, int]:
        """(Ho, Wo) for an input of spatial size ``in_size`` (int or (H, W))."""
        return conv_transpose_output_size(in_size, self.kernel_size, self.stride, self.padding,
                                          self.output_padding)

    def forward(self, x):
        """x: (B, C_in, H, W) -> (B, C_out, Ho, Wo) (CHWB: (C_in, H, W, B) -> (C_out, Ho, Wo, B))."""
        _check_image(self, x, self.in_channels)
        Ho, Wo = self.output_size(_nchw_shape(x, self.layout)[2:])
        if Ho < 1 or Wo < 1:
            raise ValueError(f"ConvTranspose2d: input spatial size {_nchw_shape(x, self.layout)[2:]} is too small for "
                             f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding} "
                             f"(output size would be {(Ho, Wo)})")
        y, self._cache = conv_transpose2d_forward(x, self.params["W"], self.params["b"], self.stride,
                                                  self.padding, self.output_padding, workspace=self._workspace,
                                                  layout=self.layout)
        return y

    def backward(self, dy):
        """dy: like the forward output -> dx: like its input; accumulates dW, db."""
        cache = self._get_cache()
        self._check_dy(dy, _in_layout(cache[2], self.layout))
        dx, dW, db = conv_transpose2d_backward(dy, cache, workspace=self._workspace)
        self.grads["W"] += dW
        self.grads["b"] += db
        return dx

    def __repr__(self):
        return (f"ConvTranspose2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, output_padding={self.output_padding}"
                + _layout_repr(self.layout) + ")")
