"""Dense, activation, shape and container layers: gradients and contracts.

Every gradient check runs in float64 against central finite differences, with
a random upstream gradient and inputs kept away from kinks.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchvae import gradcheck
from scratchvae.layers import Dense, Flatten, LeakyReLU, ReLU, Reshape, Sequential, Sigmoid, Softplus, Tanh

F64 = dict(dtype="float64")
TOL = 1e-6


def away_from_zero(x, margin=0.05):
    """Push entries at least ``margin`` away from 0 (the kink of ReLU and LeakyReLU)."""
    return np.where(x >= 0, x + margin, x - margin)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 5), d_in=st.integers(1, 9), d_out=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_dense_gradcheck(batch, d_in, d_out, seed):
    rng = np.random.default_rng(seed)
    layer = Dense(d_in, d_out, rng=seed, **F64)
    report = gradcheck.check_layer(layer, rng.standard_normal((batch, d_in)), seed=seed)
    assert report.max_error <= TOL, str(report)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(2, 5), d_in=st.integers(2, 9), d_out=st.integers(2, 9), seed=st.integers(0, 2**16))
def test_dense_batch_fastest_layouts_gradcheck(batch, d_in, d_out, seed):
    """order="F" stores the output batch-fastest; an input stored so (a transposed view) gets its
    gradient in the same order. Same numbers as the C-ordered layer, and every gradient checked."""
    rng = np.random.default_rng(seed)
    x_f = rng.standard_normal((d_in, batch)).T                      # (B, D_in), stored batch-fastest
    layer_f, layer_c = Dense(d_in, d_out, order="F", rng=seed, **F64), Dense(d_in, d_out, rng=seed, **F64)
    y_f, y_c = layer_f.forward(x_f), layer_c.forward(np.ascontiguousarray(x_f))
    assert y_f.flags.f_contiguous and not y_f.flags.c_contiguous
    np.testing.assert_allclose(y_f, y_c, rtol=1e-13, atol=1e-13)
    dy = rng.standard_normal(y_f.shape)
    dx_f, dx_c = layer_f.backward(dy), layer_c.backward(dy)
    assert dx_f.flags.f_contiguous and not dx_f.flags.c_contiguous and dx_c.flags.c_contiguous
    np.testing.assert_allclose(dx_f, dx_c, rtol=1e-13, atol=1e-13)
    for k in layer_f.grads:
        np.testing.assert_allclose(layer_f.grads[k], layer_c.grads[k], rtol=1e-13, atol=1e-13)
    # finite differences perturb a C-ordered input in place; the F-ordered input's gradients equal
    # the C layer's above, which test_dense_gradcheck checks
    report = gradcheck.check_layer(Dense(d_in, d_out, order="F", rng=seed, **F64), np.ascontiguousarray(x_f),
                                   seed=seed)
    assert report.max_error <= TOL, str(report)
    with pytest.raises(ValueError, match="order must be 'C' or 'F'"):
        Dense(2, 3, order="K")


@pytest.mark.parametrize("make", [ReLU, lambda **kw: LeakyReLU(0.2, **kw), Sigmoid, Tanh, Softplus],
                         ids=["relu", "leaky_relu", "sigmoid", "tanh", "softplus"])
@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=2, max_size=4), seed=st.integers(0, 2**16))
def test_activation_gradcheck(make, shape, seed):
    # |x| <= 3: deep in saturation (tanh'(9) ~ 1e-7) the difference quotient is all rounding
    x = away_from_zero(np.clip(1.5 * np.random.default_rng(seed).standard_normal(shape), -3, 3))
    report = gradcheck.check_layer(make(**F64), x, seed=seed)
    assert report.max_error <= TOL, str(report)


def test_shape_layers_gradcheck():
    x = np.random.default_rng(0).standard_normal((3, 2, 3, 4))
    assert gradcheck.check_layer(Flatten(**F64), x).max_error <= TOL
    assert gradcheck.check_layer(Reshape((2, 12), **F64), x.reshape(3, 24)).max_error <= TOL


def test_sequential_gradcheck_and_names():
    net = Sequential(Dense(6, 5, rng=1, **F64), Tanh(**F64), Dense(5, 4, rng=2, **F64), Softplus(**F64),
                     Dense(4, 3, rng=3, **F64))
    assert list(net.params) == ["0.W", "0.b", "2.W", "2.b", "4.W", "4.b"]
    assert list(net.grads) == list(net.params)
    assert net.params["2.W"] is net.layers[2].params["W"]  # the same arrays, not copies
    report = gradcheck.check_layer(net, np.random.default_rng(0).standard_normal((4, 6)))
    assert report.max_error <= TOL, str(report)


def test_nested_sequential_names():
    inner = Sequential(Dense(3, 3, rng=0), ReLU())
    outer = Sequential(Dense(2, 3, rng=1), inner)
    assert list(outer.params) == ["0.W", "0.b", "1.0.W", "1.0.b"]


def test_sigmoid_and_softplus_are_stable_at_extremes():
    x = np.array([[-1e4, -50.0, 0.0, 50.0, 1e4]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y = Sigmoid(**F64).forward(x)
        s = Softplus(**F64).forward(x)
    np.testing.assert_allclose(y, [[0.0, 1.9287498479639178e-22, 0.5, 1.0, 1.0]], rtol=1e-12)
    np.testing.assert_allclose(s, [[0.0, 1.9287498479639178e-22, np.log(2), 50.0, 1e4]], rtol=1e-12)


def test_dense_layout_and_init():
    layer = Dense(784, 400, rng=0)
    assert layer.params["W"].shape == (784, 400) and layer.params["b"].shape == (400,)
    assert layer.params["W"].dtype == np.float32
    k = 1 / np.sqrt(784)
    assert np.abs(layer.params["W"]).max() <= k and layer.params["W"].std() == pytest.approx(k / np.sqrt(3), rel=0.01)
    np.testing.assert_array_equal(Dense(784, 400, rng=0).params["W"], layer.params["W"])  # seeded
    for key in layer.params:
        assert layer.grads[key].shape == layer.params[key].shape
        assert layer.grads[key].dtype == layer.params[key].dtype


def test_dtype_by_name_or_numpy_dtype():
    assert Dense(2, 2, dtype=np.float64, rng=0).params["W"].dtype == np.float64
    with pytest.raises(TypeError, match="float32 or float64"):
        Dense(2, 2, dtype="int32")


def test_backward_accumulates_and_zero_grad_resets():
    layer = Dense(3, 2, rng=0, **F64)
    x = np.random.default_rng(1).standard_normal((4, 3))
    dy = np.random.default_rng(2).standard_normal((4, 2))
    layer.forward(x)
    layer.backward(dy)
    once = {k: g.copy() for k, g in layer.grads.items()}
    layer.backward(dy)
    for k in once:
        np.testing.assert_allclose(layer.grads[k], 2 * once[k], rtol=1e-14)
    layer.zero_grad()
    assert all(not g.any() for g in layer.grads.values())


@pytest.mark.parametrize("layer", [Dense(3, 2, rng=0, **F64), ReLU(**F64), Sequential(Dense(3, 2, rng=0, **F64), Tanh(**F64))],
                         ids=["dense", "relu", "sequential"])
def test_backward_does_not_mutate_dy(layer):
    x = np.random.default_rng(1).standard_normal((4, 3))
    y = layer.forward(x)
    dy = np.random.default_rng(2).standard_normal(y.shape)
    before = dy.copy()
    layer.backward(dy)
    np.testing.assert_array_equal(dy, before)


def test_cache_holds_one_forward_call():
    layer = Dense(3, 2, rng=0, **F64)
    x1, x2 = np.ones((5, 3)), np.full((2, 3), 2.0)
    layer.forward(x1)
    layer.forward(x2)
    dx = layer.backward(np.ones((2, 2)))  # backward matches the latest forward
    assert dx.shape == (2, 3)
    np.testing.assert_allclose(layer.grads["W"], x2.T @ np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"expected \(2, 2\)"):
        layer.backward(np.ones((5, 2)))


@pytest.mark.parametrize("layer", [Dense(3, 2), ReLU(), Sigmoid(), Flatten(), Reshape((3,)), Sequential(Dense(3, 2))],
                         ids=lambda layer: type(layer).__name__)
def test_backward_before_forward_is_a_clear_error(layer):
    with pytest.raises(RuntimeError, match="backward called before forward"):
        layer.backward(np.ones((1, 2), dtype=np.float32))


def test_wrong_shape_and_dtype_name_the_layer():
    layer = Dense(4, 2)
    with pytest.raises(ValueError, match=r"Dense: input has shape \(3, 5\), expected \(N, 4\)"):
        layer.forward(np.ones((3, 5), dtype=np.float32))
    with pytest.raises(TypeError, match="Dense: input dtype is float64, expected float32"):
        layer.forward(np.ones((3, 4)))
    with pytest.raises(TypeError, match="numpy array"):
        layer.forward([[1.0, 2.0, 3.0, 4.0]])
    with pytest.raises(ValueError, match=r"Reshape: input has shape \(2, 5\), expected \(N, 6\)"):
        Reshape((2, 3)).forward(np.ones((2, 5), dtype=np.float32))


def test_gradcheck_catches_a_wrong_gradient():
    class BrokenTanh(Tanh):
        def _backward(self, dy, cache):
            _, y = cache
            return dy * (1 - y)  # wrong: should be 1 - y**2

    x = np.random.default_rng(0).standard_normal((3, 4))
    assert gradcheck.check_layer(BrokenTanh(**F64), x).max_error > 1e-2


def test_gradcheck_refuses_float32():
    with pytest.raises(TypeError, match="float64"):
        gradcheck.check_layer(Tanh(), np.ones((2, 2), dtype=np.float32))


def test_gradcheck_report_prints_a_table():
    report = gradcheck.check_layer(Dense(2, 2, rng=0, **F64), np.ones((1, 2)))
    text = str(report)
    assert "x" in text and "W" in text and "b" in text and report.passed()


@pytest.mark.parametrize("make", [lambda **kw: Dense(3, 2, **kw), ReLU, LeakyReLU, Sigmoid, Tanh, Softplus, Flatten,
                                  lambda **kw: Reshape((3,), **kw)])
def test_every_constructor_takes_backend_dtype_and_rng(make):
    layer = make(backend="numpy", dtype=np.float64, rng=np.random.default_rng(0))
    assert layer.backend.name == "numpy" and layer.dtype == np.float64


def test_input_grad_false_skips_dx_and_keeps_param_grads():
    x = np.random.default_rng(0).standard_normal((4, 3))
    dy = np.random.default_rng(1).standard_normal((4, 2))
    full, data_layer = Dense(3, 2, rng=0, **F64), Dense(3, 2, rng=0, **F64)
    data_layer.input_grad = False
    full.forward(x)
    data_layer.forward(x)
    assert full.backward(dy) is not None and data_layer.backward(dy) is None
    for k in full.grads:
        np.testing.assert_array_equal(full.grads[k], data_layer.grads[k])
    net = Sequential(Reshape((3,), **F64), data_layer, Tanh(**F64))
    net.forward(x)
    assert net.backward(dy) is None
    bad = Sequential(Dense(3, 3, rng=1, **F64), data_layer)
    bad.forward(x)
    with pytest.raises(RuntimeError, match="input_grad=False"):
        bad.backward(dy)


# -- gradcheck catches a backward that does not accumulate -------------------------------------

class _RebindingDense(Dense):
    """A backward that rebinds grads["W"]: the values are right, but an optimizer holding the
    old array would never see them."""

    def backward(self, dy):
        dx = super().backward(dy)
        self.grads["W"] = self.grads["W"].copy()
        return dx


class _OverwritingDense(Dense):
    """A backward that assigns (=) instead of adding (+=) into grads["b"]."""

    def backward(self, dy):
        dx = super().backward(dy)
        self.grads["b"][...] = dy.sum(axis=0)
        return dx


@pytest.mark.parametrize("layer, match", [(_RebindingDense, "rebound grads\\['W'\\]"),
                                          (_OverwritingDense, "does not accumulate into grads\\['b'\\]")])
def test_check_layer_catches_gradients_that_are_not_accumulated(layer, match):
    x = np.random.default_rng(0).standard_normal((3, 4))
    with pytest.raises(AssertionError, match=match):
        gradcheck.check_layer(layer(4, 2, rng=0, **F64), x)


def test_gradcheck_report_gives_verdict_tolerance_and_worst_entry():
    layer = Dense(4, 3, rng=0, **F64)
    report = gradcheck.check_layer(layer, np.random.default_rng(1).standard_normal((2, 4)))
    text = str(report)
    assert "tolerance" in text and "PASS" in text and "FAIL" not in text and report.passed()
    assert report.worst["W"] is not None and len(report.worst["W"]) == 2
    bad = gradcheck.GradcheckReport({"W": 0.3}, worst={"W": (1, 2)})
    assert not bad.passed() and "FAIL" in str(bad) and "(1, 2)" in str(bad)
    nan = gradcheck.GradcheckReport({"W": float("nan")})
    assert not nan.passed()
    err, where = gradcheck.worst_error(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[1.0, 2.0], [3.0, 5.0]]))
    assert where == (1, 1) and err == pytest.approx(1 / 9)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_relu_is_bit_identical_including_nan_inf_and_signed_zeros(dtype):
    from scratchvae.layers import ReLU
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 5)).astype(dtype)
    x.flat[:6] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40]
    dy = rng.standard_normal(x.shape).astype(dtype)
    dy.flat[6:10] = [np.inf, -np.inf, np.nan, -0.0]
    plain, fused = ReLU(dtype=dtype), ReLU(dtype=dtype, fused=True)
    y_plain, y_fused = plain.forward(x), fused.forward(x)
    np.testing.assert_array_equal(np.signbit(y_fused), np.signbit(y_plain))
    np.testing.assert_array_equal(y_fused, y_plain)
    dx_plain, dx_fused = plain.backward(dy), fused.backward(dy)
    np.testing.assert_array_equal(np.signbit(dx_fused), np.signbit(dx_plain))
    np.testing.assert_array_equal(dx_fused, dx_plain)


def test_fused_relu_keeps_a_batch_fastest_layout_without_copies():
    """A Fortran-ordered input (a Dense with order="F" feeding ToCHWB) stays in that order, bit-identical."""
    from scratchvae.layers import ReLU
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((7, 5)).T.astype("float32"), rng.standard_normal((7, 5)).T.astype("float32")
    plain, fused = ReLU(), ReLU(fused=True)
    y = fused.forward(x)
    assert y.flags.f_contiguous and not y.flags.c_contiguous
    np.testing.assert_array_equal(y, plain.forward(x))
    dx = fused.backward(dy)
    assert dx.flags.f_contiguous
    np.testing.assert_array_equal(dx, plain.backward(dy))
    mixed = fused.backward(np.ascontiguousarray(dy))        # orders differ: computed in C order
    assert mixed.flags.c_contiguous
    np.testing.assert_array_equal(mixed, plain.backward(dy))
