"""GatedDense and the hard clamp: float64 gradient checks against central finite differences."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchvae import gradcheck
from scratchvae.layers import Clamp, GatedDense
from scratchvae.layers.gated import gated_forward

F64 = dict(dtype="float64")
TOL = 1e-6


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 5), d_in=st.integers(1, 9), d_out=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_gated_dense_gradcheck(batch, d_in, d_out, seed):
    rng = np.random.default_rng(seed)
    layer = GatedDense(d_in, d_out, rng=seed, **F64)
    report = gradcheck.check_layer(layer, rng.standard_normal((batch, d_in)), seed=seed)
    assert report.max_error <= TOL, str(report)
    assert set(report.errors) >= {"x", "W", "b", "V", "c"}


def test_gated_dense_is_the_signal_times_the_gate():
    rng = np.random.default_rng(0)
    x, W, V = rng.standard_normal((3, 4)), rng.standard_normal((4, 2)), rng.standard_normal((4, 2))
    b, c = rng.standard_normal(2), rng.standard_normal(2)
    h, _ = gated_forward(x, W, b, V, c)
    np.testing.assert_allclose(h, (x @ W + b) / (1 + np.exp(-(x @ V + c))), rtol=1e-14)


def test_gated_dense_without_input_gradient_and_bad_sizes():
    layer = GatedDense(3, 2, rng=0, **F64)
    layer.input_grad = False
    layer.forward(np.ones((2, 3)))
    assert layer.backward(np.ones((2, 2))) is None and np.abs(layer.grads["V"]).sum() > 0
    with pytest.raises(ValueError, match="GatedDense"):
        GatedDense(0, 2)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 6), d_in=st.integers(1, 9), d_out=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_fused_gated_dense_gradcheck_and_agreement_with_the_array_code(batch, d_in, d_out, seed):
    """fused=True: the elementwise lines as Numba passes; float64 gradients against finite differences, and
    the same numbers as the array code (forward to rounding: Numba's exp; backward bit for bit)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, d_in))
    dh = rng.standard_normal((batch, d_out))
    fused = GatedDense(d_in, d_out, rng=seed, fused=True, **F64)
    report = gradcheck.check_layer(fused, x, seed=seed)   # the plain layer's gradcheck inputs
    x = 4 * x                                             # the agreement below: gates from near 0 to near 1
    assert report.max_error <= TOL, str(report)
    for dtype, rtol in (("float64", 1e-14), ("float32", 1e-6)):
        layers = [GatedDense(d_in, d_out, rng=seed, fused=f, dtype=dtype) for f in (False, True)]
        (h0, h1), grads = [lay.forward(x.astype(dtype)) for lay in layers], []
        np.testing.assert_allclose(h1, h0, rtol=rtol, atol=rtol)
        for lay in layers:
            lay.backward(dh.astype(dtype))
            grads.append(lay.grads)
        for name in ("W", "b", "V", "c"):
            np.testing.assert_allclose(grads[1][name], grads[0][name], rtol=10 * rtol, atol=10 * rtol)
    # given the same cache, the backward pass is the array code's, bit for bit
    from scratchvae import fused as fused_mod
    from scratchvae.layers.gated import gated_backward
    _, cache = gated_forward(x, *(fused.params[k] for k in ("W", "b", "V", "c")))
    plain, kernel = gated_backward(dh, cache), gated_backward(dh, cache, kernels=fused_mod.kernels())
    for p, k in zip(plain, kernel):
        np.testing.assert_array_equal(k, p)


def test_gated_kernels_refuse_bad_arrays():
    from scratchvae import fused as fused_mod
    k = fused_mod.kernels()
    a, b = np.ones((2, 3)), np.ones(3)
    with pytest.raises(ValueError, match=r"gated_forward: c is float64 \(4,\), expected float64 \(3,\)"):
        k.gated_forward(a, a.copy(), b, np.ones(4))
    with pytest.raises(ValueError, match="must be C-contiguous"):
        k.gated_forward(np.ones((3, 2)).T, a.copy(), b, b)
    with pytest.raises(ValueError, match="gated_backward: g is float32"):
        k.gated_backward(a, a, a.astype(np.float32))
    with pytest.raises(TypeError, match="must be a NumPy array"):
        k.gated_backward([[1.0]], a, a)


@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=2, max_size=3), seed=st.integers(0, 2**16))
def test_clamp_gradcheck_away_from_its_kinks(shape, seed):
    x = 3 * np.random.default_rng(seed).standard_normal(shape)
    x = np.where(np.abs(x + 3) < 0.05, x + 0.1, x)            # away from the kinks at -3 and 1
    x = np.where(np.abs(x - 1) < 0.05, x + 0.1, x)
    report = gradcheck.check_layer(Clamp(-3.0, 1.0, **F64), x, seed=seed)
    assert report.max_error <= TOL, str(report)


def test_clamp_passes_the_gradient_inside_only():
    layer = Clamp(-3.0, 1.0, **F64)
    y = layer.forward(np.array([[-5.0, -3.0, 0.0, 1.0, 2.0]]))
    np.testing.assert_array_equal(y, [[-3.0, -3.0, 0.0, 1.0, 1.0]])
    np.testing.assert_array_equal(layer.backward(np.full((1, 5), 2.0)), [[0.0, 0.0, 2.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="low must be below high"):
        Clamp(1.0, 1.0)


FUSED = [False, True]


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_gated_vae_whole_loss_gradcheck_with_a_clamped_dimension(likelihood, fused):
    from test_vae import binary_batch, check_model

    from scratchvae.models import gated_vae
    model = gated_vae(input_dim=7, hidden=(6, 5), latent_dim=3, likelihood=likelihood, dtype="float64", seed=3,
                      fused=fused)
    model.params["log_sigma.0.b"][0] = 1.6          # dimension 0 above the clamp (log_sigma <= 1): no gradient
    model.params["log_sigma.0.b"][1] = -3.7         # dimension 1 below it (log_sigma >= -3)
    x = binary_batch(5, 7, 0)
    if likelihood == "gaussian":
        x = x * 0.8 + 0.1 * np.random.default_rng(1).random(x.shape)
    eps = np.random.default_rng(2).standard_normal((5, 3))
    report = check_model(model, x, eps, beta=0.7)
    assert set(report.errors) == set(model.params)
    assert report.max_error <= TOL, str(report)
    _, log_sigma = model.encode(x)
    assert (log_sigma[:, 0] == 1.0).all() and (log_sigma[:, 1] == -3.0).all()
    assert np.all(model.grads["log_sigma.0.b"][:2] == 0)     # the clamp passes no gradient there


def test_gated_arch_trains_from_the_command_line(tmp_path, capsys):
    from scratchvae.cli import main
    out = tmp_path / "run"
    assert main(["--arch", "gated", "--hidden", "16,12", "--latent-dim", "4", "--limit", "256", "--test-limit",
                 "64", "--batch-size", "64", "--epochs", "1", "--no-figures", "--out", str(out)]) == 0
    assert main(["--arch", "gated", "--activation", "tanh", "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert "error: --arch gated" in err and "--activation" in err


@pytest.mark.parametrize("layer", ["dense", "gated"])
def test_he_init_draws_weights_of_variance_two_over_fan_in_and_leaves_the_biases_uniform(layer):
    from scratchvae.layers import Dense, GatedDense
    make = {"dense": Dense, "gated": GatedDense}[layer]
    he, uniform = (make(400, 300, rng=0, dtype="float64", init=init) for init in ("he", "uniform"))
    for name, p in he.params.items():
        if p.ndim == 2:   # the weights: N(0, 2/400), std 0.0707 (the uniform's is 1/sqrt(3 * 400) = 0.0289)
            assert abs(p.std() / math.sqrt(2 / 400) - 1) < 0.01 and abs(p.mean()) < 1e-3, name
            assert abs(uniform.params[name].std() / math.sqrt(1 / 1200) - 1) < 0.01, name
        else:             # the biases: U(-1/20, 1/20) either way
            assert np.abs(p).max() <= 0.05 and abs(p.std() / math.sqrt(1 / 1200) - 1) < 0.15, name
    with pytest.raises(ValueError, match="init must be one of"):
        make(4, 3, rng=0, init="xavier")
