"""Adam: the plain update and the public optimizer against Algorithm 1, its dtype and
argument checks, and its values kept out of the subnormal range."""
import math

import numpy as np
import pytest

from scratchvae import kernels
from scratchvae.optim import Adam, AdamState, adam_coefficients, adam_update

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)



def _reference_adamw(theta, grad_fn, steps, lr, beta1, beta2, eps, weight_decay):
    """Algorithm 1 of Kingma & Ba with decoupled weight decay, one entry at a
    time in Python floats (float64)."""
    theta = [float(t) for t in theta]
    m = [0.0] * len(theta)
    v = [0.0] * len(theta)
    for t in range(1, steps + 1):
        g = grad_fn(np.array(theta), t)
        for i in range(len(theta)):
            m[i] = beta1 * m[i] + (1 - beta1) * g[i]
            v[i] = beta2 * v[i] + (1 - beta2) * g[i] * g[i]
            m_hat = m[i] / (1 - beta1 ** t)
            v_hat = v[i] / (1 - beta2 ** t)
            theta[i] = theta[i] - lr * m_hat / (math.sqrt(v_hat) + eps) - lr * weight_decay * theta[i]
    return np.array(theta)


def _grad_fn(target, noise):
    # gradient of a quadratic bowl plus fixed per-step noise: depends on theta
    return lambda theta, t: 2.0 * (theta - target) + noise[t - 1]


def test_adam_matches_algorithm_1_over_100_steps():
    r = np.random.default_rng(10)
    n, steps = 12, 100
    hyper = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.02)
    theta0 = r.standard_normal(n)
    target = r.standard_normal(n)
    noise = 0.3 * r.standard_normal((steps, n))
    noise[:, 0] = 0.0  # one entry whose gradient can reach ~0
    grad_fn = _grad_fn(target, noise)
    want = _reference_adamw(theta0, grad_fn, steps, **hyper)

    param = theta0.copy()
    m, v = np.zeros(n), np.zeros(n)
    for t in range(1, steps + 1):
        assert adam_update(param, grad_fn(param, t), m, v, step=t, **hyper) is None
    np.testing.assert_allclose(param, want, rtol=1e-12, atol=1e-14)

    # float32 follows the same trajectory to float32 accuracy, in float32
    p32 = theta0.astype(np.float32)
    m32, v32 = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for t in range(1, steps + 1):
        adam_update(p32, grad_fn(p32, t).astype(np.float32), m32, v32, step=t, **hyper)
    assert p32.dtype == np.float32
    np.testing.assert_allclose(p32, want, rtol=1e-4, atol=1e-4)


def test_adam_weight_decay_uses_the_old_param():
    # with a zero gradient the moments stay 0 and only the decay acts
    p = np.array([1.0, -2.0])
    adam_update(p, np.zeros(2), np.zeros(2), np.zeros(2), lr=0.1, beta1=0.9, beta2=0.999,
                       eps=1e-8, weight_decay=0.5, step=1)
    np.testing.assert_allclose(p, [1.0 - 0.1 * 0.5 * 1.0, -2.0 + 0.1 * 0.5 * 2.0], rtol=1e-15)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_adam_step_follows_algorithm_1_for_100_steps(fused):
    r = np.random.default_rng(3)
    steps, hyper = 100, dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.02)
    theta0 = {"W": r.standard_normal((3, 4)), "b": r.standard_normal(4)}
    targets = {k: r.standard_normal(v.shape) for k, v in theta0.items()}
    noise = {k: 0.3 * r.standard_normal((steps, v.size)) for k, v in theta0.items()}
    fns = {k: _grad_fn(targets[k].ravel(), noise[k]) for k in theta0}
    want = {k: _reference_adamw(theta0[k].ravel(), fns[k], steps, **hyper).reshape(theta0[k].shape) for k in theta0}

    opt = Adam(lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
               weight_decay=hyper["weight_decay"], fused=fused)
    params = {k: v.copy() for k, v in theta0.items()}
    state = opt.init(params)
    assert state.step == 0 and all(not m.any() for m in state.m.values())
    for t in range(1, steps + 1):
        grads = {k: fns[k](params[k].ravel(), t).reshape(params[k].shape) for k in params}
        state = opt.step(params, grads, state)
    assert state.step == steps
    for k in params:
        np.testing.assert_allclose(params[k], want[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_normalize_grads_is_adam_on_each_gradient_over_its_norm(fused):
    # the VampPrior code's AdamNormGrad: g / (||g||_2 + 1e-7) per tensor, then Algorithm 1
    r = np.random.default_rng(5)
    steps, hyper = 60, dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
    theta0 = {"W": r.standard_normal((3, 4)), "b": r.standard_normal(4)}
    noise = {k: 2.0 * r.standard_normal((steps, v.size)) for k, v in theta0.items()}
    fns = {k: _grad_fn(r.standard_normal(v.size), noise[k]) for k, v in theta0.items()}

    def unit(fn, scale):
        def g(theta, t):
            raw = scale * fn(theta, t)
            return raw / (math.sqrt(sum(float(x) * float(x) for x in raw)) + 1e-7)
        return g

    def reference(scale, normalize=True):
        return {k: _reference_adamw(theta0[k].ravel(), unit(fns[k], scale) if normalize else fns[k], steps,
                                    **hyper).reshape(theta0[k].shape) for k in theta0}
    plain, wants = reference(1.0, normalize=False), {s: reference(s) for s in (1.0, 1e3)}
    for k in theta0:
        assert np.abs(wants[1.0][k] - plain[k]).max() > 1e-3             # the variant is not plain Adam
        np.testing.assert_allclose(wants[1e3][k], wants[1.0][k], rtol=1e-6)   # nor depends on the loss's scale

    for scale, want in wants.items():
        opt = Adam(lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"], fused=fused,
                   normalize_grads=True)
        params = {k: v.copy() for k, v in theta0.items()}
        state = opt.init(params)
        for t in range(1, steps + 1):
            grads = {k: scale * fns[k](params[k].ravel(), t).reshape(params[k].shape) for k in params}
            before = {k: g.copy() for k, g in grads.items()}
            state = opt.step(params, grads, state)
            assert all(np.array_equal(grads[k], before[k]) for k in grads)   # the caller's gradients stay
        for k in params:
            np.testing.assert_allclose(params[k], want[k], rtol=1e-9, atol=1e-11)


def test_adam_state_is_plain_arrays_that_restore_exactly():
    params = {"W": np.ones((2, 2), np.float32)}
    grads = {"W": np.full((2, 2), 0.5, np.float32)}
    opt = Adam()
    state = opt.step(params, grads, opt.init(params))
    assert isinstance(state.m["W"], np.ndarray) and state.m["W"].dtype == np.float32
    copy = AdamState(step=state.step, m={"W": state.m["W"].copy()}, v={"W": state.v["W"].copy()})
    p1, p2 = {"W": params["W"].copy()}, {"W": params["W"].copy()}
    opt.step(p1, grads, state)
    opt.step(p2, grads, copy)
    np.testing.assert_array_equal(p1["W"], p2["W"])


def test_adam_rejects_bad_hyperparameters_and_mismatched_keys():
    with pytest.raises(ValueError, match="betas"):
        Adam(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        Adam(lr=0.0)
    opt = Adam()
    params = {"W": np.ones(2, np.float32)}
    with pytest.raises(KeyError, match="missing in grads"):
        opt.step(params, {}, opt.init(params))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_keeps_dtype_and_checks_its_arguments(dtype):
    r = np.random.default_rng(0)
    p, g, m, v = (r.standard_normal(5).astype(dtype) for _ in range(4))
    v = np.abs(v)
    adam_update(p, g, m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3)
    assert p.dtype == m.dtype == v.dtype == dtype
    a = np.zeros((2, 3))
    with pytest.raises(ValueError, match="step"):
        adam_update(a, a, a.copy(), a.copy(), step=0, **HYPER)
    with pytest.raises(TypeError, match="one dtype"):
        adam_update(a, a.astype(np.float32), a.copy(), a.copy(), step=1, **HYPER)
    with pytest.raises(ValueError, match="grad has shape"):
        adam_update(a, a[0], a.copy(), a.copy(), step=1, **HYPER)


# -- subnormal numbers: a run's Adam step must not slow down as its moments decay ----------------

def _subnormal(a):
    tiny = np.finfo(a.dtype).tiny
    return int(((a != 0) & (np.abs(a) < tiny)).sum())


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_decaying_moments_never_become_subnormal(fused, dtype):
    """Gradients go to exactly zero (a blank border pixel, a dead unit) after a few steps: without
    the floors the moments would decay through the subnormal range (0.9**t reaches it after ~830
    steps in float32); the planted tiny gradients would put (1 - beta2) g**2 there at once."""
    n, tiny = 64, np.finfo(dtype).tiny
    r = np.random.default_rng(1)
    params = {"w": r.standard_normal(n).astype(dtype)}
    opt = Adam(lr=1e-3, fused=fused)
    state = opt.init(params)
    # start from moments just above the smallest normal numbers, as after many steps of decay
    state.m["w"][...] = (tiny * 2.0 ** np.arange(n) * 1e-3 * np.where(np.arange(n) % 2, 1, -1)).astype(dtype)
    state.v["w"][...] = np.abs(state.m["w"]) * 3
    planted = np.zeros(n, dtype)
    planted[::4] = tiny * 16          # small enough that g**2 underflows
    planted[1::4] = np.sqrt(tiny)     # (1 - beta2) g**2 would be subnormal
    seen = 0
    for step in range(1, 301):
        grads = {"w": planted if step % 2 else np.zeros(n, dtype)}
        state = opt.step(params, grads, state)
        seen = max(seen, _subnormal(state.m["w"]), _subnormal(state.v["w"]), _subnormal(params["w"]))
    assert seen == 0
    assert np.isfinite(params["w"]).all()


def test_the_floors_are_far_below_anything_that_moves_a_parameter():
    for dtype in (np.float32, np.float64):
        *_, eps_hat, wd, grad_floor, moment_floor = adam_coefficients(dtype, step=1, **HYPER)
        tiny = float(np.finfo(dtype).tiny)
        assert tiny < moment_floor < 1e-28 and grad_floor < 1e-16
        # the smallest kept first moment and second moment are normal after one more decay
        assert 0.9 * moment_floor > tiny and 0.999 * moment_floor > tiny
        assert (1 - 0.999) * float(grad_floor) ** 2 > tiny and (1 - 0.9) * float(grad_floor) > tiny
        # a moment at the floor moves a parameter by lr * m / eps: nothing float32 can represent beside 1
        assert 1e-3 * moment_floor / 1e-8 < 1e-20


def test_fused_and_plain_agree_with_the_floors_in_play():
    r = np.random.default_rng(2)
    tiny = np.finfo(np.float32).tiny
    shape = (200,)
    base = [r.standard_normal(shape).astype(np.float32) for _ in range(4)]
    base[1][::3] = tiny * 4
    base[2][::5] = tiny * 2.0 ** 20
    base[3] = np.abs(base[3])
    base[3][::7] = tiny * 2.0 ** 23
    plain = [a.copy() for a in base]
    fused = [a.copy() for a in base]
    for step in (1, 2, 3):
        adam_update(*plain, step=step, **HYPER)
        kernels.adam_update(*fused, step=step, **HYPER)
    for a, b in zip(plain, fused):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=0)
        assert ((a == 0) == (b == 0)).all()
    assert math.isfinite(float(plain[0].sum()))
