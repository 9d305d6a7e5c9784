"""The VAE's loss terms and their gradients: plain, readable array code (the ground truth).

Adam's update lives with the optimizer, in :mod:`scratchvae.optim`.

Every function takes arrays and returns arrays; it works on NumPy and CuPy
alike (``xp`` is picked with :func:`scratchvae.backend.array_module`) and
keeps the input dtype: float32 in, float32 out (float64 in, float64 out).
Scalars such as ``scale`` are cast to that dtype first.

:mod:`scratchvae.kernels` offers the same functions, with the same
signatures and return values, as fused Numba kernels (CPU) and numba-cuda
kernels (GPU), so a model can pick either::

    ops = scratchvae.kernels if fused else scratchvae.losses
    nll, dlogits = ops.bce_with_logits(logits, x, scale=1.0 / batch)

Notation: B examples, D pixels, L latent dimensions.  The encoder outputs
``log_sigma``, the log *standard deviation* (not the log variance):
``sigma = exp(log_sigma)``, ``sigma**2 = exp(2 * log_sigma)``.

Derivations
-----------
Bernoulli decoder with logits ``l`` and targets ``x`` in [0, 1]::

    -log p(x | l) = -x log s(l) - (1 - x) log(1 - s(l))   (s = sigmoid)
                  = max(l, 0) - l x + log1p(exp(-|l|))    (never overflows)
    d/dl          = s(l) - x

Gaussian decoder with mean ``m`` and log standard deviation ``g``
(``r = (x - m) exp(-g)``)::

    -log N(x; m, exp(g)**2) = 0.5 log(2 pi) + g + 0.5 r**2
    d/dm = (m - x) exp(-2 g)
    d/dg = 1 - r**2

Reparameterization and KL(N(mu, sigma**2) || N(0, 1)) per latent dimension,
with ``z = mu + exp(g) eps``::

    KL = 0.5 (mu**2 + exp(2 g) - 1) - g
       = 0.5 mu**2 + 0.5 (expm1(2 g) - 2 g)
    dKL/dmu = mu,    dKL/dg = exp(2 g) - 1 = expm1(2 g)
    dz/dmu  = 1,     dz/dg  = exp(g) eps

``expm1(y) - y`` cancels badly for small ``|y|`` (both terms are ~y, the
difference ~y**2/2); :func:`expm1_minus_x` sums its Taylor series there.
"""
from __future__ import annotations

import math

from .backend import array_module
from .validation import check_bce, check_gaussian, check_kl_weight, check_reparam

__all__ = [
    "bce_with_logits",
    "bce_with_logits_value",
    "gaussian_nll",
    "gaussian_nll_value",
    "sigmoid",
    "softplus",
    "reparameterize_kl",
    "reparameterize_kl_backward",
    "expm1_minus_x",
    "EXPM1_SERIES",
    "EXPM1_SERIES_CUTOFF",
]

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)

#: Taylor coefficients 1/k! for k = 2..18 of expm1(y) - y = sum_k y**k / k!.
#: For |y| < EXPM1_SERIES_CUTOFF the first omitted term is below 2e-17
#: relative to the sum, so the series is accurate to float64 rounding; at and
#: beyond the cutoff expm1(y) - y loses at most about one ulp to cancellation.
EXPM1_SERIES = tuple(1.0 / math.factorial(k) for k in range(2, 19))
EXPM1_SERIES_CUTOFF = 1.0



# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

def expm1_minus_x(y):
    """``expm1(y) - y`` = ``exp(y) - 1 - y`` without cancellation, any shape.

    For ``|y| < EXPM1_SERIES_CUTOFF`` (1) it sums the Taylor series
    ``y**2/2! + y**3/3! + ... + y**18/18!`` (Horner); elsewhere the direct
    difference loses at most about one ulp (max error about 2 ulps).

    Parameters
    ----------
    y : array, any shape, floating

    Returns
    -------
    array, shape and dtype of ``y``
    """
    xp = array_module(y)
    cast = y.dtype.type   # the dtype's scalar type: cast(0.5) keeps float32 code float32
    small = xp.abs(y) < cast(EXPM1_SERIES_CUTOFF)
    ys = xp.where(small, y, cast(0))
    poly = xp.full(y.shape, cast(EXPM1_SERIES[-1]), dtype=y.dtype)
    for coef in reversed(EXPM1_SERIES[:-1]):
        poly = poly * ys + cast(coef)
    return xp.where(small, ys * ys * poly, xp.expm1(y) - y)


# ----------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------

def bce_with_logits(logits, x, scale=1.0):
    """Bernoulli negative log-likelihood from logits, and its gradient.

    ``nll[b] = sum_d max(l, 0) - l x + log1p(exp(-|l|))`` with ``l =
    logits[b, d]``, ``x = x[b, d]``; exact and finite for any finite logit
    (no ``log(sigmoid)``).

    Parameters
    ----------
    logits : array, shape (B, D)
        Decoder outputs before the sigmoid.
    x : array, shape (B, D), same dtype
        Targets in [0, 1].
    scale : float
        Multiplies the gradient (e.g. ``1 / B`` for a batch mean).

    Returns
    -------
    nll : array, shape (B,)
        Per-example negative log-likelihood (unscaled).
    dlogits : array, shape (B, D)
        ``scale * (sigmoid(logits) - x)``.
    """
    check_bce(logits, x)
    cast = logits.dtype.type
    nll = bce_with_logits_value(logits, x)
    dlogits = cast(scale) * (sigmoid(logits) - x)
    return nll, dlogits


def bce_with_logits_value(logits, x):
    """The value of :func:`bce_with_logits` alone: ``sum_d softplus(l) - l x``, shape (B,)."""
    return (softplus(logits) - logits * x).sum(axis=1)


def sigmoid(x):
    """Numerically stable logistic function 1 / (1 + exp(-x)), any shape, dtype kept.

    Uses ``e = exp(-|x|)``, which never overflows: for x >= 0 it is
    1 / (1 + e), for x < 0 it is e / (1 + e).
    """
    xp = array_module(x)
    cast = x.dtype.type
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, cast(1), e) / (cast(1) + e)


def softplus(x):
    """Numerically stable ``log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|))``, any shape."""
    xp = array_module(x)
    return xp.maximum(x, x.dtype.type(0)) + xp.log1p(xp.exp(-xp.abs(x)))


def gaussian_nll(mean, x, log_sigma, scale=1.0):
    """Gaussian negative log-likelihood with a learned log standard deviation.

    ``nll[b] = sum_d 0.5 log(2 pi) + g + 0.5 r**2`` with ``g = log_sigma[d]``
    (or ``log_sigma[0]`` when shared) and ``r = (x - mean) exp(-g)``.

    Parameters
    ----------
    mean : array, shape (B, D)
        Decoder means.
    x : array, shape (B, D), same dtype
        Targets.
    log_sigma : array, shape (D,) or (1,), same dtype
        Log standard deviation, per pixel ``(D,)`` or shared ``(1,)``.
    scale : float
        Multiplies both gradients.

    Returns
    -------
    nll : array, shape (B,)
        Per-example negative log-likelihood (unscaled).
    dmean : array, shape (B, D)
        ``scale * (mean - x) * exp(-2 log_sigma)``.
    dlog_sigma : array, shape of ``log_sigma``
        ``scale * sum_b (1 - r**2)`` per pixel, or summed over ``b`` and ``d``
        for a shared ``(1,)`` log_sigma.
    """
    check_gaussian(mean, x, log_sigma)
    xp = array_module(mean, x, log_sigma)
    cast = mean.dtype.type
    inv_var = xp.exp(cast(-2) * log_sigma)
    r = (x - mean) * xp.exp(-log_sigma)         # (B, D), standardized residual
    nll = gaussian_nll_value(mean, x, log_sigma)
    dmean = cast(scale) * ((mean - x) * inv_var)
    one_minus_r2 = cast(1) - r * r                 # d nll / d log_sigma per entry
    if log_sigma.shape[0] == 1:
        dlog_sigma = cast(scale) * xp.sum(one_minus_r2).reshape(1)
    else:
        dlog_sigma = cast(scale) * xp.sum(one_minus_r2, axis=0)
    return nll, dmean, dlog_sigma


def gaussian_nll_value(mean, x, log_sigma):
    """The value of :func:`gaussian_nll` alone, shape (B,)."""
    xp = array_module(mean, x, log_sigma)
    cast = mean.dtype.type
    r = (x - mean) * xp.exp(-log_sigma)         # (B, D), standardized residual
    return xp.sum(cast(HALF_LOG_2PI) + log_sigma + cast(0.5) * r * r, axis=1)


def reparameterize_kl(mu, log_sigma, eps):
    """Sample ``z = mu + sigma * eps`` and the KL to the standard normal prior.

    Parameters
    ----------
    mu : array, shape (B, L)
        Posterior means.
    log_sigma : array, shape (B, L), same dtype
        Posterior log standard deviations; accurate for [-20, 20].
    eps : array, shape (B, L), same dtype
        Standard normal noise.

    Returns
    -------
    z : array, shape (B, L)
        ``mu + exp(log_sigma) * eps``.
    kl : array, shape (B, L)
        Per-dimension ``KL(N(mu, sigma**2) || N(0, 1))`` =
        ``0.5 mu**2 + 0.5 (expm1(2 log_sigma) - 2 log_sigma)`` (>= 0).
    """
    check_reparam("reparameterize_kl", mu=mu, log_sigma=log_sigma, eps=eps)
    xp = array_module(mu, log_sigma, eps)
    cast = mu.dtype.type
    z = mu + xp.exp(log_sigma) * eps
    kl = cast(0.5) * mu * mu + cast(0.5) * expm1_minus_x(cast(2) * log_sigma)
    return z, kl


def reparameterize_kl_backward(dz, mu, log_sigma, eps, kl_weight):
    """Gradients of ``loss(z) + sum_{b,l} kl_weight[l] * kl[b, l]``.

    Parameters
    ----------
    dz : array, shape (B, L)
        Upstream gradient of the loss with respect to ``z``.
    mu, log_sigma, eps : arrays, shape (B, L), same dtype
        The inputs of :func:`reparameterize_kl`.
    kl_weight : array, shape (L,), or scalar
        Per-dimension multiplier of the KL gradient (e.g. ``beta / B``, and 0
        for dimensions held at a free-bits floor); cast to the dtype of ``mu``.

    Returns
    -------
    dmu : array, shape (B, L)
        ``dz + kl_weight * mu``.
    dlog_sigma : array, shape (B, L)
        ``dz * exp(log_sigma) * eps + kl_weight * expm1(2 log_sigma)``.
    """
    B, L = check_reparam("reparameterize_kl_backward", dz=dz, mu=mu, log_sigma=log_sigma, eps=eps)
    xp = array_module(dz, mu, log_sigma, eps)
    cast = mu.dtype.type
    w = check_kl_weight(kl_weight, L, mu.dtype, xp)
    dmu = dz + w * mu
    dlog_sigma = dz * xp.exp(log_sigma) * eps + w * xp.expm1(cast(2) * log_sigma)
    return dmu, dlog_sigma
