"""The public optimizer: Adam(...).init / .step against Algorithm 1."""
import numpy as np
import pytest
from test_losses import _grad_fn, _reference_adamw

from scratchvae.optim import Adam


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
    assert state["step"] == 0 and all(not m.any() for m in state["m"].values())
    for t in range(1, steps + 1):
        grads = {k: fns[k](params[k].ravel(), t).reshape(params[k].shape) for k in params}
        state = opt.step(params, grads, state)
    assert state["step"] == steps
    for k in params:
        np.testing.assert_allclose(params[k], want[k], rtol=1e-12, atol=1e-14)


def test_adam_state_is_plain_arrays_that_restore_exactly():
    params = {"W": np.ones((2, 2), np.float32)}
    grads = {"W": np.full((2, 2), 0.5, np.float32)}
    opt = Adam()
    state = opt.step(params, grads, opt.init(params))
    assert isinstance(state["m"]["W"], np.ndarray) and state["m"]["W"].dtype == np.float32
    copy = {"step": state["step"], "m": {"W": state["m"]["W"].copy()}, "v": {"W": state["v"]["W"].copy()}}
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
