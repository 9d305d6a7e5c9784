"""Tests of the plain loss functions in scratchvae.losses (the ground truth).

* gradients: central finite differences in float64 with random upstream
  weights (max relative error <= 1e-6);
* numerics: extreme logits, log_sigma in [-20, 20] against a 50-digit
  decimal reference, KL against a Monte Carlo estimate, z's variance;
"""
from __future__ import annotations

import decimal
import math

import numpy as np
import pytest

from scratchvae import losses
from scratchvae.gradcheck import numerical_gradient, rel_error

TOL = 1e-6
H = 1e-5


def rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------
# gradient checks (float64)
# ----------------------------------------------------------------------------

def test_bce_gradient():
    r = rng(1)
    logits = 3 * r.standard_normal((4, 7))
    x = r.random((4, 7))
    w = r.standard_normal(4)  # upstream weights of the per-example nll
    _, dlogits = losses.bce_with_logits(logits, x)
    numeric = numerical_gradient(lambda: losses.bce_with_logits(logits, x)[0], logits, w, H)
    assert rel_error(w[:, None] * dlogits, numeric) <= TOL
    # scale multiplies the gradient of the (unweighted) sum
    _, scaled = losses.bce_with_logits(logits, x, scale=0.37)
    numeric = numerical_gradient(lambda: losses.bce_with_logits(logits, x)[0], logits, np.full(4, 0.37), H)
    assert rel_error(scaled, numeric) <= TOL


@pytest.mark.parametrize("shared", [False, True], ids=["per-pixel", "shared"])
def test_gaussian_gradients(shared):
    r = rng(2)
    B, D = 5, 6
    mean = r.standard_normal((B, D))
    x = r.standard_normal((B, D))
    log_sigma = 0.5 * r.standard_normal(1 if shared else D)
    w = r.standard_normal(B)

    def nll():
        return losses.gaussian_nll(mean, x, log_sigma)[0]

    _, dmean, _ = losses.gaussian_nll(mean, x, log_sigma)
    assert rel_error(w[:, None] * dmean, numerical_gradient(nll, mean, w, H)) <= TOL
    # log_sigma's gradient is a sum over the batch: check it with uniform
    # upstream weights equal to `scale`
    scale = 0.3
    _, dmean_s, dls = losses.gaussian_nll(mean, x, log_sigma, scale=scale)
    assert dls.shape == log_sigma.shape
    up = np.full(B, scale)
    assert rel_error(dls, numerical_gradient(nll, log_sigma, up, H)) <= TOL
    assert rel_error(dmean_s, numerical_gradient(nll, mean, up, H)) <= TOL


def test_reparameterize_gradients():
    r = rng(3)
    B, L = 4, 5
    mu = r.standard_normal((B, L))
    log_sigma = r.uniform(-2, 2, (B, L))
    eps = r.standard_normal((B, L))
    dz = r.standard_normal((B, L))
    kl_weight = np.array([0.7, 0.0, 1.3, 0.25, 2.0])  # one dimension held at a free-bits floor

    def loss():  # a scalar: <dz, z> + sum_l kl_weight[l] sum_b kl[b, l]
        z, kl = losses.reparameterize_kl(mu, log_sigma, eps)
        return np.sum(dz * z) + np.sum(kl_weight * kl)

    dmu, dls = losses.reparameterize_kl_backward(dz, mu, log_sigma, eps, kl_weight)
    assert rel_error(dmu, numerical_gradient(loss, mu, None, H)) <= TOL
    assert rel_error(dls, numerical_gradient(loss, log_sigma, None, H)) <= TOL
    # the forward outputs separately, with random upstream weights
    wz, wk = r.standard_normal((B, L)), r.standard_normal((B, L))
    num_z = numerical_gradient(lambda: losses.reparameterize_kl(mu, log_sigma, eps)[0], log_sigma, wz, H)
    assert rel_error(wz * np.exp(log_sigma) * eps, num_z) <= TOL
    num_kl = numerical_gradient(lambda: losses.reparameterize_kl(mu, log_sigma, eps)[1], mu, wk, H)
    assert rel_error(wk * mu, num_kl) <= TOL


def test_kl_weight_scalar_broadcasts():
    r = rng(4)
    args = [r.standard_normal((3, 4)) for _ in range(4)]
    a = losses.reparameterize_kl_backward(*args, 0.5)
    b = losses.reparameterize_kl_backward(*args, np.full(4, 0.5))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    with pytest.raises(ValueError, match="kl_weight"):
        losses.reparameterize_kl_backward(*args, np.ones(3))


# ----------------------------------------------------------------------------
# numerics
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bce_extreme_logits(dtype):
    logits = np.array([[1e4, -1e4, 1e4, -1e4]], dtype)
    x = np.array([[0, 0, 1, 1]], dtype)
    nll, dlogits = losses.bce_with_logits(logits, x)
    assert nll.dtype == dtype and dlogits.dtype == dtype
    assert np.all(np.isfinite(nll)) and np.all(np.isfinite(dlogits))
    assert nll[0] == 2e4  # 1e4 + 0 + 0 + 1e4: exact
    for i, want in enumerate([1e4, 0.0, 0.0, 1e4]):  # one entry at a time
        single, _ = losses.bce_with_logits(logits[:, i:i + 1], x[:, i:i + 1])
        assert single[0] == dtype(want)
    np.testing.assert_array_equal(dlogits, np.array([[1, 0, 0, -1]], dtype))


def test_bce_matches_longdouble_reference():
    r = rng(5)
    logits = np.concatenate([np.linspace(-50, 50, 101), 5 * r.standard_normal(99)]).reshape(4, 50)
    x = r.random((4, 50))
    nll, dlogits = losses.bce_with_logits(logits, x)
    lg, xl = logits.astype(np.longdouble), x.astype(np.longdouble)
    terms = np.logaddexp(np.longdouble(0), lg) - lg * xl  # softplus(l) - l x
    ref = terms.sum(axis=1)
    # the terms are >= 0; allow a few ulps of each |term| plus of |l x| (the cancellation)
    bound = 8 * np.finfo(np.float64).eps * (np.abs(terms) + np.abs(lg * xl)).sum(axis=1)
    assert np.all(np.abs(nll - ref) <= bound)
    sig = 1 / (1 + np.exp(-lg))
    np.testing.assert_allclose(dlogits, (sig - xl).astype(np.float64), rtol=1e-12, atol=1e-15)
    # with x = 0 the gradient is the sigmoid itself: relative accuracy even far in the tails
    tails = np.array([[-700.0, -100.0, -30.0, 0.0, 30.0, 700.0]])
    _, g = losses.bce_with_logits(tails, np.zeros_like(tails))
    want = (1 / (1 + np.exp(-tails.astype(np.longdouble)))).astype(np.float64)
    np.testing.assert_allclose(g, want, rtol=4e-16)


def _decimal_kl(mu, ls):
    """0.5 (mu**2 + exp(2 ls) - 1) - ls with 50 significant digits."""
    with decimal.localcontext() as ctx:
        ctx.prec = 50
        m, g = decimal.Decimal(float(mu)), decimal.Decimal(float(ls))
        return float(decimal.Decimal("0.5") * (m * m + (2 * g).exp() - 1) - g)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kl_accuracy_over_log_sigma_range(dtype):
    small = np.array([1e-12, 1e-8, 1e-5, 1e-3, 0.1, 0.24, 0.26, 0.49, 0.5, 0.51, 1.0])
    ls = np.concatenate([np.linspace(-20, 20, 161), small, -small, [0.0]]).astype(dtype)
    for mu_value in (0.0, 0.3, -2.5):
        mu = np.full((1, ls.size), mu_value, dtype)
        z, kl = losses.reparameterize_kl(mu, ls[None, :], np.zeros_like(mu))
        assert kl.dtype == dtype and np.all(np.isfinite(kl)) and np.all(kl >= 0)
        ref = np.array([_decimal_kl(m, g) for m, g in zip(mu[0], ls)])
        rtol = 8 * np.finfo(dtype).eps
        bad = np.abs(kl[0] - ref) > rtol * np.abs(ref) + (ref == 0) * 1e-300
        assert not bad.any(), (ls[bad], kl[0][bad], ref[bad])
        np.testing.assert_array_equal(z, mu)  # eps = 0


def test_kl_matches_monte_carlo():
    r = rng(6)
    mu = np.array([0.0, 1.5, -0.7, 0.2])
    log_sigma = np.array([0.0, -1.0, 0.8, -0.3])
    n = 200_000
    eps = r.standard_normal((n, 4))
    z, _ = losses.reparameterize_kl(np.broadcast_to(mu, (n, 4)).copy(),
                                    np.broadcast_to(log_sigma, (n, 4)).copy(), eps)
    # log q(z) - log p(z); the 0.5 log(2 pi) constants cancel
    log_ratio = (-log_sigma - 0.5 * eps ** 2) - (-0.5 * z ** 2)
    mc = log_ratio.mean(axis=0)
    se = log_ratio.std(axis=0, ddof=1) / math.sqrt(n)
    _, kl = losses.reparameterize_kl(mu[None], log_sigma[None], np.zeros((1, 4)))
    # (the first dimension is q = p: the log ratio is 0 for every sample)
    assert np.all(np.abs(mc - kl[0]) <= 5 * se + 1e-12), (mc, kl[0], se)


def test_z_has_the_posterior_mean_and_variance():
    r = rng(7)
    n = 200_000
    mu = np.array([0.5, -1.0, 2.0])
    log_sigma = np.array([-1.5, 0.0, 0.7])
    eps = r.standard_normal((n, 3))
    z, _ = losses.reparameterize_kl(np.broadcast_to(mu, (n, 3)).copy(),
                                    np.broadcast_to(log_sigma, (n, 3)).copy(), eps)
    var = np.exp(2 * log_sigma)
    # standard errors: sqrt(var / n) for the mean, var * sqrt(2 / (n - 1)) for the variance
    assert np.all(np.abs(z.mean(axis=0) - mu) < 5 * np.sqrt(var / n))
    assert np.all(np.abs(z.var(axis=0, ddof=1) - var) < 5 * var * math.sqrt(2 / (n - 1)))


@pytest.mark.parametrize("shared", [False, True], ids=["per-pixel", "shared"])
def test_gaussian_nll_is_minus_the_normal_log_pdf(shared):
    r = rng(8)
    B, D = 3, 10
    mean = r.standard_normal((B, D))
    x = r.standard_normal((B, D))
    log_sigma = r.uniform(-3, 3, 1 if shared else D)
    nll, dmean, dls = losses.gaussian_nll(mean, x, log_sigma)
    sigma = np.exp(log_sigma)
    log_pdf = -0.5 * np.log(2 * np.pi * sigma ** 2) - (x - mean) ** 2 / (2 * sigma ** 2)
    np.testing.assert_allclose(nll, -log_pdf.sum(axis=1), rtol=1e-13)
    np.testing.assert_allclose(dmean, (mean - x) / sigma ** 2, rtol=1e-13)
    g = 1 - (x - mean) ** 2 / sigma ** 2
    np.testing.assert_allclose(dls, g.sum() if shared else g.sum(axis=0), rtol=1e-12)


# ----------------------------------------------------------------------------
# dtypes and validation
# ----------------------------------------------------------------------------

def test_float32_stays_float32():
    r = rng(9)
    f = np.float32
    a, b = (r.standard_normal((3, 4)).astype(f) for _ in range(2))
    outs = [*losses.bce_with_logits(a, b, scale=np.float64(0.5)),
            *losses.gaussian_nll(a, b, np.zeros(4, f), scale=0.5),
            *losses.gaussian_nll(a, b, np.zeros(1, f)),
            *losses.reparameterize_kl(a, b, a),
            *losses.reparameterize_kl_backward(a, b, a, b, np.ones(4)),  # float64 weights are cast
            losses.expm1_minus_x(a)]
    assert all(o.dtype == f for o in outs), [o.dtype for o in outs]


def test_validation_errors():
    a = np.zeros((2, 3))
    with pytest.raises(TypeError, match="dtype"):
        losses.bce_with_logits(a, a.astype(np.float32))
    with pytest.raises(TypeError, match="floating"):
        losses.bce_with_logits(a, a.astype(np.int64))
    with pytest.raises(ValueError, match="shape"):
        losses.bce_with_logits(a, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="2-D"):
        losses.reparameterize_kl(a[0], a[0], a[0])
    with pytest.raises(ValueError, match="log_sigma"):
        losses.gaussian_nll(a, a, np.zeros(2))


