"""Priors p(z) of a VAE: the standard normal, and the VampPrior (Tomczak & Welling 2018).

A prior is one class that offers what the loss needs of it, each with its hand-derived gradient:

* ``log_prob(z, comps)`` (N,) and ``log_prob_backward(z, comps, a)``: ``a``
  (N,) is the upstream ``dLoss / dlog p(z_n)``; it returns ``dLoss/dz``
  (N, L) and the gradients of ``comps`` (or None). Gradients of the prior's
  own parameters it accumulates into its own ``grads``;
* ``params`` and ``grads``: its own parameters (a :class:`~scratchvae.layers.base.Layer`
  has them; an empty dict for none), which train with the model's;
* ``encoder_inputs()``: rows the model's top encoder should also see (the
  VampPrior's pseudo-inputs), or None; then ``comps`` is the top posterior's
  ``(mu_k, log_sigma_k)`` at those rows, computed in the same encoder pass
  as the batch, and ``encoder_inputs_backward(du)`` takes the gradient that
  reaches them through the encoder;
* ``sample(n, rng, comps, latent_dim, dtype)``;
* ``analytic``: whether ``KL(q(z|x) || p(z))`` has a closed form (the standard
  normal's, which the model computes with the fused kernels).
"""
from __future__ import annotations

import math

import numpy

from .choices import PRIORS
from .layers.base import Layer

__all__ = ["StandardNormal", "VampPrior", "PRIORS", "make"]

_LOG_2PI = math.log(2 * math.pi)


class StandardNormal:
    """p(z) = N(0, I)."""

    name = "standard"
    analytic = True
    params: dict = {}

    def encoder_inputs(self):
        return None

    def log_prob(self, z, comps=None):
        """log N(z; 0, I) = -0.5 |z|^2 - 0.5 L log(2 pi), per row: (N, L) -> (N,)."""
        return -0.5 * (z * z).sum(axis=1) - 0.5 * z.shape[1] * _LOG_2PI

    def log_prob_backward(self, z, comps, a):
        """dLoss/dz = a * dlog p/dz = a * (-z); no components."""
        return -a[:, None] * z, None

    def sample(self, n, rng, comps, latent_dim, dtype):
        """z ~ N(0, I): (n, L)."""
        return rng.standard_normal((int(n), int(latent_dim)), dtype=dtype)


class VampPrior(Layer):
    """p(z) = (1/K) sum_k q(z | u_k): the encoder's posterior at K learned pseudo-inputs.

    The pseudo-inputs are the parameter ``pseudo`` (K, D), read as
    ``u = clip(pseudo, 0, 1)`` so that they stay images in [0, 1] (a hard
    clamp: no gradient where a pixel sits outside). They start at
    N(0.05, 0.01^2), as in the paper's code for MNIST.

    With the components ``mu_k, log_sigma_k`` (K, L) and ``iv_k = exp(-2 log_sigma_k)``::

        log N_k(z) = -0.5 sum_j (z_j - mu_kj)^2 iv_kj - sum_j log_sigma_kj - 0.5 L log(2 pi)
                   = -0.5 z^2 . iv_k + z . (mu_k iv_k) - 0.5 mu_k^2 . iv_k - sum_j log_sigma_kj - const
        log p(z)   = logsumexp_k log N_k(z) - log K

    (the second line is three matrix products: no (N, K, L) array). With the
    responsibilities ``w_nk = softmax_k log N_k(z_n)`` and ``A_nk = a_n w_nk``
    (a responsibility below ``eps**2`` of the dtype is set to 0: it changes the
    gradient by less than the type's rounding, and left as it is it carries
    subnormal numbers into the encoder's backward pass, as the IWAE's
    sample weights do; see :class:`scratchvae.objectives.IWAE`)::

        dLoss/dz_n          = a_n sum_k w_nk (mu_k - z_n) iv_k
                            = a_n [ (w_n @ (mu iv)) - z_n (w_n @ iv) ]
        dLoss/dmu_k         = sum_n A_nk (z_n - mu_k) iv_k
                            = iv_k [ (A^T z)_k - mu_k colsum_k(A) ]
        dLoss/dlog_sigma_k  = sum_n A_nk ((z_n - mu_k)^2 iv_k - 1)
                            = iv_k [ (A^T z^2)_k - 2 mu_k (A^T z)_k + mu_k^2 colsum_k(A) ] - colsum_k(A)
    """

    name = "vampprior"
    analytic = False

    def __init__(self, n_pseudo: int, input_dim: int, *, backend=None, dtype="float32", rng=None):
        super().__init__(backend=backend, dtype=dtype)
        if n_pseudo < 1:
            raise ValueError(f"VampPrior: the number of pseudo-inputs must be >= 1, got {n_pseudo}")
        self.n_pseudo, self.input_dim = int(n_pseudo), int(input_dim)
        gen = numpy.random.default_rng(rng)
        self._add_param("pseudo", 0.05 + 0.01 * gen.standard_normal((self.n_pseudo, self.input_dim)))

    # -- the pseudo-inputs ---------------------------------------------------------------------
    def pseudo_inputs(self):
        """u = clip(pseudo, 0, 1): (K, D)."""
        return self.xp.clip(self.params["pseudo"], 0.0, 1.0)

    encoder_inputs = pseudo_inputs   # the components are the encoder's posterior at the pseudo-inputs

    def encoder_inputs_backward(self, du):
        """Accumulates dLoss/dpseudo = du where 0 < pseudo < 1 (the clamp passes nothing outside)."""
        p = self.params["pseudo"]
        self.grads["pseudo"] += du * ((p > 0) & (p < 1))

    # -- the density -------------------------------------------------------------------------
    def _log_components(self, z, comps):
        mu_k, log_sigma_k = comps                                   # (K, L)
        iv = self.xp.exp(-2 * log_sigma_k)                          # (K, L)
        const = (-0.5 * (mu_k * mu_k * iv).sum(axis=1) - log_sigma_k.sum(axis=1)
                 - 0.5 * z.shape[1] * _LOG_2PI)                    # (K,)
        log_n = -0.5 * ((z * z) @ iv.T) + z @ (mu_k * iv).T + const   # (N, K)
        return log_n, iv

    def log_prob(self, z, comps):
        """log p(z_n) (N,) for z (N, L), a numerically stable log-sum-exp over the K components."""
        log_n, _ = self._log_components(z, comps)
        m = log_n.max(axis=1, keepdims=True)                        # (N, 1)
        return (m[:, 0] + self.xp.log(self.xp.exp(log_n - m).sum(axis=1))) - math.log(self.n_pseudo)

    def responsibilities(self, z, comps):
        """p(k | z_n) (N, K): each component's share of the density at z_n (rows sum to 1)."""
        return _softmax_rows(self.xp, self._log_components(z, comps)[0])

    def log_prob_backward(self, z, comps, a):
        """``(dLoss/dz (N, L), (dLoss/dmu_k, dLoss/dlog_sigma_k) (K, L) each)`` for upstream ``a`` (N,)."""
        xp = self.xp
        mu_k, _ = comps
        log_n, iv = self._log_components(z, comps)
        w = _softmax_rows(xp, log_n)                                # (N, K) responsibilities
        w[w < xp.finfo(w.dtype).eps ** 2] = 0                       # negligible ones: exact zeros (see below)
        dz = a[:, None] * (w @ (mu_k * iv) - z * (w @ iv))          # (N, L)
        A = a[:, None] * w                                          # (N, K)
        col = A.sum(axis=0)[:, None]                                # (K, 1)
        Az, Az2 = A.T @ z, A.T @ (z * z)                            # (K, L)
        dmu_k = iv * (Az - mu_k * col)
        dlog_sigma_k = iv * (Az2 - 2 * mu_k * Az + mu_k * mu_k * col) - col
        return dz, (dmu_k, dlog_sigma_k)

    def sample(self, n, rng, comps, latent_dim, dtype):
        """z ~ p(z): a component k uniformly, then z = mu_k + exp(log_sigma_k) eps: (n, L)."""
        mu_k, log_sigma_k = comps
        # rng may be a host generator (the figures'): its draws go to the components' device
        k = self.backend.asarray(rng.integers(0, self.n_pseudo, size=int(n)))
        eps = self.backend.asarray(rng.standard_normal((int(n), mu_k.shape[1]), dtype=dtype))
        return mu_k[k] + self.xp.exp(log_sigma_k[k]) * eps

    def __repr__(self):
        return f"VampPrior(K={self.n_pseudo}, D={self.input_dim})"


def _softmax_rows(xp, log_n):
    """exp(log_n) normalized over each row, (N, K), computed from the row's maximum."""
    w = xp.exp(log_n - log_n.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return w


def make(name: str, *, input_dim: int, pseudo_inputs: int = 500, backend=None, dtype="float32", rng=None):
    """The prior called ``name`` (one of :data:`PRIORS`): a new prior is its class, its line here and its name
    in :mod:`scratchvae.choices`. ``pseudo_inputs`` is the VampPrior's K; ``rng`` seeds its pseudo-inputs."""
    if name == "standard":
        return StandardNormal()
    if name == "vampprior":
        return VampPrior(pseudo_inputs, input_dim, backend=backend, dtype=dtype, rng=rng)
    raise ValueError(f"unknown prior {name!r}; choose one of {PRIORS}")
