"""Fused kernels (installed as ``scratchvae.kernels``).

The public functions here have exactly the signatures and return values of
their plain twins in :mod:`scratchvae.losses` (and, for Adam,
:mod:`scratchvae.optim`), so a model can switch with::

    ops = scratchvae.kernels if fused else scratchvae.losses

Each call validates its arguments (with the same checks and messages as the
plain functions), makes the inputs C-contiguous, allocates the outputs and
dispatches on the array module (:func:`scratchvae.backend.array_module`):

* NumPy arrays -> :mod:`scratchvae.kernels.cpu` (Numba ``@njit`` loops),
* CuPy arrays  -> :mod:`scratchvae.kernels.cuda` (numba-cuda kernels,
  launched on CuPy's current stream).  That module is imported on first
  use; if numba-cuda is missing or no GPU is usable the call raises
  :class:`scratchvae.backend.BackendUnavailable` (never a silent fallback).

Only float32 and float64 are supported (the plain functions also take
other floating dtypes).  The fused results agree with the plain ones to
rounding: a few float32 ulps (a few float64 ulps in float64).
"""
from __future__ import annotations

import numpy

from scratchvae.backend import BackendUnavailable, array_module
from scratchvae.conv_utils import conv_output_size
from scratchvae.validation import check_adam_arrays, check_bce, check_gaussian, check_kl_weight, check_reparam

from . import cpu

__all__ = ["bce_with_logits", "gaussian_nll", "reparameterize_kl", "reparameterize_kl_backward",
           "adam_update", "adam_update_many", "im2col_chwb", "col2im_chwb", "relu_forward", "relu_backward",
           "gated_forward", "gated_backward", "cuda_module"]

_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))


def cuda_module():
    """The :mod:`scratchvae.kernels.cuda` module, ready to launch kernels.

    Raises
    ------
    BackendUnavailable
        When numba-cuda cannot be imported or finds no usable GPU.
    """
    try:
        from . import cuda as module
    except ImportError as err:
        raise BackendUnavailable(
            "scratchvae.kernels got CuPy arrays but the CUDA kernels cannot be loaded: "
            f"{err}. Install numba-cuda (`pip install numba-cuda[cu12]`) or use scratchvae.losses") from err
    module.require_gpu()
    return module


def _backend(fname, xp, arrays):
    """(kernel module, extra launch keywords) for arrays of module ``xp``."""
    for name, a in arrays.items():
        if not isinstance(a, xp.ndarray):
            raise TypeError(f"{fname}: {name} is a {type(a).__module__}.{type(a).__name__} but other "
                            f"arguments are {xp.__name__} arrays; pass arrays of one library")
    if xp is numpy:
        return cpu, {}
    module = cuda_module()
    return module, {"stream": module.current_stream()}


def _check_kernel_dtype(fname, dtype):
    if dtype not in _DTYPES:
        raise TypeError(f"{fname}: the fused kernels support float32 and float64, got {dtype}; "
                        "cast the arrays or use scratchvae.losses")


def _contiguous(xp, *arrays):
    return [a if a.flags.c_contiguous else xp.ascontiguousarray(a) for a in arrays]


def bce_with_logits(logits, x, scale=1.0):
    """Fused :func:`scratchvae.losses.bce_with_logits`.

    Parameters
    ----------
    logits : array, shape (B, D), float32 or float64
    x : array, shape (B, D), same dtype
    scale : float

    Returns
    -------
    nll : array, shape (B,)
    dlogits : array, shape (B, D)
    """
    B, D = check_bce(logits, x)
    _check_kernel_dtype("bce_with_logits", logits.dtype)
    xp = array_module(logits, x)
    module, launch = _backend("bce_with_logits", xp, {"logits": logits, "x": x})
    logits, x = _contiguous(xp, logits, x)
    nll = xp.empty((B,), dtype=logits.dtype)
    dlogits = xp.empty((B, D), dtype=logits.dtype)
    module.bce_with_logits_into(logits, x, scale, nll, dlogits, **launch)
    return nll, dlogits


def gaussian_nll(mean, x, log_sigma, scale=1.0):
    """Fused :func:`scratchvae.losses.gaussian_nll`.

    Parameters
    ----------
    mean, x : arrays, shape (B, D), float32 or float64
    log_sigma : array, shape (D,) or (1,), same dtype
    scale : float

    Returns
    -------
    nll : array, shape (B,)
    dmean : array, shape (B, D)
    dlog_sigma : array, shape of ``log_sigma``
    """
    B, D = check_gaussian(mean, x, log_sigma)
    _check_kernel_dtype("gaussian_nll", mean.dtype)
    xp = array_module(mean, x, log_sigma)
    module, launch = _backend("gaussian_nll", xp, {"mean": mean, "x": x, "log_sigma": log_sigma})
    mean, x, log_sigma = _contiguous(xp, mean, x, log_sigma)
    nll = xp.empty((B,), dtype=mean.dtype)
    dmean = xp.empty((B, D), dtype=mean.dtype)
    dlog_sigma = xp.empty(log_sigma.shape, dtype=mean.dtype)
    module.gaussian_nll_into(mean, x, log_sigma, scale, nll, dmean, dlog_sigma, **launch)
    return nll, dmean, dlog_sigma


def reparameterize_kl(mu, log_sigma, eps):
    """Fused :func:`scratchvae.losses.reparameterize_kl`.

    Parameters
    ----------
    mu, log_sigma, eps : arrays, shape (B, L), float32 or float64

    Returns
    -------
    z : array, shape (B, L)
    kl : array, shape (B, L)
    """
    B, L = check_reparam("reparameterize_kl", mu=mu, log_sigma=log_sigma, eps=eps)
    _check_kernel_dtype("reparameterize_kl", mu.dtype)
    xp = array_module(mu, log_sigma, eps)
    module, launch = _backend("reparameterize_kl", xp, {"mu": mu, "log_sigma": log_sigma, "eps": eps})
    mu, log_sigma, eps = _contiguous(xp, mu, log_sigma, eps)
    z = xp.empty((B, L), dtype=mu.dtype)
    kl = xp.empty((B, L), dtype=mu.dtype)
    module.reparameterize_kl_into(mu, log_sigma, eps, z, kl, **launch)
    return z, kl


def reparameterize_kl_backward(dz, mu, log_sigma, eps, kl_weight):
    """Fused :func:`scratchvae.losses.reparameterize_kl_backward`.

    Parameters
    ----------
    dz, mu, log_sigma, eps : arrays, shape (B, L), float32 or float64
    kl_weight : array, shape (L,), or scalar

    Returns
    -------
    dmu : array, shape (B, L)
    dlog_sigma : array, shape (B, L)
    """
    fname = "reparameterize_kl_backward"
    B, L = check_reparam(fname, dz=dz, mu=mu, log_sigma=log_sigma, eps=eps)
    _check_kernel_dtype(fname, mu.dtype)
    xp = array_module(dz, mu, log_sigma, eps)
    module, launch = _backend(fname, xp, {"dz": dz, "mu": mu, "log_sigma": log_sigma, "eps": eps})
    w = check_kl_weight(kl_weight, L, mu.dtype, xp)
    dz, mu, log_sigma, eps, w = _contiguous(xp, dz, mu, log_sigma, eps, w)
    dmu = xp.empty((B, L), dtype=mu.dtype)
    dlog_sigma = xp.empty((B, L), dtype=mu.dtype)
    module.reparameterize_kl_backward_into(dz, mu, log_sigma, eps, w, dmu, dlog_sigma, **launch)
    return dmu, dlog_sigma


def adam_update(param, grad, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
    """Fused :func:`scratchvae.optim.adam_update`: one pass, in place.

    Parameters
    ----------
    param, m, v : C-contiguous arrays, any shape, float32 or float64
        Updated in place (so they must be contiguous: a copy would be lost).
    grad : array, shape and dtype of ``param``
    lr, beta1, beta2, eps, weight_decay : float
    step : int, >= 1

    Returns
    -------
    None
    """
    check_adam_arrays(param, grad, m, v, step)
    _check_kernel_dtype("adam_update", param.dtype)
    xp = array_module(param, grad, m, v)
    module, launch = _backend("adam_update", xp, {"param": param, "grad": grad, "m": m, "v": v})
    for name, a in (("param", param), ("m", m), ("v", v)):
        if not a.flags.c_contiguous:
            raise ValueError(f"adam_update: {name} must be C-contiguous to be updated in place "
                             "(the fused kernel cannot write through a strided view)")
    (grad,) = _contiguous(xp, grad)
    module.adam_update_into(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, **launch)


def adam_update_many(params, grads, ms, vs, *, lr, beta1, beta2, eps, weight_decay, step):
    """:func:`adam_update` on every ``(params[i], grads[i], ms[i], vs[i])``, in one kernel call on the CPU.

    Parameters
    ----------
    params, grads, ms, vs : sequences of arrays, one per parameter
        Each quadruple as in :func:`adam_update`; all arrays of one dtype
        and one array library.

    Returns
    -------
    None
    """
    params, grads, ms, vs = list(params), list(grads), list(ms), list(vs)
    if not (len(params) == len(grads) == len(ms) == len(vs)):
        raise ValueError(f"adam_update_many: got {len(params)} params, {len(grads)} grads, {len(ms)} m and "
                         f"{len(vs)} v arrays; need one of each per parameter")
    if not params:
        return
    dtype = params[0].dtype
    _check_kernel_dtype("adam_update_many", dtype)
    xp = array_module(*params)
    for i, quad in enumerate(zip(params, grads, ms, vs)):
        check_adam_arrays(*quad, step)
        if quad[0].dtype != dtype:
            raise TypeError(f"adam_update_many: parameter {i} is {quad[0].dtype}, parameter 0 is {dtype}; "
                            "one dtype per call")
        for name, a in zip(("param", "m", "v"), (quad[0], quad[2], quad[3])):
            if not a.flags.c_contiguous:
                raise ValueError(f"adam_update_many: {name} {i} must be C-contiguous to be updated in place")
    module, launch = _backend("adam_update_many", xp,
                              {f"{kind} {i}": a for kind, arrays in (("param", params), ("grad", grads), ("m", ms),
                                                                    ("v", vs)) for i, a in enumerate(arrays)})
    grads = _contiguous(xp, *grads)
    module.adam_update_many_into(params, grads, ms, vs, lr, beta1, beta2, eps, weight_decay, step, **launch)


# -- convolution ----------------------------------------------------------------------------

def _check_fold(fname, image, cols, kernel_size, stride, padding):
    """Shapes of an unfold: image (C, H, W, B) and cols (C*kh*kw, Ho*Wo*B), NumPy, one float dtype."""
    for name, a in (("image", image), ("cols", cols)):
        if not isinstance(a, numpy.ndarray):
            raise TypeError(f"{fname}: {name} must be a NumPy array (the CPU kernel), got {type(a).__name__}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{fname}: {name} must be C-contiguous")
    _check_kernel_dtype(fname, image.dtype)
    if cols.dtype != image.dtype:
        raise TypeError(f"{fname}: cols dtype {cols.dtype} differs from the image's {image.dtype}")
    kh, kw = kernel_size
    C, H, W, B = image.shape
    Ho, Wo = conv_output_size((H, W), kernel_size, stride, padding)
    if Ho < 1 or Wo < 1 or cols.shape != (C * kh * kw, Ho * Wo * B):
        raise ValueError(f"{fname}: cols has shape {cols.shape}, expected {(C * kh * kw, Ho * Wo * B)} for an "
                         f"image {image.shape} (C, H, W, B), kernel {kernel_size}, stride {stride}, padding {padding}")
    return cols.reshape(C, kh, kw, Ho, Wo, B)


def im2col_chwb(x, cols, kernel_size, stride, padding):
    """Fused :func:`scratchvae.layers.conv.im2col` for a CHWB image ``x`` (C, H, W, B), into ``cols``
    (C*kh*kw, Ho*Wo*B); sizes are pairs. Returns ``cols``."""
    cols6 = _check_fold("im2col_chwb", x, cols, kernel_size, stride, padding)
    cpu.im2col_chwb_kernel(x, cols6, stride[0], stride[1], padding[0], padding[1])
    return cols


def col2im_chwb(cols, x, kernel_size, stride, padding, bias=None):
    """Fused :func:`scratchvae.layers.conv.col2im` into the CHWB image ``x`` (C, H, W, B), overwritten,
    plus ``bias`` (C,) per channel if given; bit-identical to the array code. Returns ``x``."""
    cols6 = _check_fold("col2im_chwb", x, cols, kernel_size, stride, padding)
    if bias is None:
        bias = numpy.empty(0, dtype=x.dtype)
    elif not isinstance(bias, numpy.ndarray) or bias.shape != (x.shape[0],) or bias.dtype != x.dtype:
        raise ValueError(f"col2im_chwb: bias must be a NumPy {x.dtype} array of shape {(x.shape[0],)}, got "
                         f"{getattr(bias, 'dtype', type(bias).__name__)} {getattr(bias, 'shape', '')}")
    cpu.col2im_chwb_kernel(cols6, x, stride[0], stride[1], padding[0], padding[1], bias)
    return x


# -- ReLU -------------------------------------------------------------------------------------

def _check_relu(fname, **arrays):
    for name, a in arrays.items():
        if not isinstance(a, numpy.ndarray):
            raise TypeError(f"{fname}: {name} must be a NumPy array (the CPU kernel), got {type(a).__name__}")
    first = next(iter(arrays.values()))
    _check_kernel_dtype(fname, first.dtype)
    for name, a in arrays.items():
        if a.shape != first.shape or a.dtype != first.dtype:
            raise ValueError(f"{fname}: {name} is {a.dtype} {a.shape}, expected {first.dtype} {first.shape}")


def _memory_order(*arrays) -> str:
    """"C" or "F" when every array is contiguous in that order (then ``a.ravel(order)`` is a view of each)."""
    for order, flag in (("C", "C_CONTIGUOUS"), ("F", "F_CONTIGUOUS")):
        if all(a.flags[flag] for a in arrays):
            return order
    return ""


def relu_forward(x):
    """Fused ``maximum(x, 0)`` (:class:`scratchvae.layers.ReLU`), bit-identical; any shape, a new array
    in the memory order of ``x`` (C or Fortran order; other strides are copied first)."""
    _check_relu("relu_forward", x=x)
    order = _memory_order(x) or "C"
    if order == "C":
        (x,) = _contiguous(numpy, x)
    y = numpy.empty_like(x, order=order)
    cpu.relu_forward_kernel(x.ravel(order), y.ravel(order))
    return y


def relu_backward(dy, x):
    """Fused ``dy * (x > 0)``, bit-identical; a new array shaped like ``x``, in the memory order that
    ``dy`` and ``x`` share (C when they share none)."""
    _check_relu("relu_backward", dy=dy, x=x)
    order = _memory_order(dy, x) or "C"
    if order == "C":
        dy, x = _contiguous(numpy, dy, x)
    dx = numpy.empty_like(x, order=order)
    cpu.relu_backward_kernel(dy.ravel(order), x.ravel(order), dx.ravel(order))
    return dx


# -- GatedDense (NumPy only, like ReLU: on CuPy the layer runs its array code) -------------------

def _check_gated(fname, rows, **arrays):
    first = next(iter(arrays.values()))
    for name, arr in arrays.items():
        if not isinstance(arr, numpy.ndarray):
            raise TypeError(f"{fname}: {name} must be a NumPy array (the CPU kernel), got {type(arr).__name__}")
        expected = first.shape if name in rows else first.shape[1:]
        if arr.shape != expected or arr.dtype != first.dtype or first.ndim != 2:
            raise ValueError(f"{fname}: {name} is {arr.dtype} {arr.shape}, expected {first.dtype} {expected} "
                             f"(rows (B, D), biases (D,))")
    _check_kernel_dtype(fname, first.dtype)


def gated_forward(a, s, b, c):
    """The elementwise part of :func:`scratchvae.layers.gated.gated_forward` in one pass, on the
    products ``a = x W`` and ``s = x V`` (B, D), which it overwrites with ``a + b`` and the gate
    ``g = sigmoid(s + c)``; returns ``h = a * g``. Agrees with the array code to rounding (the
    exponential is Numba's, not NumPy's)."""
    _check_gated("gated_forward", ("a", "s"), a=a, s=s, b=b, c=c)
    if not (a.flags.c_contiguous and s.flags.c_contiguous):
        raise ValueError("gated_forward: a and s are overwritten in place and must be C-contiguous")
    h = numpy.empty_like(a)
    cpu.gated_forward_kernel(a, s, b, c, h)
    return h


def gated_backward(dh, a, g):
    """``da = dh * g``, ``ds = dh * a * g * (1 - g)`` in one pass (B, D) each, bit-identical to the
    array code of :func:`scratchvae.layers.gated.gated_backward`."""
    _check_gated("gated_backward", ("dh", "a", "g"), dh=dh, a=a, g=g)
    dh, a, g = _contiguous(numpy, dh, a, g)
    da, ds = numpy.empty_like(a), numpy.empty_like(a)
    cpu.gated_backward_kernel(dh, a, g, da, ds)
    return da, ds
