"""MaxPool2d and Upsample2d: float64 gradient checks, PyTorch's semantics, ties, bad arguments."""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from scratchvae import gradcheck
from scratchvae.layers import MaxPool2d, Upsample2d

F64 = dict(dtype="float64")
TOL = 1e-6


def distinct(shape, seed):
    """Inputs whose entries differ by at least 0.01: no window has a near-tie, so the max is
    differentiable at the point and the finite differences do not cross a kink."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    return (rng.permutation(n) * 0.01 + rng.uniform(0, 0.001, n)).reshape(shape) - n * 0.005


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 2), channels=st.integers(1, 3), h=st.integers(2, 7), w=st.integers(2, 7),
       k=st.integers(1, 3), stride=st.integers(1, 3), pad=st.integers(0, 1), seed=st.integers(0, 2 ** 16))
def test_maxpool_gradcheck(batch, channels, h, w, k, stride, pad, seed):
    assume(pad <= k // 2 and h + 2 * pad >= k and w + 2 * pad >= k)
    layer = MaxPool2d(k, stride=stride, padding=pad, **F64)
    report = gradcheck.check_layer(layer, distinct((batch, channels, h, w), seed), seed=seed)
    assert report.passed(TOL), str(report)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@settings(max_examples=15, deadline=None)
@given(h=st.integers(1, 5), w=st.integers(1, 5), scale=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
def test_upsample_gradcheck(mode, h, w, scale, seed):
    """Random upstream gradients in [0.5, 1.5]: every input-gradient entry is a sum of non-negative
    interpolation weights times them, so none cancels to ~0, where the relative error of a correct
    entry would measure only the difference quotient's rounding (about 1e-11 absolute)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, h, w))
    layer = Upsample2d(scale, mode=mode, **F64)
    dy = rng.uniform(0.5, 1.5, (2, 3, h * scale, w * scale))
    report = gradcheck.check_layer(layer, x, dy, seed=seed)
    assert report.passed(TOL), str(report)
    # and the backward pass is the exact adjoint: <up(x), g> = <x, up^T(g)> for any g
    g = rng.standard_normal(dy.shape)
    y = layer.forward(x)
    np.testing.assert_allclose(np.sum(y * g), np.sum(x * layer.backward(g)), rtol=1e-12, atol=1e-12)


def test_maxpool_known_values_and_deterministic_ties():
    x = np.array([[[[1.0, 3.0, 2.0, 0.0],
                    [4.0, 3.0, 5.0, 5.0],
                    [0.0, 0.0, 1.0, 1.0],
                    [0.0, 0.0, 1.0, 1.0]]]])
    layer = MaxPool2d(2, **F64)
    np.testing.assert_array_equal(layer.forward(x), [[[[4.0, 5.0], [0.0, 1.0]]]])
    dx = layer.backward(np.ones((1, 1, 2, 2)))
    # ties (the 5s, the 0s, the 1s): the first in row-major window order gets the gradient
    np.testing.assert_array_equal(dx, [[[[0, 0, 0, 0], [1, 0, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]]]])


def test_upsample_known_values():
    x = np.array([[[[1.0, 2.0]]]])
    np.testing.assert_array_equal(Upsample2d(2, **F64).forward(x), [[[[1, 1, 2, 2], [1, 1, 2, 2]]]])
    # PyTorch, align_corners=False: columns at source coordinates -0.25 (clamped to 0), 0.25, 0.75, 1.25
    np.testing.assert_allclose(Upsample2d(2, mode="bilinear", **F64).forward(x)[0, 0, 0], [1.0, 1.25, 1.75, 2.0])


def test_same_as_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = distinct((2, 3, 7, 6), 1)
    for k, s, p in [(2, None, 0), (3, 2, 1), (3, 1, 1), (2, 3, 0)]:
        want = torch.nn.functional.max_pool2d(torch.from_numpy(x), k, s, p).numpy()
        np.testing.assert_array_equal(MaxPool2d(k, stride=s, padding=p, **F64).forward(x), want)
    for mode in ("nearest", "bilinear"):
        for scale in (2, 3):
            y = rng.standard_normal((2, 3, 4, 5))
            t = torch.from_numpy(y).requires_grad_(True)
            up = torch.nn.functional.interpolate(t, scale_factor=scale, mode=mode,
                                                 **({"align_corners": False} if mode == "bilinear" else {}))
            dy = rng.standard_normal(up.shape)
            up.backward(torch.from_numpy(dy))
            layer = Upsample2d(scale, mode=mode, **F64)
            np.testing.assert_allclose(layer.forward(y), up.detach().numpy(), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(layer.backward(dy), t.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="padding"):
        MaxPool2d(2, padding=2, **F64).forward(np.zeros((1, 1, 4, 4)))
    with pytest.raises(ValueError, match="does not fit"):
        MaxPool2d(3, **F64).forward(np.zeros((1, 1, 2, 2)))
    with pytest.raises(ValueError, match="scale_factor"):
        Upsample2d(1.5)
    with pytest.raises(ValueError, match="mode"):
        Upsample2d(2, mode="bicubic")
    with pytest.raises(ValueError, match="shape"):
        MaxPool2d(2, **F64).forward(np.zeros((4, 4)))


@pytest.mark.parametrize("make", [lambda lay: MaxPool2d(3, stride=2, padding=1, layout=lay, **F64),
                                  lambda lay: Upsample2d(2, mode="bilinear", layout=lay, **F64)],
                         ids=["maxpool", "upsample"])
def test_chwb_layout_is_the_nchw_layer_transposed(make):
    x = distinct((2, 3, 6, 5), 4)
    nchw, chwb = make("NCHW"), make("CHWB")
    y = nchw.forward(x)
    y_t = chwb.forward(np.ascontiguousarray(x.transpose(1, 2, 3, 0)))
    np.testing.assert_array_equal(y_t, y.transpose(1, 2, 3, 0))
    dy = np.random.default_rng(0).uniform(0.5, 1.5, y.shape)
    np.testing.assert_allclose(chwb.backward(np.ascontiguousarray(dy.transpose(1, 2, 3, 0))),
                               nchw.backward(dy).transpose(1, 2, 3, 0), rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="layout"):
        make("NHWC")
