"""Fused GPU kernels: ``numba.cuda`` kernels that take CuPy arrays directly.

Same computations as :mod:`scratchvae.kernels.cpu` (and the same order of
operations as :mod:`scratchvae.losses`), with these launch layouts:

* row kernels (BCE, Gaussian NLL): one block per row, a block-stride loop
  over the D columns (coalesced), each thread summing its terms, then a
  shared-memory tree reduction for the row's NLL.  The block size must be a
  power of two <= ``MAX_ROW_THREADS``; rows beyond the grid are handled by a
  grid-stride loop over rows.
* elementwise kernels (reparameterization forward/backward, Adam): a 1-D
  grid-stride loop over the flattened arrays.

The Gaussian ``dlog_sigma`` sums over the batch with ``cuda.atomic.add``
(into a zeroed output), so its last bits may vary from run to run.

Importing this module needs ``numba.cuda`` (the numba-cuda package) but not
a GPU: kernels compile lazily on first launch.  :func:`require_gpu` raises
:class:`scratchvae.backend.BackendUnavailable` when no GPU can run them.
Every ``*_into`` launch wrapper has the signature of its CPU twin plus
``threads=`` (block size) and ``stream=`` (a numba stream, or 0 for the
default stream); it accepts CuPy arrays (or anything with
``__cuda_array_interface__``) and, under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``), NumPy arrays.
"""
from __future__ import annotations

import math

try:
    from numba import cuda
except ImportError as err:  # pragma: no cover - depends on the installation
    raise ImportError(
        "scratchvae.kernels.cuda needs numba-cuda (`pip install numba-cuda[cu12]`); "
        f"importing numba.cuda failed: {err}") from err

import numpy
from numba import config as _numba_config

from scratchvae.adam_scalars import adam_coefficients
from scratchvae.backend import BackendUnavailable, contiguous_run
from scratchvae.losses import EXPM1_SERIES, EXPM1_SERIES_CUTOFF, HALF_LOG_2PI

__all__ = [
    "MAX_ROW_THREADS", "ROW_THREADS", "ELEMENTWISE_THREADS",
    "bce_with_logits_kernel", "gaussian_nll_kernel", "reparameterize_kl_kernel",
    "reparameterize_kl_backward_kernel", "adam_kernel", "KERNELS",
    "bce_with_logits_into", "gaussian_nll_into", "reparameterize_kl_into",
    "reparameterize_kl_backward_into", "adam_update_into",
    "require_gpu", "current_stream",
]

#: size of the shared reduction buffer: the largest block a row kernel accepts
MAX_ROW_THREADS = 256
#: default block size of the row kernels
ROW_THREADS = 128
#: default block size of the elementwise kernels
ELEMENTWISE_THREADS = 256
#: cap on the elementwise grid (the kernels grid-stride beyond it)
_MAX_BLOCKS = 65535
# NUMBA_ENABLE_CUDASIM=1: kernels run as Python threads on the host (tests without a GPU)
_SIMULATOR = bool(_numba_config.ENABLE_CUDASIM)

_NSERIES = len(EXPM1_SERIES)


# ----------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------

@cuda.jit(device=True, inline="always")
def _expm1_minus_x(y, dtype):
    """expm1(y) - y for a scalar ``y`` of ``dtype`` (Taylor series near 0)."""
    cast = dtype.type   # the dtype's scalar type: cast(0.5) keeps float32 code float32
    if abs(y) < cast(EXPM1_SERIES_CUTOFF):
        poly = cast(EXPM1_SERIES[_NSERIES - 1])
        for k in range(_NSERIES - 2, -1, -1):
            poly = poly * y + cast(EXPM1_SERIES[k])
        return y * y * poly
    return math.expm1(y) - y


@cuda.jit(device=True, inline="always")
def _block_sum(buf, value):
    """Sum ``value`` over the threads of the block (all threads get the sum).

    ``buf`` is a shared array with at least blockDim.x entries; blockDim.x
    must be a power of two.  Every thread of the block must call this.
    """
    tid = cuda.threadIdx.x
    buf[tid] = value
    cuda.syncthreads()
    s = cuda.blockDim.x // 2
    while s > 0:
        if tid < s:
            buf[tid] += buf[tid + s]
        cuda.syncthreads()
        s //= 2
    total = buf[0]
    cuda.syncthreads()  # everyone has read buf[0] before it is reused
    return total


# ----------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------

@cuda.jit
def bce_with_logits_kernel(logits, x, scale, nll, dlogits):
    """Bernoulli NLL and gradient; launch ``[rows, threads]``.

    logits, x, dlogits : (B, D); nll : (B,); scale : scalar of the dtype.
    """
    buf = cuda.shared.array(MAX_ROW_THREADS, dtype=logits.dtype)
    B, D = logits.shape
    cast = logits.dtype.type
    zero = cast(0.0)
    one = cast(1.0)
    for b in range(cuda.blockIdx.x, B, cuda.gridDim.x):
        acc = zero
        for d in range(cuda.threadIdx.x, D, cuda.blockDim.x):
            l = logits[b, d]
            xv = x[b, d]
            e = math.exp(-abs(l))
            acc += (l if l > zero else zero) - l * xv + math.log1p(e)
            s = (one if l >= zero else e) / (one + e)
            dlogits[b, d] = scale * (s - xv)
        total = _block_sum(buf, acc)
        if cuda.threadIdx.x == 0:
            nll[b] = total


@cuda.jit
def gaussian_nll_kernel(mean, x, log_sigma, scale, nll, dmean, dlog_sigma):
    """Gaussian NLL and gradients; launch ``[rows, threads]``.

    mean, x, dmean : (B, D); log_sigma, dlog_sigma : (D,) or (1,);
    nll : (B,); scale : scalar.  ``dlog_sigma`` must be zeroed before the
    launch (it is accumulated with atomics).
    """
    buf = cuda.shared.array(MAX_ROW_THREADS, dtype=mean.dtype)
    B, D = mean.shape
    cast = mean.dtype.type
    zero = cast(0.0)
    one = cast(1.0)
    half = cast(0.5)
    minus_two = cast(-2.0)
    c0 = cast(HALF_LOG_2PI)
    shared = log_sigma.shape[0] == 1
    for b in range(cuda.blockIdx.x, B, cuda.gridDim.x):
        acc = zero
        gacc = zero
        for d in range(cuda.threadIdx.x, D, cuda.blockDim.x):
            g = log_sigma[0] if shared else log_sigma[d]
            m = mean[b, d]
            xv = x[b, d]
            r = (xv - m) * math.exp(-g)
            acc += c0 + g + half * r * r
            dmean[b, d] = scale * ((m - xv) * math.exp(minus_two * g))
            q = one - r * r
            if shared:
                gacc += q
            else:
                cuda.atomic.add(dlog_sigma, d, scale * q)
        total = _block_sum(buf, acc)
        if cuda.threadIdx.x == 0:
            nll[b] = total
        if shared:  # uniform across the block, so the syncthreads inside are safe
            gtotal = _block_sum(buf, gacc)
            if cuda.threadIdx.x == 0:
                cuda.atomic.add(dlog_sigma, 0, scale * gtotal)


@cuda.jit
def reparameterize_kl_kernel(mu, log_sigma, eps, z, kl):
    """z and per-dimension KL over flat (N,) arrays; launch ``[blocks, threads]``."""
    cast = mu.dtype.type
    half = cast(0.5)
    two = cast(2.0)
    for i in range(cuda.grid(1), mu.shape[0], cuda.gridsize(1)):
        m = mu[i]
        g = log_sigma[i]
        z[i] = m + math.exp(g) * eps[i]
        kl[i] = half * m * m + half * _expm1_minus_x(two * g, mu.dtype)


@cuda.jit
def reparameterize_kl_backward_kernel(dz, mu, log_sigma, eps, kl_weight, dmu, dlog_sigma):
    """dmu, dlog_sigma over flat (B*L,) arrays; kl_weight (L,) indexed by i % L."""
    L = kl_weight.shape[0]
    two = mu.dtype.type(2.0)
    for i in range(cuda.grid(1), mu.shape[0], cuda.gridsize(1)):
        d = dz[i]
        g = log_sigma[i]
        w = kl_weight[i % L]
        dmu[i] = d + w * mu[i]
        dlog_sigma[i] = d * math.exp(g) * eps[i] + w * math.expm1(two * g)


@cuda.jit
def adam_kernel(param, grad, m, v, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, step_scale, eps_hat,
                weight_decay, grad_floor, moment_floor):
    """One AdamW step over flat (N,) arrays, in place; launch ``[blocks, threads]``.

    The floors keep values out of the subnormal range, as on the CPU (see
    :mod:`scratchvae.optim`), so both backends follow one trajectory."""
    zero = param.dtype.type(0)
    for i in range(cuda.grid(1), param.shape[0], cuda.gridsize(1)):
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


#: every kernel, for tests (``compile_ptx(k.py_func, ...)``)
KERNELS = {
    "bce_with_logits": bce_with_logits_kernel,
    "gaussian_nll": gaussian_nll_kernel,
    "reparameterize_kl": reparameterize_kl_kernel,
    "reparameterize_kl_backward": reparameterize_kl_backward_kernel,
    "adam": adam_kernel,
}


# ----------------------------------------------------------------------------
# runtime checks, streams, launch wrappers
# ----------------------------------------------------------------------------

def require_gpu():
    """Raise BackendUnavailable unless numba.cuda can launch kernels here."""
    if cuda.is_available():
        return
    raise BackendUnavailable(
        "scratchvae.kernels: CuPy arrays were passed but numba.cuda finds no usable GPU "
        "(cuda.is_available() is False; check the NVIDIA driver and numba-cuda[cu12], "
        "or use scratchvae.losses / NumPy arrays)")


def current_stream():
    """The numba stream matching CuPy's current stream (0: the default stream)."""
    import cupy
    ptr = cupy.cuda.get_current_stream().ptr
    return 0 if ptr == 0 else cuda.external_stream(ptr)


def _dev(a):
    """A numba view of a CuPy array (no stream sync: we launch on its stream).

    NumPy arrays (CUDA simulator) pass through unchanged.
    """
    if hasattr(a, "__cuda_array_interface__"):
        if _SIMULATOR:   # the simulator's device memory is host memory: a NumPy view over the same bytes
            return numpy.asarray(_HostView(a.__cuda_array_interface__))
        return cuda.as_cuda_array(a, sync=False)
    return a


class _HostView:
    """Exposes a ``__cuda_array_interface__`` as NumPy's array interface (CUDA simulator only)."""

    def __init__(self, interface):
        self.__array_interface__ = {"shape": tuple(interface["shape"]), "typestr": interface["typestr"],
                                    "data": (interface["data"][0], False), "strides": interface.get("strides"),
                                    "version": 3}


def _check_row_threads(threads):
    if threads < 1 or threads > MAX_ROW_THREADS or threads & (threads - 1):
        raise ValueError(f"row kernels need a power-of-two block size <= {MAX_ROW_THREADS}, got {threads}")


def _elementwise_grid(n, threads):
    return max(1, min(_MAX_BLOCKS, -(-n // threads)))


def bce_with_logits_into(logits, x, scale, nll, dlogits, *, threads=ROW_THREADS, stream=0):
    """Launch :func:`bce_with_logits_kernel`: one block per row."""
    _check_row_threads(threads)
    B = logits.shape[0]
    if B == 0:
        return
    bce_with_logits_kernel[B, threads, stream](
        _dev(logits), _dev(x), logits.dtype.type(scale), _dev(nll), _dev(dlogits))


def gaussian_nll_into(mean, x, log_sigma, scale, nll, dmean, dlog_sigma, *, threads=ROW_THREADS, stream=0):
    """Launch :func:`gaussian_nll_kernel`: zero ``dlog_sigma``, one block per row."""
    _check_row_threads(threads)
    dlog_sigma[...] = 0
    B = mean.shape[0]
    if B == 0:
        return
    gaussian_nll_kernel[B, threads, stream](
        _dev(mean), _dev(x), _dev(log_sigma), mean.dtype.type(scale), _dev(nll), _dev(dmean),
        _dev(dlog_sigma))


def reparameterize_kl_into(mu, log_sigma, eps, z, kl, *, threads=ELEMENTWISE_THREADS, stream=0):
    """Launch :func:`reparameterize_kl_kernel` on the flattened (B, L) arrays."""
    n = mu.size
    if n == 0:
        return
    flat = [_dev(a.reshape(-1)) for a in (mu, log_sigma, eps, z, kl)]
    reparameterize_kl_kernel[_elementwise_grid(n, threads), threads, stream](*flat)


def reparameterize_kl_backward_into(dz, mu, log_sigma, eps, kl_weight, dmu, dlog_sigma, *,
                                    threads=ELEMENTWISE_THREADS, stream=0):
    """Launch :func:`reparameterize_kl_backward_kernel` on the flattened arrays."""
    n = mu.size
    if n == 0:
        return
    dz, mu, log_sigma, eps, dmu, dlog_sigma = [_dev(a.reshape(-1)) for a in (dz, mu, log_sigma, eps, dmu, dlog_sigma)]
    reparameterize_kl_backward_kernel[_elementwise_grid(n, threads), threads, stream](
        dz, mu, log_sigma, eps, _dev(kl_weight), dmu, dlog_sigma)


def adam_update_into(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, *,
                     threads=ELEMENTWISE_THREADS, stream=0):
    """Launch :func:`adam_kernel` on the flattened (C-contiguous) arrays, in place."""
    n = param.size
    if n == 0:
        return
    coefs = adam_coefficients(param.dtype, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                              weight_decay=weight_decay, step=step)
    flat = [_dev(a.reshape(-1)) for a in (param, grad, m, v)]
    adam_kernel[_elementwise_grid(n, threads), threads, stream](*flat, *coefs)


def adam_update_many_into(params, grads, ms, vs, lr, beta1, beta2, eps, weight_decay, step, *,
                          threads=ELEMENTWISE_THREADS, stream=0):
    """:func:`adam_update_into` over every parameter: one launch when each list tiles one flat
    buffer in the same order (a model's ``flat_params`` and ``flat_grads``, the moments of
    :meth:`scratchvae.optim.Adam.init`), else one launch per parameter."""
    runs = [contiguous_run(arrays) for arrays in (params, grads, ms, vs)]
    if all(r is not None for r in runs) and len({r.size for r in runs}) == 1:
        adam_update_into(*runs, lr, beta1, beta2, eps, weight_decay, step, threads=threads, stream=stream)
        return
    for p, g, m, v in zip(params, grads, ms, vs):
        adam_update_into(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, threads=threads, stream=stream)
