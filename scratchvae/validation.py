"""Argument checks of the loss terms and of Adam, kept out of the way of the math.

:mod:`scratchvae.losses`, :mod:`scratchvae.optim` and the fused kernels
(:mod:`scratchvae.kernels`) call the same checks, so a bad argument reads the
same whichever path runs. Each raises TypeError or ValueError naming the
function and the argument; a reader of the math can skip this file.
"""
from __future__ import annotations

__all__ = ["check_float", "check_2d_same", "check_bce", "check_gaussian", "check_reparam", "check_kl_weight",
           "check_adam_arrays"]


def check_float(fname, **arrays):
    """All arrays share one floating dtype; return it."""
    dtype = None
    for name, a in arrays.items():
        if not hasattr(a, "dtype") or not hasattr(a, "shape"):
            raise TypeError(f"{fname}: {name} must be an array, got {type(a).__name__}")
        if a.dtype.kind not in "f":
            raise TypeError(f"{fname}: {name} has dtype {a.dtype}; expected a floating dtype (float32 or float64)")
        if dtype is None:
            dtype = a.dtype
        elif a.dtype != dtype:
            first = next(iter(arrays))
            raise TypeError(f"{fname}: {name} has dtype {a.dtype} but {first} has dtype {dtype}; "
                            "pass all arrays in one dtype (cast with .astype)")
    return dtype


def check_2d_same(fname, **arrays):
    """All arrays are 2-D with one shape; return it."""
    shape = None
    for name, a in arrays.items():
        if a.ndim != 2:
            raise ValueError(f"{fname}: {name} must be 2-D (batch, features), got shape {tuple(a.shape)}")
        if shape is None:
            shape = tuple(a.shape)
        elif tuple(a.shape) != shape:
            first = next(iter(arrays))
            raise ValueError(f"{fname}: {name} has shape {tuple(a.shape)} but {first} has shape {shape}")
    return shape


def check_bce(logits, x):
    check_float("bce_with_logits", logits=logits, x=x)
    return check_2d_same("bce_with_logits", logits=logits, x=x)


def check_gaussian(mean, x, log_sigma):
    check_float("gaussian_nll", mean=mean, x=x, log_sigma=log_sigma)
    B, D = check_2d_same("gaussian_nll", mean=mean, x=x)
    if log_sigma.ndim != 1 or log_sigma.shape[0] not in (1, D):
        raise ValueError(f"gaussian_nll: log_sigma must have shape ({D},) (one per pixel) or (1,) (shared), "
                         f"got {tuple(log_sigma.shape)}")
    return B, D


def check_reparam(fname, **arrays):
    check_float(fname, **arrays)
    return check_2d_same(fname, **arrays)


def check_kl_weight(kl_weight, L, dtype, xp):
    """kl_weight as an xp array of shape (L,) in ``dtype`` (a scalar is broadcast)."""
    w = xp.asarray(kl_weight, dtype=dtype)
    if w.ndim == 0:
        w = xp.ascontiguousarray(xp.broadcast_to(w, (L,)))
    if w.shape != (L,):
        raise ValueError(f"reparameterize_kl_backward: kl_weight must have shape ({L},) (one per latent "
                         f"dimension) or be a scalar, got {tuple(w.shape)}")
    return w


def check_adam_arrays(param, grad, m, v, step) -> None:
    """One floating dtype, one shape, and a 1-based step; raises naming what is wrong."""
    for name, a in (("param", param), ("grad", grad), ("m", m), ("v", v)):
        if not hasattr(a, "dtype") or not hasattr(a, "shape"):
            raise TypeError(f"adam_update: {name} must be an array, got {type(a).__name__}")
        if a.dtype.kind != "f":
            raise TypeError(f"adam_update: {name} has dtype {a.dtype}; expected a floating dtype (float32 or float64)")
        if a.dtype != param.dtype:
            raise TypeError(f"adam_update: {name} has dtype {a.dtype} but param has dtype {param.dtype}; "
                            "pass all arrays in one dtype (cast with .astype)")
        if tuple(a.shape) != tuple(param.shape):
            raise ValueError(f"adam_update: {name} has shape {tuple(a.shape)} but param has shape "
                             f"{tuple(param.shape)}")
    if int(step) != step or step < 1:
        raise ValueError(f"adam_update: step is the 1-based step count t (>= 1), got {step!r}")
