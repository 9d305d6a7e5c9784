"""Tests for scratchvae.layers.conv: Conv2d and ConvTranspose2d.

* forward against naive loop implementations (float64, tight tolerance);
* ConvTranspose2d is the adjoint of Conv2d, col2im the adjoint of im2col;
* finite-difference gradient checks (hypothesis-drawn shapes);
* the layer contract: validation errors, grad accumulation, dy untouched,
  PyTorch output-size formulas, initialization, dtype preservation.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from scratchvae import backend as backend_mod
from scratchvae import gradcheck
from scratchvae.layers.conv import (
    Conv2d,
    ConvTranspose2d,
    Workspace,
    col2im,
    conv2d_backward,
    conv2d_forward,
    conv_transpose2d_backward,
    conv_transpose2d_forward,
    im2col,
)

# -- naive references ---------------------------------------------------------------

def naive_conv2d(x, W, b, stride, padding):
    """Explicit loops over output pixels."""
    (sh, sw), (ph, pw) = stride, padding
    B, C, H, Wd = x.shape
    O, _, kh, kw = W.shape
    xp_ = np.zeros((B, C, H + 2 * ph, Wd + 2 * pw))
    xp_[:, :, ph:ph + H, pw:pw + Wd] = x
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (Wd + 2 * pw - kw) // sw + 1
    out = np.zeros((B, O, Ho, Wo))
    for n in range(B):
        for o in range(O):
            for i in range(Ho):
                for j in range(Wo):
                    patch = xp_[n, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
                    out[n, o, i, j] = np.sum(patch * W[o]) + b[o]
    return out


def naive_conv_transpose2d(x, W, b, stride, padding, output_padding):
    """The scatter definition: out[b, o, i*s - p + u, j*s - p + v] += x[b, c, i, j] * W[c, o, u, v]."""
    (sh, sw), (ph, pw), (oph, opw) = stride, padding, output_padding
    B, C, H, Wd = x.shape
    _, O, kh, kw = W.shape
    Ho, Wo = (H - 1) * sh - 2 * ph + kh + oph, (Wd - 1) * sw - 2 * pw + kw + opw
    out = np.zeros((B, O, Ho, Wo)) + b[None, :, None, None]
    for n in range(B):
        for c in range(C):
            for i in range(H):
                for j in range(Wd):
                    for u in range(kh):
                        for v in range(kw):
                            r, q = i * sh - ph + u, j * sw - pw + v
                            if 0 <= r < Ho and 0 <= q < Wo:
                                out[n, :, r, q] += x[n, c, i, j] * W[c, :, u, v]
    return out


def _randn(rng, *shape):
    return rng.standard_normal(shape)


# -- forward against the naive loops -----------------------------------------------------

CONV_CASES = [
    # (B, C, H, W, O, kernel, stride, padding)
    (2, 3, 7, 7, 4, (3, 3), (1, 1), (0, 0)),
    (2, 3, 7, 8, 4, (3, 3), (1, 1), (1, 1)),
    (1, 2, 9, 9, 3, (4, 4), (2, 2), (1, 1)),
    (3, 1, 8, 6, 2, (2, 3), (2, 1), (0, 2)),
    (2, 2, 5, 7, 3, (1, 1), (3, 3), (0, 0)),
    (1, 3, 6, 9, 2, (4, 2), (3, 2), (2, 1)),
    (2, 2, 3, 3, 2, (5, 5), (1, 1), (1, 1)),  # kernel larger than the input
    (2, 1, 4, 4, 3, (1, 4), (1, 1), (3, 0)),  # padding >= kernel height
]


@pytest.mark.parametrize("B,C,H,W,O,k,s,p", CONV_CASES)
def test_conv2d_forward_matches_naive(B, C, H, W, O, k, s, p):
    rng = np.random.default_rng(1)
    x, Wt, b = _randn(rng, B, C, H, W), _randn(rng, O, C, *k), _randn(rng, O)
    out, _ = conv2d_forward(x, Wt, b, s, p)
    ref = naive_conv2d(x, Wt, b, s, p)
    assert out.shape == ref.shape
    assert out.flags.c_contiguous and out.dtype == np.float64
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


TRANSPOSE_CASES = [
    # (B, C_in, H, W, C_out, kernel, stride, padding, output_padding)
    (2, 3, 4, 4, 2, (3, 3), (1, 1), (0, 0), (0, 0)),
    (2, 2, 3, 5, 3, (4, 4), (2, 2), (1, 1), (0, 0)),
    (1, 2, 4, 3, 2, (4, 4), (2, 2), (1, 1), (1, 1)),
    (2, 1, 3, 3, 2, (3, 2), (3, 2), (0, 1), (2, 1)),
    (1, 3, 5, 4, 2, (1, 1), (2, 3), (0, 0), (1, 2)),
    (2, 2, 4, 4, 1, (2, 3), (1, 2), (2, 1), (0, 1)),
    (1, 2, 2, 2, 2, (3, 3), (3, 3), (0, 0), (0, 0)),  # kernel == stride: no overlaps
]


@pytest.mark.parametrize("B,C,H,W,O,k,s,p,op", TRANSPOSE_CASES)
def test_conv_transpose2d_forward_matches_naive(B, C, H, W, O, k, s, p, op):
    rng = np.random.default_rng(2)
    x, Wt, b = _randn(rng, B, C, H, W), _randn(rng, C, O, *k), _randn(rng, O)
    out, _ = conv_transpose2d_forward(x, Wt, b, s, p, op)
    ref = naive_conv_transpose2d(x, Wt, b, s, p, op)
    assert out.shape == ref.shape
    assert out.flags.c_contiguous and out.dtype == np.float64
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_layers_use_their_params():
    rng = np.random.default_rng(3)
    conv = Conv2d(2, 3, (3, 2), stride=(2, 1), padding=1, dtype="float64", rng=0)
    x = _randn(rng, 2, 2, 6, 5)
    np.testing.assert_allclose(conv(x), naive_conv2d(x, conv.params["W"], conv.params["b"], (2, 1), (1, 1)),
                               rtol=1e-12, atol=1e-12)
    tconv = ConvTranspose2d(2, 3, (2, 3), stride=2, padding=(0, 1), output_padding=1, dtype="float64", rng=0)
    x = _randn(rng, 2, 2, 3, 4)
    ref = naive_conv_transpose2d(x, tconv.params["W"], tconv.params["b"], (2, 2), (0, 1), (1, 1))
    np.testing.assert_allclose(tconv(x), ref, rtol=1e-12, atol=1e-12)


# -- adjointness ----------------------------------------------------------------------

@pytest.mark.parametrize("B,C,H,W,O,k,s,p", CONV_CASES)
def test_conv_transpose_is_adjoint_of_conv(B, C, H, W, O, k, s, p):
    """<conv2d(x), y> == <x, conv_transpose2d(y)> with a shared W and zero bias."""
    rng = np.random.default_rng(4)
    x, Wt = _randn(rng, B, C, H, W), _randn(rng, O, C, *k)
    y_conv, _ = conv2d_forward(x, Wt, np.zeros(O), s, p)
    y = _randn(rng, *y_conv.shape)
    # choose output_padding so that conv_transpose2d(y) has x's spatial size
    Ho, Wo = y.shape[2:]
    op = (H - ((Ho - 1) * s[0] - 2 * p[0] + k[0]), W - ((Wo - 1) * s[1] - 2 * p[1] + k[1]))
    assert 0 <= op[0] < s[0] and 0 <= op[1] < s[1]
    xt, _ = conv_transpose2d_forward(y, Wt, np.zeros(C), s, p, op)
    assert xt.shape == x.shape
    lhs, rhs = np.sum(y_conv * y), np.sum(x * xt)
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("B,C,H,W,O,k,s,p", CONV_CASES)
def test_col2im_is_adjoint_of_im2col(B, C, H, W, O, k, s, p):
    rng = np.random.default_rng(5)
    x = _randn(rng, B, C, H, W)
    cols = im2col(x, k, s, p)
    c = _randn(rng, *cols.shape)
    back = col2im(c, x.shape, k, s, p)
    assert back.shape == x.shape
    assert np.sum(cols * c) == pytest.approx(np.sum(x * back), rel=1e-12, abs=1e-12)


def test_backward_pure_functions_match_layer_transposes():
    """conv2d's input gradient equals conv_transpose2d's forward (and vice versa)."""
    rng = np.random.default_rng(6)
    x, Wt = _randn(rng, 2, 3, 9, 9), _randn(rng, 4, 3, 4, 4)
    y, cache = conv2d_forward(x, Wt, np.zeros(4), 2, 1)
    dy = _randn(rng, *y.shape)
    dx, _, _ = conv2d_backward(dy, cache)
    # (9 + 2 - 4)//2 + 1 = 4;  (4 - 1)*2 - 2 + 4 = 8, so output_padding 1 gives 9
    xt, tcache = conv_transpose2d_forward(dy, Wt, np.zeros(3), 2, 1, 1)
    np.testing.assert_allclose(dx, xt, rtol=1e-12, atol=1e-12)
    ddy, _, _ = conv_transpose2d_backward(x, tcache)
    np.testing.assert_allclose(ddy, y, rtol=1e-12, atol=1e-12)


# -- gradient checks -------------------------------------------------------------------

sizes = st.integers(3, 9)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), C=st.integers(1, 3), O=st.integers(1, 3), H=sizes, W=sizes,
       kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3),
       ph=st.integers(0, 2), pw=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_conv2d_gradcheck(B, C, O, H, W, kh, kw, sh, sw, ph, pw, seed):
    assume(H + 2 * ph >= kh and W + 2 * pw >= kw)
    layer = Conv2d(C, O, (kh, kw), stride=(sh, sw), padding=(ph, pw), dtype="float64", rng=seed)
    x = np.random.default_rng(seed).standard_normal((B, C, H, W))
    report = gradcheck.check_layer(layer, x, seed=seed)
    assert set(report.errors) == {"x", "W", "b"}
    assert report.max_error <= 1e-6, str(report)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), C=st.integers(1, 3), O=st.integers(1, 3), H=st.integers(1, 5),
       W=st.integers(1, 5), kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 3),
       sw=st.integers(1, 3), ph=st.integers(0, 2), pw=st.integers(0, 2), data=st.data())
def test_conv_transpose2d_gradcheck(B, C, O, H, W, kh, kw, sh, sw, ph, pw, data):
    oph = data.draw(st.integers(0, sh - 1), label="oph")
    opw = data.draw(st.integers(0, sw - 1), label="opw")
    assume((H - 1) * sh - 2 * ph + kh + oph >= 1 and (W - 1) * sw - 2 * pw + kw + opw >= 1)
    seed = data.draw(st.integers(0, 2**16), label="seed")
    layer = ConvTranspose2d(C, O, (kh, kw), stride=(sh, sw), padding=(ph, pw), output_padding=(oph, opw),
                            dtype="float64", rng=seed)
    x = np.random.default_rng(seed).standard_normal((B, C, H, W))
    report = gradcheck.check_layer(layer, x, seed=seed)
    assert set(report.errors) == {"x", "W", "b"}
    assert report.max_error <= 1e-6, str(report)


@pytest.mark.parametrize("layout", ["NCHW", "CHWB"])
def test_wide_layers_gradcheck_through_the_transposed_weight_product(layout):
    """64 channels on one side and 8*3*3 = 72 patch rows on the other: the weight gradients of both
    layers are computed as ``(cols @ dout2.T).T`` (``_product_with_transpose``'s wide branch), which
    the drawn gradchecks above, with at most 3 channels, never reach."""
    rng = np.random.default_rng(5)
    shape = (2, 8, 5, 4) if layout == "NCHW" else (8, 5, 4, 2)
    conv = Conv2d(8, 64, 3, stride=1, padding=1, layout=layout, dtype="float64", rng=5)
    report = gradcheck.check_layer(conv, rng.standard_normal(shape), seed=5)
    assert set(report.errors) == {"x", "W", "b"} and report.max_error <= 1e-6, str(report)
    shape = (2, 64, 3, 2) if layout == "NCHW" else (64, 3, 2, 2)
    convt = ConvTranspose2d(64, 8, 3, stride=2, padding=1, layout=layout, dtype="float64", rng=6)
    report = gradcheck.check_layer(convt, rng.standard_normal(shape), seed=6)
    assert set(report.errors) == {"x", "W", "b"} and report.max_error <= 1e-6, str(report)


# -- output shapes (PyTorch formulas) ------------------------------------------------

@pytest.mark.parametrize("H,W,k,s,p", [(28, 28, 4, 2, 1), (14, 14, 4, 2, 1), (7, 9, 3, 1, 1), (10, 11, (3, 5), (2, 3), (0, 2)),
                                       (5, 5, 5, 1, 0), (4, 6, 2, 3, 0)])
def test_conv2d_output_shape(H, W, k, s, p):
    layer = Conv2d(2, 3, k, stride=s, padding=p, rng=0)
    (kh, kw), (sh, sw), (ph, pw) = [(v, v) if isinstance(v, int) else v for v in (k, s, p)]
    y = layer(np.zeros((2, 2, H, W), dtype=np.float32))
    assert y.shape == (2, 3, (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1)
    assert layer.output_size((H, W)) == y.shape[2:]


@pytest.mark.parametrize("H,W,k,s,p,op", [(7, 7, 4, 2, 1, 0), (14, 14, 4, 2, 1, 0), (7, 7, 3, 2, 1, 1),
                                          (3, 4, (2, 3), (3, 2), (0, 1), (2, 1)), (1, 1, 1, 1, 0, 0)])
def test_conv_transpose2d_output_shape(H, W, k, s, p, op):
    layer = ConvTranspose2d(2, 3, k, stride=s, padding=p, output_padding=op, rng=0)
    (kh, kw), (sh, sw), (ph, pw), (oph, opw) = [(v, v) if isinstance(v, int) else v for v in (k, s, p, op)]
    y = layer(np.zeros((2, 2, H, W), dtype=np.float32))
    assert y.shape == (2, 3, (H - 1) * sh - 2 * ph + kh + oph, (W - 1) * sw - 2 * pw + kw + opw)


def test_mnist_encoder_decoder_shapes():
    x = np.zeros((5, 1, 28, 28), dtype=np.float32)
    h = Conv2d(32, 64, 4, 2, 1, rng=0)(Conv2d(1, 32, 4, 2, 1, rng=0)(x))
    assert h.shape == (5, 64, 7, 7)
    y = ConvTranspose2d(32, 1, 4, 2, 1, rng=0)(ConvTranspose2d(64, 32, 4, 2, 1, rng=0)(h))
    assert y.shape == (5, 1, 28, 28)


# -- parameters and initialization ---------------------------------------------------

def test_param_shapes_and_pytorch_init():
    conv = Conv2d(3, 5, (2, 4), rng=0)
    assert conv.params["W"].shape == (5, 3, 2, 4) and conv.params["b"].shape == (5,)
    tconv = ConvTranspose2d(3, 5, (2, 4), rng=0)
    assert tconv.params["W"].shape == (3, 5, 2, 4) and tconv.params["b"].shape == (5,)
    for layer, fan_in in ((conv, 3 * 2 * 4), (tconv, 5 * 2 * 4)):
        k = 1 / math.sqrt(fan_in)
        for name in ("W", "b"):
            p = layer.params[name]
            assert p.dtype == np.float32
            assert layer.grads[name].shape == p.shape and not layer.grads[name].any()
            assert np.abs(p).max() <= k
        # a spread consistent with U(-k, k), not a narrower/wider law
        assert np.abs(layer.params["W"]).max() > 0.7 * k


def test_init_is_reproducible_and_drawn_w_then_b():
    a, b = Conv2d(2, 3, 3, rng=7), Conv2d(2, 3, 3, rng=7)
    np.testing.assert_array_equal(a.params["W"], b.params["W"])
    gen = np.random.default_rng(7)
    k = 1 / math.sqrt(2 * 3 * 3)
    W = gen.uniform(-k, k, size=(3, 2, 3, 3))
    bias = gen.uniform(-k, k, size=(3,))
    np.testing.assert_array_equal(a.params["W"], W.astype(np.float32))
    np.testing.assert_array_equal(a.params["b"], bias.astype(np.float32))


def test_kernel_size_as_pair_and_repr():
    conv = Conv2d(1, 32, kernel_size=(4, 4), stride=(2, 2), padding=(1, 1), rng=0)
    assert repr(conv) == "Conv2d(1, 32, kernel_size=(4, 4), stride=(2, 2), padding=(1, 1))"
    assert repr(Conv2d(1, 32, 4, 2, 1, rng=0)) == repr(conv)
    tconv = ConvTranspose2d(64, 32, (3, 5), 2, (1, 2), 1, rng=0)
    assert tconv.params["W"].shape == (64, 32, 3, 5)
    assert repr(tconv) == ("ConvTranspose2d(64, 32, kernel_size=(3, 5), stride=(2, 2), padding=(1, 2), "
                           "output_padding=(1, 1))")


def test_float32_stays_float32():
    rng = np.random.default_rng(8)
    for layer, shape in ((Conv2d(3, 4, 3, 2, 1, rng=0), (2, 3, 7, 7)),
                         (ConvTranspose2d(3, 4, 3, 2, 1, 1, rng=0), (2, 3, 4, 4))):
        x = rng.standard_normal(shape).astype(np.float32)
        y = layer(x)
        assert y.dtype == np.float32 and y.flags.c_contiguous
        dx = layer.backward(np.ones_like(y))
        assert dx.dtype == np.float32 and dx.shape == x.shape and dx.flags.c_contiguous
        assert all(g.dtype == np.float32 for g in layer.grads.values())


# -- error cases -------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [Conv2d, ConvTranspose2d])
def test_wrong_channels_or_ndim(cls):
    layer = cls(3, 2, 3, rng=0)
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*\(N, 3, N, N\)"):
        layer(np.zeros((2, 4, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*\(N, 3, N, N\)"):
        layer(np.zeros((3, 8, 8), dtype=np.float32))


@pytest.mark.parametrize("cls", [Conv2d, ConvTranspose2d])
def test_wrong_dtype(cls):
    layer = cls(1, 2, 3, rng=0)
    with pytest.raises(TypeError, match=cls.__name__):
        layer(np.zeros((2, 1, 8, 8), dtype=np.float64))
    layer64 = cls(1, 2, 3, dtype="float64", rng=0)
    y = layer64(np.zeros((2, 1, 8, 8)))
    with pytest.raises(TypeError, match=cls.__name__):
        layer64.backward(np.zeros(y.shape, dtype=np.float32))


def test_spatial_size_too_small():
    with pytest.raises(ValueError, match="Conv2d.*too small"):
        Conv2d(1, 2, 5, padding=1, rng=0)(np.zeros((1, 1, 2, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="ConvTranspose2d.*too small"):
        ConvTranspose2d(1, 2, 1, padding=2, rng=0)(np.zeros((1, 1, 2, 2), dtype=np.float32))


@pytest.mark.parametrize("cls", [Conv2d, ConvTranspose2d])
def test_backward_before_forward(cls):
    with pytest.raises(RuntimeError, match=cls.__name__):
        cls(1, 2, 3, rng=0).backward(np.zeros((1, 2, 3, 3), dtype=np.float32))


@pytest.mark.parametrize("cls", [Conv2d, ConvTranspose2d])
def test_dy_shape_checked(cls):
    layer = cls(1, 2, 3, rng=0)
    y = layer(np.zeros((2, 1, 5, 5), dtype=np.float32))
    with pytest.raises(ValueError, match=cls.__name__):
        layer.backward(np.zeros((2, 2, y.shape[2] + 1, y.shape[3]), dtype=np.float32))


@pytest.mark.parametrize("cls", [Conv2d, ConvTranspose2d])
def test_grads_accumulate_and_dy_untouched(cls):
    rng = np.random.default_rng(9)
    layer = cls(2, 3, (3, 2), stride=2, padding=1, dtype="float64", rng=0)
    x = rng.standard_normal((2, 2, 6, 5))
    y = layer(x)
    dy = rng.standard_normal(y.shape)
    dy_copy = dy.copy()
    dx1 = layer.backward(dy)
    once = {k: g.copy() for k, g in layer.grads.items()}
    dx2 = layer.backward(dy)
    np.testing.assert_array_equal(dy, dy_copy)
    np.testing.assert_array_equal(dx1, dx2)
    for k in once:
        assert np.any(once[k])
        np.testing.assert_allclose(layer.grads[k], 2 * once[k], rtol=1e-14)
    layer.zero_grad()
    assert not any(g.any() for g in layer.grads.values())


def test_cache_is_replaced_by_each_forward():
    rng = np.random.default_rng(10)
    layer = Conv2d(1, 2, 3, dtype="float64", rng=0)
    layer(rng.standard_normal((2, 1, 6, 6)))
    x = rng.standard_normal((3, 1, 5, 7))
    y = layer(x)
    dx = layer.backward(np.ones_like(y))
    assert dx.shape == x.shape


@pytest.mark.parametrize("kwargs", [dict(stride=2, output_padding=2), dict(stride=1, output_padding=1),
                                    dict(stride=(2, 3), output_padding=(1, 3)), dict(output_padding=-1)])
def test_bad_output_padding(kwargs):
    with pytest.raises(ValueError, match="output_padding"):
        ConvTranspose2d(1, 1, 3, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=0), dict(kernel_size=3, stride=0),
                                    dict(kernel_size=3, padding=-1), dict(kernel_size=(3, 3, 3))])
@pytest.mark.parametrize("cls", [Conv2d, ConvTranspose2d])
def test_bad_geometry(cls, kwargs):
    with pytest.raises(ValueError):
        cls(1, 1, **kwargs)


@pytest.mark.parametrize("cls", [Conv2d, ConvTranspose2d])
def test_bad_channels(cls):
    with pytest.raises(ValueError, match=cls.__name__):
        cls(0, 1, 3)


# -- CuPy (skipped without a GPU) ------------------------------------------------------

@pytest.mark.parametrize("cls,shape", [(Conv2d, (2, 3, 9, 9)), (ConvTranspose2d, (2, 3, 4, 5))])
def test_cupy_matches_numpy(cls, shape):
    try:
        be = backend_mod.get("cupy")
    except backend_mod.BackendUnavailable as err:
        pytest.skip(str(err))
    rng = np.random.default_rng(11)
    cpu = cls(3, 4, (4, 3), stride=2, padding=1, dtype="float64", rng=0)
    gpu = cls(3, 4, (4, 3), stride=2, padding=1, backend=be, dtype="float64", rng=0)
    x = rng.standard_normal(shape)
    y = cpu(x)
    yg = gpu(be.asarray(x))
    np.testing.assert_allclose(be.asnumpy(yg), y, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    np.testing.assert_allclose(be.asnumpy(gpu.backward(be.asarray(dy))), cpu.backward(dy), rtol=1e-12, atol=1e-12)
    for k in cpu.grads:
        np.testing.assert_allclose(be.asnumpy(gpu.grads[k]), cpu.grads[k], rtol=1e-12, atol=1e-12)


# -- workspace reuse ----------------------------------------------------------------------

@pytest.mark.parametrize("cls,shape", [(Conv2d, (2, 3, 9, 8)), (ConvTranspose2d, (2, 3, 4, 5))])
def test_outputs_do_not_alias_reused_buffers(cls, shape):
    """Each forward/backward returns fresh arrays; a later call does not overwrite them."""
    rng = np.random.default_rng(12)
    layer = cls(3, 2, (3, 4), stride=2, padding=1, dtype="float64", rng=0)
    x1, x2 = rng.standard_normal(shape), rng.standard_normal(shape)
    y1 = layer(x1)
    dx1 = layer.backward(np.ones_like(y1))
    y1c, dx1c = y1.copy(), dx1.copy()
    y2 = layer(x2)
    dx2 = layer.backward(rng.standard_normal(y2.shape))
    np.testing.assert_array_equal(y1, y1c)
    np.testing.assert_array_equal(dx1, dx1c)
    assert not np.shares_memory(y1, y2) and not np.shares_memory(dx1, dx2)
    # a smaller batch reallocates the buffers and still gives the right answer
    y3 = layer(x2[:1])
    np.testing.assert_allclose(y3, y2[:1], rtol=1e-12, atol=1e-12)


def test_workspace_matches_fresh_buffers():
    rng = np.random.default_rng(13)
    ws = Workspace()
    x, Wt, b = _randn(rng, 3, 2, 7, 6), _randn(rng, 4, 2, 3, 3), _randn(rng, 4)
    for _ in range(2):  # second round reuses dirty buffers
        y_ws, cache_ws = conv2d_forward(x, Wt, b, 2, 1, workspace=ws)
        y, cache = conv2d_forward(x, Wt, b, 2, 1)
        np.testing.assert_array_equal(y_ws, y)
        dy = _randn(rng, *y.shape)
        for got, want in zip(conv2d_backward(dy, cache_ws, workspace=ws), conv2d_backward(dy, cache)):
            np.testing.assert_array_equal(got, want)
        yt_ws, tcache_ws = conv_transpose2d_forward(y, Wt, b[:2], 2, 1, 1, workspace=ws)
        yt, tcache = conv_transpose2d_forward(y, Wt, b[:2], 2, 1, 1)
        np.testing.assert_array_equal(yt_ws, yt)
        dyt = _randn(rng, *yt.shape)
        for got, want in zip(conv_transpose2d_backward(dyt, tcache_ws, workspace=ws),
                             conv_transpose2d_backward(dyt, tcache)):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layout,fused", [("CHWB", True), ("CHWB", False), ("NCHW", False)])
@pytest.mark.parametrize("cls", [Conv2d, ConvTranspose2d])
def test_batches_of_changing_size_reuse_the_largest_buffers_and_give_fresh_results(cls, layout, fused):
    """A training batch, an evaluation chunk (larger), the short last batch, the training batch again: the
    layer (the conv VAE's is fused and CHWB) gives bit for bit what a fresh layer gives each time, and a
    request no larger than the store is a view of it (no new memory to fault)."""
    rng = np.random.default_rng(14)
    layer = cls(3, 4, 3, stride=2, padding=1, layout=layout, dtype="float64", rng=0, fused=fused)
    H = 9 if cls is Conv2d else 4
    for B in (4, 7, 2, 4):
        x = rng.standard_normal((3, H, H, B))                          # (C, H, W, B)
        x = x if layout == "CHWB" else np.ascontiguousarray(x.transpose(3, 0, 1, 2))
        fresh = cls(3, 4, 3, stride=2, padding=1, layout=layout, dtype="float64", rng=0, fused=fused)
        y = layer(x)
        np.testing.assert_array_equal(y, fresh(x))
        dy = rng.standard_normal(y.shape)
        np.testing.assert_array_equal(layer.backward(dy), fresh.backward(dy))
        for k in layer.grads:
            np.testing.assert_array_equal(layer.grads[k], fresh.grads[k])
            layer.grads[k][...] = 0
    largest = {k: v.ctypes.data for k, v in layer._workspace._stores.items()}
    layer(rng.standard_normal((3, H, H, 3) if layout == "CHWB" else (3, 3, H, H)))   # smaller than 7: no new store
    assert {k: v.ctypes.data for k, v in layer._workspace._stores.items()} == largest


def test_conv2d_input_grad_false_skips_dx_only():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6))
    full = Conv2d(3, 4, 3, stride=2, padding=1, dtype="float64", rng=0)
    data_layer = Conv2d(3, 4, 3, stride=2, padding=1, dtype="float64", rng=0)
    data_layer.input_grad = False
    dy = rng.standard_normal(full.forward(x).shape)
    data_layer.forward(x)
    assert full.backward(dy) is not None and data_layer.backward(dy) is None
    for k in full.grads:
        np.testing.assert_array_equal(full.grads[k], data_layer.grads[k])


# -- the batch-innermost layout (CHWB) -------------------------------------------------

def _to_chwb(a):
    return np.ascontiguousarray(a.transpose(1, 2, 3, 0))  # (B, C, H, W) -> (C, H, W, B)


def _to_nchw(a):
    return np.ascontiguousarray(a.transpose(3, 0, 1, 2))  # (C, H, W, B) -> (B, C, H, W)


def _check_chwb_equals_nchw_transposed(nchw, chwb, x, rng):
    """Same weights, same numbers: forward and every gradient, only the image axes move."""
    B, O = x.shape[0], nchw.out_channels
    y = nchw.forward(x)
    y_t = chwb.forward(_to_chwb(x))
    assert y_t.shape == (O,) + y.shape[2:] + (B,) and y_t.flags.c_contiguous
    np.testing.assert_allclose(_to_nchw(y_t), y, rtol=1e-12, atol=1e-12)
    dy = _randn(rng, *y.shape)
    dx, dx_t = nchw.backward(dy), chwb.backward(_to_chwb(dy))
    np.testing.assert_allclose(_to_nchw(dx_t), dx, rtol=1e-12, atol=1e-12)
    for name in ("W", "b"):
        np.testing.assert_allclose(chwb.grads[name], nchw.grads[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("B,C,H,W,O,k,s,p", CONV_CASES)
def test_conv2d_chwb_is_nchw_transposed(B, C, H, W, O, k, s, p):
    rng = np.random.default_rng(11)
    x = _randn(rng, B, C, H, W)
    _check_chwb_equals_nchw_transposed(Conv2d(C, O, k, stride=s, padding=p, dtype="float64", rng=3),
                                       Conv2d(C, O, k, stride=s, padding=p, layout="CHWB", dtype="float64", rng=3),
                                       x, rng)


@pytest.mark.parametrize("B,C,H,W,O,k,s,p,op", TRANSPOSE_CASES)
def test_conv_transpose2d_chwb_is_nchw_transposed(B, C, H, W, O, k, s, p, op):
    rng = np.random.default_rng(12)
    x = _randn(rng, B, C, H, W)
    kw = dict(stride=s, padding=p, output_padding=op, dtype="float64", rng=4)
    _check_chwb_equals_nchw_transposed(ConvTranspose2d(C, O, k, **kw), ConvTranspose2d(C, O, k, layout="CHWB", **kw),
                                       x, rng)


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 3), C=st.integers(1, 3), O=st.integers(1, 3), H=st.integers(2, 6), W=st.integers(2, 6),
       k=st.integers(1, 3), s=st.integers(1, 2), p=st.integers(0, 1), seed=st.integers(0, 2**16))
def test_chwb_layers_gradcheck(B, C, O, H, W, k, s, p, seed):
    assume(H + 2 * p >= k and W + 2 * p >= k)                                # Conv2d output >= 1
    assume((H - 1) * s - 2 * p + k >= 1 and (W - 1) * s - 2 * p + k >= 1)    # ConvTranspose2d output >= 1
    x = np.random.default_rng(seed).standard_normal((C, H, W, B))
    conv = Conv2d(C, O, k, stride=s, padding=p, layout="CHWB", dtype="float64", rng=seed)
    report = gradcheck.check_layer(conv, x, seed=seed)
    assert set(report.errors) == {"x", "W", "b"} and report.max_error <= 1e-6, str(report)
    convt = ConvTranspose2d(C, O, k, stride=s, padding=p, layout="CHWB", dtype="float64", rng=seed)
    report = gradcheck.check_layer(convt, x, seed=seed)
    assert set(report.errors) == {"x", "W", "b"} and report.max_error <= 1e-6, str(report)


def test_chwb_outputs_are_fresh_and_do_not_alias_workspaces():
    rng = np.random.default_rng(5)
    for layer, shape in ((Conv2d(2, 3, 3, padding=1, layout="CHWB"), (2, 5, 5, 4)),
                         (ConvTranspose2d(2, 3, 4, stride=2, padding=1, layout="CHWB"), (2, 3, 3, 4))):
        x = rng.standard_normal(shape).astype(np.float32)
        y1 = layer.forward(x)
        keep = y1.copy()
        dx1 = layer.backward(np.ones_like(y1))
        keep_dx = dx1.copy()
        layer.forward(x * 2)
        layer.backward(np.full_like(y1, 3.0))
        np.testing.assert_array_equal(y1, keep)
        np.testing.assert_array_equal(dx1, keep_dx)


@pytest.mark.parametrize("cls", [Conv2d, ConvTranspose2d])
def test_chwb_layout_checks(cls):
    with pytest.raises(ValueError, match="layout must be one of"):
        cls(2, 3, 3, layout="NHWC")
    layer = cls(2, 3, 3, layout="CHWB")
    with pytest.raises(ValueError, match=r"input \(CHWB\) has shape \(4, 2, 5, 5\), expected \(2, N, N, N\)"):
        layer.forward(np.zeros((4, 2, 5, 5), dtype=np.float32))   # an NCHW batch given to a CHWB layer
    y = layer.forward(np.zeros((2, 5, 5, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="dy has shape"):
        layer.backward(np.zeros((4,) + y.shape[:3], dtype=np.float32))
    assert "layout='CHWB'" in repr(layer)


def test_to_and_from_chwb():
    from scratchvae.layers import FromCHWB, ToCHWB
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 2 * 3 * 4))
    to = ToCHWB((2, 3, 4), dtype="float64")
    y = to.forward(x)
    np.testing.assert_array_equal(y, _to_chwb(x.reshape(5, 2, 3, 4)))
    back = FromCHWB(dtype="float64")
    np.testing.assert_array_equal(back.forward(y), x)
    assert gradcheck.check_layer(to, x).max_error <= 1e-9
    assert gradcheck.check_layer(back, y).max_error <= 1e-9
    assert np.shares_memory(back.forward(y), y)                     # a view, forward
    assert np.shares_memory(to.backward(y), y)                       # and backward
    x_f = np.asfortranarray(x)                                       # stored batch-fastest: no copy either
    assert np.shares_memory(to.forward(x_f), x_f)
    np.testing.assert_array_equal(to.forward(x_f), y)
    with pytest.raises(ValueError, match=r"ToCHWB: input has shape \(5, 23\), expected \(N, 24\)"):
        to.forward(x[:, :23])
    with pytest.raises(ValueError, match="shape must be"):
        ToCHWB((2, 12))


# -- the fused unfold (Numba im2col / col2im, CHWB) ---------------------------------------

@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), C=st.integers(1, 3), H=st.integers(1, 9), W=st.integers(1, 9),
       kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3),
       ph=st.integers(0, 2), pw=st.integers(0, 2), dtype=st.sampled_from(["float32", "float64"]))
def test_fused_unfold_is_bit_identical_to_the_array_code(B, C, H, W, kh, kw, sh, sw, ph, pw, dtype):
    from scratchvae import kernels
    assume(H + 2 * ph >= kh and W + 2 * pw >= kw)
    from scratchvae.layers.conv import Workspace, col2im, im2col
    rng = np.random.default_rng(B * 100 + C)
    x = rng.standard_normal((C, H, W, B)).astype(dtype)               # (C, H, W, B)
    args = ((kh, kw), (sh, sw), (ph, pw))
    plain = im2col(x, *args, layout="CHWB")
    fused = im2col(x, *args, layout="CHWB", workspace=Workspace(kernels))
    np.testing.assert_array_equal(fused, plain)
    cols = rng.standard_normal(plain.shape).astype(dtype)
    back_plain = col2im(cols, (B, C, H, W), *args, layout="CHWB")
    back_fused = col2im(cols, (B, C, H, W), *args, layout="CHWB", workspace=Workspace(kernels))
    assert back_fused.dtype == np.dtype(dtype) and back_fused.flags.c_contiguous
    np.testing.assert_array_equal(back_fused, back_plain)               # same sums in the same order
    bias = rng.standard_normal(C).astype(dtype)                         # and the bias added after them
    with_bias = col2im(cols, (B, C, H, W), *args, layout="CHWB", workspace=Workspace(kernels), bias=bias)
    np.testing.assert_array_equal(with_bias, col2im(cols, (B, C, H, W), *args, layout="CHWB", bias=bias))
    np.testing.assert_array_equal(with_bias, back_plain + bias[:, None, None, None])


@pytest.mark.parametrize("downsample", ["stride", "pool"])
def test_fused_conv_layers_give_the_plain_gradients_bit_for_bit(downsample):
    from scratchvae.models import conv_vae
    plain = conv_vae(input_shape=(1, 12, 12), channels=(3, 4), hidden=8, latent_dim=2, dtype="float64",
                     fused=False, downsample=downsample)
    fused = conv_vae(input_shape=(1, 12, 12), channels=(3, 4), hidden=8, latent_dim=2, dtype="float64",
                     fused=True, downsample=downsample)
    fused.ops = plain.ops                                      # the same loss code: only the unfold differs
    rng = np.random.default_rng(0)
    x, eps = (rng.random((5, 144)) < 0.4).astype(np.float64), rng.standard_normal((5, 2))
    for m in (plain, fused):
        m.zero_grad()
        m.loss_and_grad(x, eps=eps)
    for k, g in plain.grads.items():
        np.testing.assert_array_equal(fused.grads[k], g, err_msg=k)


def test_fused_unfold_checks_its_arrays():
    from scratchvae import kernels
    x = np.zeros((2, 5, 5, 3), np.float32)
    with pytest.raises(ValueError, match=r"cols has shape \(2, 75\), expected \(32, 12\)"):
        kernels.im2col_chwb(x, np.zeros((2, 75), np.float32), (4, 4), (2, 2), (1, 1))
    with pytest.raises(TypeError, match="differs from the image's float32"):
        kernels.im2col_chwb(x, np.zeros((32, 12), np.float64), (4, 4), (2, 2), (1, 1))
    with pytest.raises(ValueError, match=r"col2im_chwb: bias must be a NumPy float32 array of shape \(2,\), got float32 \(3,\)"):
        kernels.col2im_chwb(np.zeros((32, 12), np.float32), x, (4, 4), (2, 2), (1, 1), bias=np.zeros(3, np.float32))
