"""Fused CPU kernels: Numba ``@njit`` loops, one pass over the data each.

Each ``*_kernel`` is a top-level ``@njit(cache=True)`` function that reads
its inputs once (row by row) and writes into preallocated outputs; each
``*_into`` wrapper casts the Python scalars to the array dtype and calls
it.  The public, validating entry points are in :mod:`scratchvae.kernels`;
the math (and its derivation) is :mod:`scratchvae.losses`, which these
loops follow term by term, so that the results agree to rounding (a few
ulps: ``log1p`` and ``expm1`` are computed differently, see below).

dtype discipline: every literal is cast with ``arr.dtype.type(...)`` (a
bare ``0.5`` is a float64 in Numba and would promote float32 arithmetic to
float64), so a float32 call compiles to float32 code throughout (the tests
check the float32 LLVM IR for double-precision arithmetic).

How the loops are kept fast (the measured effect of each is in
``benchmarks/README.md``):

* ``error_model="numpy"``: IEEE division (inf/nan, as in NumPy) instead of
  a ZeroDivisionError check, without which no loop with a division
  vectorizes.
* Without Intel SVML, Numba cannot vectorize libm calls, and a loop that
  calls ``exp`` stays scalar.  The BCE kernel, the one hot loop with a
  transcendental per element, therefore calls no libm function:
  ``exp(-|l|)`` is :func:`_exp_neg_abs_row` (range reduction and a
  polynomial, written so that LLVM vectorizes it), and ``log1p`` of it, in
  [0, 1], is an
  atanh series (:func:`_log1p_unit`).  Elsewhere ``expm1`` is a Taylor
  series or ``exp(y) - 1`` (glibc's ``log1pf`` and ``expm1f`` cost several
  times ``expf``).  These agree with libm within ~2 ulps.
* Row sums go through :func:`_sum`, compiled with ``fastmath={"reassoc"}``
  so that LLVM vectorizes it with many partial sums (as accurate as
  NumPy's pairwise sum for these lengths).
* No ``parallel=True``: Numba's threads would compete with the BLAS
  library's spinning threads for the same cores.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from scratchvae.adam_scalars import adam_coefficients

__all__ = [
    "bce_with_logits_kernel", "gaussian_nll_kernel", "reparameterize_kl_kernel",
    "reparameterize_kl_backward_kernel", "adam_kernel", "adam_many_kernel",
    "bce_with_logits_into", "gaussian_nll_into", "reparameterize_kl_into",
    "reparameterize_kl_backward_into", "adam_update_into", "adam_update_many_into",
    "im2col_chwb_kernel", "col2im_chwb_kernel", "relu_forward_kernel", "relu_backward_kernel",
    "gated_forward_kernel", "gated_backward_kernel",
]

# Constants are defined here, not imported: Numba freezes globals into the
# cached machine code, and the cache is invalidated only when this file changes.
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
EXPM1_SERIES_CUTOFF = 1.0      # as in scratchvae.losses
_EXP_SERIES = tuple(1.0 / math.factorial(k) for k in range(2, 19))  # 1/2!, ..., 1/18!
_NEXP = len(_EXP_SERIES)       # float64: y**2 .. y**18 for |y| < 1
_NEXP_F32 = 9                  # float32: y**2 .. y**10 (next term < 5e-8 relative)
_ATANH_SERIES = tuple(1.0 / (2 * k + 1) for k in range(17))  # 1, 1/3, 1/5, ...
_NATANH = 17                   # float64: s**0 .. s**32 (s <= 1/3)
_NATANH_F32 = 8                # float32: s**0 .. s**14
# exp(-a), a >= 0 (_exp_neg_abs_row): a = k ln2 - r, ln2 split in a high part
# with few significant bits (k * hi is exact) and a low part (Cody & Waite;
# the float64 pair is fdlibm's); |r| <= ln2/2, where the Taylor polynomial
# of exp to degree 7 (float32) or 13 (float64) is below half an ulp.
LOG2_E = 1.0 / math.log(2.0)
LN2_HI_F32, LN2_LO_F32 = 0.693359375, -2.12194440e-4
LN2_HI_F64, LN2_LO_F64 = 6.93147180369123816490e-01, 1.90821492927058770002e-10
_EXP_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(14))  # 1/0!, ..., 1/13!
_DEG_EXP_F32, _DEG_EXP_F64 = 7, 13
# beyond these, exp(-a) rounds to zero (below half the smallest subnormal)
EXP_NEG_ZERO_F32, EXP_NEG_ZERO_F64 = 104.0, 745.5


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

@njit(cache=True, error_model="numpy")
def _single(dtype):
    """True for float32 (a comparison of constants: LLVM folds it away)."""
    cast = dtype.type   # the dtype's scalar type: cast(0.5) keeps float32 code float32
    return cast(1.0) + cast(1e-10) == cast(1.0)


@njit(cache=True, error_model="numpy")
def _expm1_minus_x(y, dtype):
    """expm1(y) - y for a scalar ``y`` of ``dtype``, without libm's expm1.

    For ``|y| < 1`` the Taylor series y**2/2! + ... (to y**10/10! in float32,
    y**18/18! in float64: the first omitted term is below the dtype's
    rounding); elsewhere ``(exp(y) - 1) - y``, where both subtractions are
    exact or benign (error <= 2 ulps).  libm's ``expm1f`` costs several
    times ``expf``, hence the detour.
    """
    cast = dtype.type
    if abs(y) < cast(EXPM1_SERIES_CUTOFF):
        last = _NEXP_F32 - 1 if _single(dtype) else _NEXP - 1
        poly = cast(_EXP_SERIES[last])
        for k in range(last - 1, -1, -1):
            poly = poly * y + cast(_EXP_SERIES[k])
        return y * y * poly
    return (math.exp(y) - cast(1.0)) - y


@njit(cache=True, error_model="numpy")
def _expm1(y, dtype):
    """expm1(y) for a scalar ``y`` of ``dtype`` (see :func:`_expm1_minus_x`)."""
    cast = dtype.type
    if abs(y) < cast(EXPM1_SERIES_CUTOFF):
        return y + _expm1_minus_x(y, dtype)
    return math.exp(y) - cast(1.0)


@njit(cache=True, error_model="numpy")
def _log1p_unit(e, dtype):
    """log1p(e) for 0 <= e <= 1 without a libm call (so loops vectorize).

    log1p(e) = 2 atanh(s) = 2 s (1 + s**2/3 + s**4/5 + ...) with
    s = e / (2 + e) in [0, 1/3]; 7 terms reach float32 rounding, 16 float64.
    Max error about 2 ulps (libm's log1p: under 1 ulp).
    """
    cast = dtype.type
    s = e / (cast(2.0) + e)
    s2 = s * s
    last = _NATANH_F32 - 1 if _single(dtype) else _NATANH - 1
    q = cast(_ATANH_SERIES[last])
    for k in range(last - 1, 0, -1):
        q = q * s2 + cast(_ATANH_SERIES[k])
    two_s = s + s
    return two_s + two_s * (s2 * q)


@njit(cache=True, error_model="numpy")
def _exp_neg_abs_row(src, out, bits):
    """out = exp(-|src|) for 1-D arrays, in loops that LLVM vectorizes.

    With a = |src[d]| = k ln2 - r (k an integer, |r| <= ln2/2),
    exp(-a) = exp(r) 2**-k.  The first loop evaluates the polynomial for
    exp(r) and writes the bit pattern of 2**-(k // 2) into ``bits`` (an
    integer array as wide as the floats: exponent field ``bias - k // 2``);
    the second multiplies by that power of two twice (and by 1/2 for odd k,
    folded in before).  Two factors keep each one a normal number, so that
    results in the subnormal range round once, as libm's do.  Measured
    error: at most 1.2 ulps in float32 (against exp in float64) and 1 ulp
    from NumPy's exp in float64, subnormals included; NaN propagates (its
    polynomial is NaN).

    Parameters
    ----------
    src : 1-D array, float32 or float64
    out : output, shape and dtype of ``src`` (may not alias ``src``)
    bits : scratch, 1-D, at least as long, int32 for float32, int64 for float64
    """
    cast = src.dtype.type
    cast_int = bits.dtype.type
    single = _single(src.dtype)
    ln2_hi = cast(LN2_HI_F32) if single else cast(LN2_HI_F64)
    ln2_lo = cast(LN2_LO_F32) if single else cast(LN2_LO_F64)
    a_zero = cast(EXP_NEG_ZERO_F32) if single else cast(EXP_NEG_ZERO_F64)
    deg = _DEG_EXP_F32 if single else _DEG_EXP_F64
    mantissa_bits = cast_int(23) if single else cast_int(52)
    exponent_bias = cast_int(127) if single else cast_int(1023)
    half = cast(0.5)
    one = cast(1.0)
    for d in range(src.shape[0]):
        a = min(abs(src[d]), a_zero)                 # exp(-a_zero) already rounds to 0
        kf = np.floor(a * cast(LOG2_E) + half)          # nearest integer (np.floor keeps the dtype)
        r = (kf * ln2_hi - a) + kf * ln2_lo          # = k ln2 - a, in [-ln2/2, ln2/2]
        p = cast(_EXP_TAYLOR[deg])
        for j in range(deg - 1, -1, -1):
            p = p * r + cast(_EXP_TAYLOR[j])            # exp(r), Horner
        k = cast_int(kf)
        k_half = k >> cast_int(1)
        out[d] = p * (half if k - k_half - k_half else one)
        bits[d] = (exponent_bias - k_half) << mantissa_bits
    pow2 = bits.view(src.dtype)                      # 2**-(k // 2)
    for d in range(src.shape[0]):
        out[d] = (out[d] * pow2[d]) * pow2[d]


@njit(cache=True, error_model="numpy", fastmath={"reassoc"})
def _sum(a):
    """Sum of a 1-D array; ``reassoc`` lets LLVM vectorize it (many partial sums)."""
    total = a.dtype.type(0.0)
    for i in range(a.shape[0]):
        total += a[i]
    return total


# ----------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------

@njit(cache=True, error_model="numpy")
def bce_with_logits_kernel(logits, x, scale, nll, dlogits, bits):
    """Bernoulli NLL and its gradient in one pass over the rows.

    Per row: (1) ``exp(-|l|)`` into the ``dlogits`` row
    (:func:`_exp_neg_abs_row`); (2) a loop over the same row, now in L1
    cache, forming the NLL terms and the gradient; (3) the row sum of the
    terms.  No libm call anywhere, so every loop vectorizes.

    Parameters
    ----------
    logits, x : C-contiguous arrays, shape (B, D), one float dtype
    scale : scalar of that dtype
    nll : output, shape (B,)
    dlogits : output, shape (B, D)
    bits : scratch, shape (D,), int32 for float32 and int64 for float64
    """
    B, D = logits.shape
    cast = logits.dtype.type
    zero = cast(0.0)
    one = cast(1.0)
    terms = np.empty(D, logits.dtype)
    for b in range(B):
        lrow = logits[b]
        xrow = x[b]
        grow = dlogits[b]
        _exp_neg_abs_row(lrow, grow, bits)
        for d in range(D):
            l = lrow[d]
            xv = xrow[d]
            e = grow[d]
            terms[d] = (l if l > zero else zero) - l * xv + _log1p_unit(e, logits.dtype)
            s = (one if l >= zero else e) / (one + e)
            grow[d] = scale * (s - xv)
        nll[b] = _sum(terms)


@njit(cache=True, error_model="numpy")
def gaussian_nll_kernel(mean, x, log_sigma, scale, nll, dmean, dlog_sigma):
    """Gaussian NLL and its gradients in one pass over ``mean`` and ``x``.

    Parameters
    ----------
    mean, x : C-contiguous arrays, shape (B, D), one float dtype
    log_sigma : shape (D,) or (1,)
    scale : scalar of that dtype
    nll : output, shape (B,)
    dmean : output, shape (B, D)
    dlog_sigma : output, shape of ``log_sigma``
    """
    B, D = mean.shape
    cast = mean.dtype.type
    one = cast(1.0)
    half = cast(0.5)
    c0 = cast(HALF_LOG_2PI)
    shared = log_sigma.shape[0] == 1
    # per-pixel constants, computed once per call
    ls = np.empty(D, mean.dtype)
    inv_sigma = np.empty(D, mean.dtype)
    inv_var = np.empty(D, mean.dtype)
    gsum = np.zeros(D, mean.dtype)
    terms = np.empty(D, mean.dtype)
    for d in range(D):
        g = log_sigma[0] if shared else log_sigma[d]
        ls[d] = g
        inv_sigma[d] = math.exp(-g)
        inv_var[d] = math.exp(cast(-2.0) * g)
    for b in range(B):
        mrow = mean[b]
        xrow = x[b]
        grow = dmean[b]
        for d in range(D):
            m = mrow[d]
            xv = xrow[d]
            r = (xv - m) * inv_sigma[d]
            terms[d] = c0 + ls[d] + half * r * r
            grow[d] = scale * ((m - xv) * inv_var[d])
            gsum[d] += one - r * r
        nll[b] = _sum(terms)
    if shared:
        dlog_sigma[0] = scale * _sum(gsum)
    else:
        for d in range(D):
            dlog_sigma[d] = scale * gsum[d]


@njit(cache=True, error_model="numpy")
def reparameterize_kl_kernel(mu, log_sigma, eps, z, kl):
    """z = mu + exp(log_sigma) eps and the per-dimension KL, in one pass.

    Parameters
    ----------
    mu, log_sigma, eps : C-contiguous arrays, shape (B, L), one float dtype
    z, kl : outputs, shape (B, L)
    """
    B, L = mu.shape
    cast = mu.dtype.type
    half = cast(0.5)
    two = cast(2.0)
    for b in range(B):
        for j in range(L):
            m = mu[b, j]
            g = log_sigma[b, j]
            z[b, j] = m + math.exp(g) * eps[b, j]
            kl[b, j] = half * m * m + half * _expm1_minus_x(two * g, mu.dtype)


@njit(cache=True, error_model="numpy")
def reparameterize_kl_backward_kernel(dz, mu, log_sigma, eps, kl_weight, dmu, dlog_sigma):
    """Gradients of loss(z) + sum kl_weight * KL with respect to mu and log_sigma.

    Parameters
    ----------
    dz, mu, log_sigma, eps : C-contiguous arrays, shape (B, L), one float dtype
    kl_weight : shape (L,)
    dmu, dlog_sigma : outputs, shape (B, L)
    """
    B, L = mu.shape
    two = mu.dtype.type(2.0)
    for b in range(B):
        for j in range(L):
            d = dz[b, j]
            g = log_sigma[b, j]
            w = kl_weight[j]
            dmu[b, j] = d + w * mu[b, j]
            dlog_sigma[b, j] = d * math.exp(g) * eps[b, j] + w * _expm1(two * g, mu.dtype)


@njit(cache=True, error_model="numpy")
def adam_kernel(param, grad, m, v, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, step_scale, eps_hat,
                weight_decay, grad_floor, moment_floor):
    """One AdamW step over flat arrays, in place on ``param``, ``m``, ``v``.

    ``error_model="numpy"`` (IEEE division, no ZeroDivisionError check) is
    what lets this loop vectorize; the folded bias corrections
    (``step_scale``, ``eps_hat``) leave one square root and one division per
    element. The floors keep every operand and every stored moment out of
    the subnormal range (see :mod:`scratchvae.optim`); the selects compile
    to vector blends.

    Parameters
    ----------
    param, grad, m, v : C-contiguous 1-D arrays, shape (N,), one float dtype
    lr, ... moment_floor : scalars of that dtype, from
        :func:`scratchvae.adam_scalars.adam_coefficients`
    """
    zero = param.dtype.type(0)
    for i in range(param.shape[0]):
        g = grad[i]
        g = g if abs(g) >= grad_floor else zero
        mi = m[i] * beta1 + one_minus_beta1 * g
        vi = v[i] * beta2 + one_minus_beta2 * (g * g)
        mi = mi if abs(mi) >= moment_floor else zero
        vi = vi if vi >= moment_floor else zero
        m[i] = mi
        v[i] = vi
        update = step_scale * mi / (math.sqrt(vi) + eps_hat)
        p = param[i]
        param[i] = p - lr * (update + weight_decay * p)


@njit(cache=True, error_model="numpy")
def adam_many_kernel(params, grads, ms, vs, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, step_scale,
                     eps_hat, weight_decay, grad_floor, moment_floor):
    """:func:`adam_kernel` over tuples of flat arrays: all parameters in one call.

    One dispatch from Python instead of one per parameter (each costs
    microseconds of argument unboxing and checks).
    """
    for j in range(len(params)):
        adam_kernel(params[j], grads[j], ms[j], vs[j], lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                    step_scale, eps_hat, weight_decay, grad_floor, moment_floor)


# ----------------------------------------------------------------------------
# convolution: the unfold (im2col) and its adjoint (col2im) in the CHWB layout
# ----------------------------------------------------------------------------

@njit(cache=True, error_model="numpy")
def im2col_chwb_kernel(x, cols, sh, sw, ph, pw):
    """``cols[c, u, v, i, j, :] = x[c, i*sh + u - ph, j*sw + v - pw, :]`` (0 outside ``x``).

    ``x`` (C, H, W, B) and ``cols`` (C, kh, kw, Ho, Wo, B), both C-contiguous:
    :func:`scratchvae.layers.conv.im2col` in one pass, the zero padding
    written where it falls instead of copied from a padded buffer; each
    inner loop moves one run of B contiguous values.
    """
    C, H, W, B = x.shape
    kh, kw, Ho, Wo = cols.shape[1], cols.shape[2], cols.shape[3], cols.shape[4]
    zero = x.dtype.type(0)
    for c in range(C):
        for u in range(kh):
            for v in range(kw):
                for i in range(Ho):
                    h = i * sh + u - ph
                    for j in range(Wo):
                        w = j * sw + v - pw
                        dst = cols[c, u, v, i, j]
                        if 0 <= h < H and 0 <= w < W:
                            src = x[c, h, w]
                            for b in range(B):
                                dst[b] = src[b]
                        else:
                            for b in range(B):
                                dst[b] = zero


@njit(cache=True, error_model="numpy")
def col2im_chwb_kernel(cols, x, sh, sw, ph, pw, bias):
    """``x[c, h, w, :] = sum of cols[c, u, v, i, j, :]`` over ``i*sh + u - ph == h``,
    ``j*sw + v - pw == w``, plus ``bias[c]`` when ``bias`` has C entries (none when it has 0):
    the adjoint of :func:`im2col_chwb_kernel`, into ``x`` (overwritten).

    The sums run over (u, v) in the same order as the array code of
    :func:`scratchvae.layers.conv.col2im` (one strided add per kernel
    offset), and the bias is added after them, so the results are
    bit-identical to it; the bias pass runs on each channel while it is
    still in cache.
    """
    C, H, W, B = x.shape
    kh, kw, Ho, Wo = cols.shape[1], cols.shape[2], cols.shape[3], cols.shape[4]
    x[...] = 0
    for c in range(C):
        for u in range(kh):
            for v in range(kw):
                for i in range(Ho):
                    h = i * sh + u - ph
                    if h < 0 or h >= H:
                        continue
                    for j in range(Wo):
                        w = j * sw + v - pw
                        if w < 0 or w >= W:
                            continue
                        dst = x[c, h, w]
                        src = cols[c, u, v, i, j]
                        for b in range(B):
                            dst[b] += src[b]
        if bias.size:
            bc = bias[c]
            xc = x[c].reshape(H * W * B)
            for k in range(H * W * B):
                xc[k] += bc


# ----------------------------------------------------------------------------
# ReLU: the array code's results bit for bit (NaN, infinities and signed zeros included)
# ----------------------------------------------------------------------------

@njit(cache=True, error_model="numpy")
def relu_forward_kernel(x, y):
    """``y = maximum(x, 0)`` over flat arrays: ``x`` where ``x > 0`` or NaN, else +0.0 (-0.0 gives +0.0),
    as NumPy's ``maximum`` does."""
    zero = x.dtype.type(0)
    for i in range(x.size):
        v = x[i]
        y[i] = v if (v > zero or v != v) else zero


@njit(cache=True, error_model="numpy")
def relu_backward_kernel(dy, x, dx):
    """``dx = dy * (x > 0)`` over flat arrays, as a multiplication (so ``inf * 0`` is NaN and
    ``-1 * 0`` is -0.0, as in the array code)."""
    zero, one = x.dtype.type(0), x.dtype.type(1)
    for i in range(x.size):
        dx[i] = dy[i] * (one if x[i] > zero else zero)


# ----------------------------------------------------------------------------
# GatedDense: the elementwise lines of scratchvae.layers.gated in one pass each
# ----------------------------------------------------------------------------

@njit(cache=True, error_model="numpy")
def gated_forward_kernel(a, s, b, c, h):
    """In place on the products ``a = x W`` and ``s = x V`` (B, D), and into ``h``::

        a <- a + b,  s <- sigmoid(s + c) = g,  h = a * g

    with the stable sigmoid of scratchvae.losses (``e = exp(-|t|)``; ``1 / (1 + e)``
    for t >= 0, ``e / (1 + e)`` otherwise)."""
    one = a.dtype.type(1)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            av = a[i, j] + b[j]
            t = s[i, j] + c[j]
            e = math.exp(-abs(t))
            g = (one if t >= 0 else e) / (one + e)
            a[i, j] = av
            s[i, j] = g
            h[i, j] = av * g


@njit(cache=True, error_model="numpy")
def gated_backward_kernel(dh, a, g, da, ds):
    """``da = dh * g`` and ``ds = dh * a * g * (1 - g)`` (B, D), in the array code's order of operations."""
    one = a.dtype.type(1)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            d, gv = dh[i, j], g[i, j]
            da[i, j] = d * gv
            ds[i, j] = d * a[i, j] * gv * (one - gv)


# ----------------------------------------------------------------------------
# wrappers: validated, contiguous arrays in, preallocated outputs filled
# ----------------------------------------------------------------------------

_SAME_WIDTH_INT = {np.dtype(np.float32): np.int32, np.dtype(np.float64): np.int64}


def bce_with_logits_into(logits, x, scale, nll, dlogits):
    """Fill ``nll`` (B,) and ``dlogits`` (B, D); see :func:`bce_with_logits_kernel`."""
    bits = np.empty(logits.shape[1], _SAME_WIDTH_INT[logits.dtype])
    bce_with_logits_kernel(logits, x, logits.dtype.type(scale), nll, dlogits, bits)


def gaussian_nll_into(mean, x, log_sigma, scale, nll, dmean, dlog_sigma):
    """Fill ``nll`` (B,), ``dmean`` (B, D), ``dlog_sigma`` (shape of log_sigma)."""
    gaussian_nll_kernel(mean, x, log_sigma, mean.dtype.type(scale), nll, dmean, dlog_sigma)


def reparameterize_kl_into(mu, log_sigma, eps, z, kl):
    """Fill ``z`` and ``kl``, both (B, L)."""
    reparameterize_kl_kernel(mu, log_sigma, eps, z, kl)


def reparameterize_kl_backward_into(dz, mu, log_sigma, eps, kl_weight, dmu, dlog_sigma):
    """Fill ``dmu`` and ``dlog_sigma``, both (B, L); ``kl_weight`` is (L,)."""
    reparameterize_kl_backward_kernel(dz, mu, log_sigma, eps, kl_weight, dmu, dlog_sigma)


def adam_update_into(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """AdamW step in place; ``param``, ``m``, ``v`` C-contiguous, any shape."""
    coefs = adam_coefficients(param.dtype, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                              weight_decay=weight_decay, step=step)
    adam_kernel(param.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1), *coefs)


def adam_update_many_into(params, grads, ms, vs, lr, beta1, beta2, eps, weight_decay, step):
    """AdamW step in place on lists of C-contiguous arrays of one dtype, in one kernel call."""
    coefs = adam_coefficients(params[0].dtype, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                              weight_decay=weight_decay, step=step)
    flat = [tuple(a.reshape(-1) for a in arrays) for arrays in (params, grads, ms, vs)]
    adam_many_kernel(*flat, *coefs)
