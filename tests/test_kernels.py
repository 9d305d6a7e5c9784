"""Tests of the fused kernels in scratchvae.kernels against scratchvae.losses.

* CPU (Numba): every public function agrees with its plain twin to float32
  rounding (float64: ~1e-12), extremes included; Adam over many steps; the
  float32 machine code has no double-precision arithmetic.
* CUDA (numba-cuda): every kernel compiles to PTX for cc 8.0 in float32 and
  float64, and runs correctly under the CUDA simulator (a subprocess running
  tests/cuda_sim_check.py).  On a machine with a GPU and CuPy, the dispatch
  is also checked on CuPy arrays.

The fused-versus-plain timings are ``benchmarks/bench_kernels.py``'s.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from scratchvae import kernels, losses, optim
from scratchvae.backend import BackendUnavailable

HERE = pathlib.Path(__file__).resolve().parent
DTYPES = [np.float32, np.float64]
RTOL = {np.float32: 1e-5, np.float64: 1e-12}
ATOL = {np.float32: 1e-6, np.float64: 1e-15}  # times the largest |expected| entry


def assert_close(got, want, dtype, name=""):
    assert isinstance(got, np.ndarray), f"{name}: got {type(got)}"
    assert got.dtype == want.dtype == dtype, f"{name}: dtype {got.dtype} vs {want.dtype}"
    assert got.shape == want.shape, f"{name}: shape {got.shape} vs {want.shape}"
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=RTOL[dtype], atol=ATOL[dtype] * scale, err_msg=name)


def bce_data(rng, B, D, dtype):
    logits = (4 * rng.standard_normal((B, D))).astype(dtype)
    x = rng.random((B, D)).astype(dtype)
    x[: B // 2] = np.round(x[: B // 2])  # binary rows and soft rows
    logits[0, :6] = [1e4, -1e4, 1e4, -1e4, 0.0, 30.0]
    x[0, :6] = [0, 0, 1, 1, 0.5, 1]
    return logits, x


# ----------------------------------------------------------------------------
# CPU kernels vs the plain functions
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(16, 50), (5, 784), (1, 1), (3, 200)])
def test_bce_matches_plain(dtype, shape):
    rng = np.random.default_rng(0)
    logits, x = bce_data(rng, *shape, dtype) if shape[1] >= 6 else (
        rng.standard_normal(shape).astype(dtype), rng.random(shape).astype(dtype))
    for scale in (1.0, 1 / 16):
        want = losses.bce_with_logits(logits, x, scale)
        got = kernels.bce_with_logits(logits, x, scale)
        for name, g, w in zip(("nll", "dlogits"), got, want):
            assert_close(g, w, dtype, name)
            assert np.all(np.isfinite(g))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_extreme_logits_exact(dtype):
    logits = np.array([[1e4, -1e4, 1e4, -1e4]], dtype)
    x = np.array([[0, 0, 1, 1]], dtype)
    nll, dlogits = kernels.bce_with_logits(logits, x)
    assert nll[0] == 2e4
    np.testing.assert_array_equal(dlogits, np.array([[1, 0, 0, -1]], dtype))
    tiny, _ = kernels.bce_with_logits(np.array([[-1e4]], dtype), np.zeros((1, 1), dtype))
    assert tiny[0] == 0.0


def exp_neg_abs_row(a):
    """The BCE kernel's exp(-|a|) on a 1-D array (its own scratch)."""
    from scratchvae.kernels import cpu
    out = np.empty_like(a)
    cpu._exp_neg_abs_row(a, out, np.empty(a.size, cpu._SAME_WIDTH_INT[a.dtype]))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_vectorized_exp_is_within_an_ulp_of_libm(dtype):
    # exp(-|l|) without a libm call (so that its loop vectorizes) against
    # NumPy's exp: each is within 1 ulp of the true value, so the two may
    # differ by 2 ulps of the result; subnormal results included
    rng = np.random.default_rng(11)
    info = np.finfo(dtype)
    # where exp(-a) leaves the normal range, and where it rounds to zero
    a_sub, a_zero = -np.log(float(info.tiny)), np.log(2) - np.log(float(info.smallest_subnormal))
    a = np.concatenate([
        4 * rng.standard_normal(20000), rng.uniform(0, 1e-3, 1000),
        rng.uniform(a_sub - 3, a_zero + 1, 5000),
        [0.0, -0.0, 1e-30, np.log(2) / 2, a_sub, a_zero - 1e-3, a_zero + 1e-3, 1e30, np.inf, -np.inf],
    ]).astype(dtype)
    got, want = exp_neg_abs_row(a), np.exp(-np.abs(a))
    assert got.dtype == dtype
    ulps = np.abs(got - want) / np.spacing(want)
    worst = ulps.argmax()
    assert ulps[worst] <= 2, (a[worst], got[worst], want[worst])
    assert np.sum((got > 0) & (got < info.tiny)) > 500  # the subnormal range was exercised
    assert np.isnan(exp_neg_abs_row(np.array([np.nan, 1.0], dtype))[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [False, True], ids=["per-pixel", "shared"])
def test_gaussian_matches_plain(dtype, shared):
    rng = np.random.default_rng(1)
    B, D = 9, 130
    mean = rng.standard_normal((B, D)).astype(dtype)
    x = rng.standard_normal((B, D)).astype(dtype)
    log_sigma = rng.uniform(-2, 2, 1 if shared else D).astype(dtype)
    want = losses.gaussian_nll(mean, x, log_sigma, 0.25)
    got = kernels.gaussian_nll(mean, x, log_sigma, 0.25)
    for name, g, w in zip(("nll", "dmean", "dlog_sigma"), got, want):
        assert_close(g, w, dtype, name)


def reparam_data(rng, B, L, dtype):
    mu = rng.standard_normal((B, L)).astype(dtype)
    ls = np.linspace(-20, 20, B * L).reshape(B, L)
    ls[0, : min(L, 8)] = [1e-7, -1e-4, 0.2, -0.49, 0.5, 0.51, -0.999, 1.0][: min(L, 8)]
    eps = rng.standard_normal((B, L)).astype(dtype)
    return mu, ls.astype(dtype), eps


@pytest.mark.parametrize("dtype", DTYPES)
def test_reparameterize_matches_plain(dtype):
    rng = np.random.default_rng(2)
    B, L = 13, 10
    mu, ls, eps = reparam_data(rng, B, L, dtype)
    want = losses.reparameterize_kl(mu, ls, eps)
    got = kernels.reparameterize_kl(mu, ls, eps)
    assert_close(got[0], want[0], dtype, "z")
    # kl spans 1e-14 .. 2e17: compare each entry relative to itself
    assert got[1].dtype == dtype and np.all(np.isfinite(got[1]))
    np.testing.assert_allclose(got[1], want[1], rtol=RTOL[dtype], atol=0)

    dz = rng.standard_normal((B, L)).astype(dtype)
    kl_weight = rng.uniform(0, 2, L).astype(dtype)
    kl_weight[3] = 0.0  # a dimension at its free-bits floor
    for w in (kl_weight, 0.5):
        want = losses.reparameterize_kl_backward(dz, mu, ls, eps, w)
        got = kernels.reparameterize_kl_backward(dz, mu, ls, eps, w)
        for name, g, wnt in zip(("dmu", "dlog_sigma"), got, want):
            assert g.dtype == dtype and g.shape == (B, L) and np.all(np.isfinite(g))
            np.testing.assert_allclose(g, wnt, rtol=RTOL[dtype], atol=ATOL[dtype], err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_matches_plain_over_many_steps(dtype):
    rng = np.random.default_rng(3)
    shape = (37, 11)
    target = rng.standard_normal(shape).astype(dtype)
    p_plain = rng.standard_normal(shape).astype(dtype)
    p_fused = p_plain.copy()
    start_distance = np.abs(p_plain - target).mean()
    m1, v1, m2, v2 = (np.zeros(shape, dtype) for _ in range(4))
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
    for step in range(1, 301):
        noise = (0.1 * rng.standard_normal(shape)).astype(dtype)
        optim.adam_update(p_plain, (p_plain - target) + noise, m1, v1, step=step, **hyper)
        out = kernels.adam_update(p_fused, (p_fused - target) + noise, m2, v2, step=step, **hyper)
        assert out is None
    for name, g, w in (("param", p_fused, p_plain), ("m", m2, m1), ("v", v2, v1)):
        assert_close(g, w, dtype, name)
    # it optimized: the parameters moved most of the way to the target
    assert np.abs(p_fused - target).mean() < 0.5 * start_distance


def test_noncontiguous_inputs_are_accepted():
    rng = np.random.default_rng(4)
    big = rng.standard_normal((8, 40)).astype(np.float32)
    logits = big[::2, ::3]  # strided view
    x = np.asfortranarray(rng.random(logits.shape).astype(np.float32))
    for g, w in zip(kernels.bce_with_logits(logits, x), losses.bce_with_logits(logits, x)):
        assert_close(g, w, np.float32)
    mu, ls, eps = (a.T for a in reparam_data(rng, 6, 4, np.float64))
    for g, w in zip(kernels.reparameterize_kl(mu, ls, eps), losses.reparameterize_kl(mu, ls, eps)):
        np.testing.assert_allclose(g, w, rtol=1e-12)
    ls_strided = rng.standard_normal(2 * logits.shape[1]).astype(np.float32)[::2]
    for g, w in zip(kernels.gaussian_nll(logits, x, ls_strided), losses.gaussian_nll(logits, x, ls_strided)):
        assert_close(g, w, np.float32)


def test_validation_errors():
    a32 = np.zeros((2, 3), np.float32)
    a64 = np.zeros((2, 3))
    with pytest.raises(TypeError, match="dtype"):
        kernels.bce_with_logits(a32, a64)
    with pytest.raises(TypeError, match="float32 and float64"):
        kernels.bce_with_logits(a32.astype(np.float16), a32.astype(np.float16))
    with pytest.raises(ValueError, match="shape"):
        kernels.gaussian_nll(a32, a32, np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="kl_weight"):
        kernels.reparameterize_kl_backward(a32, a32, a32, a32, np.ones(2, np.float32))
    p = np.zeros((4, 6))
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.adam_update(p[:, ::2], p[:, ::2], p[:, ::2].copy(), p[:, ::2].copy(), lr=1e-3, beta1=0.9,
                            beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match="step"):
        kernels.adam_update(p, p, p.copy(), p.copy(), lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                            weight_decay=0.0, step=0)


def test_same_api_as_plain():
    import inspect
    for name in ("bce_with_logits", "gaussian_nll", "reparameterize_kl", "reparameterize_kl_backward",
                 "adam_update"):
        plain = optim if name == "adam_update" else losses
        assert inspect.signature(getattr(kernels, name)) == inspect.signature(getattr(plain, name)), name


_IR_CHECK = r"""
import numpy as np, re, sys
from scratchvae.kernels import cpu
f = np.float32
a2, a1 = np.ones((3, 70), f), np.ones(70, f)
cpu.bce_with_logits_into(a2, a2, 1.0, np.empty(3, f), a2.copy())
cpu.gaussian_nll_into(a2, a2, a1, 1.0, np.empty(3, f), a2.copy(), a1.copy())
cpu.gaussian_nll_into(a2, a2, a1[:1].copy(), 1.0, np.empty(3, f), a2.copy(), a1[:1].copy())
cpu.reparameterize_kl_into(a2, a2, a2, a2.copy(), a2.copy())
cpu.reparameterize_kl_backward_into(a2, a2, a2, a2, a1, a2.copy(), a2.copy())
cpu.adam_update_into(a1.copy(), a1, a1.copy(), a1.copy(), 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
bad, seen = [], 0
for name, obj in vars(cpu).items():
    for sig in getattr(obj, "signatures", []):
        if "float64" in str(sig):
            continue
        seen += 1
        in_compiled_body = False
        for line in obj.inspect_llvm(sig).splitlines():
            if line.startswith("define"):
                # skip the CPython wrappers: (un)boxing Python floats is double
                in_compiled_body = re.search(r"@(_ZN7cpython|cpython\.|cfunc\.)", line) is None
            elif line.startswith("}"):
                in_compiled_body = False
            elif in_compiled_body and "double" in line:
                bad.append(f"{name}: {line.strip()}")
print(f"checked {seen} float32 signatures")
print("\n".join(bad[:20]))
sys.exit(1 if bad or seen < 8 else 0)
"""


def test_float32_kernels_compile_to_float32_code(tmp_path):
    # a fresh process and cache dir: cached code cannot be inspected
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", _IR_CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


# ----------------------------------------------------------------------------
# CUDA kernels: PTX compilation, simulator, dispatch
# ----------------------------------------------------------------------------

def _cuda_signatures(t):
    a1, a2 = t[::1], t[:, ::1]
    return {
        "bce_with_logits": (a2, a2, t, a1, a2),
        "gaussian_nll": (a2, a2, a1, t, a1, a2, a1),
        "reparameterize_kl": (a1,) * 5,
        "reparameterize_kl_backward": (a1,) * 7,
        "adam": (a1,) * 4 + (t,) * 10,
    }


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["bce_with_logits", "gaussian_nll", "reparameterize_kl",
                                  "reparameterize_kl_backward", "adam"])
def test_cuda_kernel_compiles_to_ptx(name, dtype):
    numba = pytest.importorskip("numba")
    cuda = pytest.importorskip("numba.cuda")
    from scratchvae.kernels import cuda as ck
    t = getattr(numba, dtype)
    kernel = ck.KERNELS[name]
    ptx, restype = cuda.compile_ptx(kernel.py_func, _cuda_signatures(t)[name], cc=(8, 0))
    assert ".entry" in ptx and ".target sm_80" in ptx
    assert str(restype) == "none"
    if dtype == "float32":
        f64 = [line for line in ptx.splitlines() if ".f64" in line]
        assert not f64, f"float32 kernel {name} uses double precision:\n" + "\n".join(f64[:10])


def test_cuda_kernels_under_simulator():
    pytest.importorskip("numba.cuda")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    res = subprocess.run([sys.executable, str(HERE / "cuda_sim_check.py")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "all CUDA kernels match" in res.stdout


def test_importing_kernels_does_not_import_cuda():
    code = ("import sys, scratchvae.kernels; "
            "assert 'scratchvae.kernels.cuda' not in sys.modules; assert 'numba.cuda' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def _gpu_available():
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:
        return False


@pytest.mark.skipif(_gpu_available(), reason="a GPU is available here")
def test_cuda_path_without_gpu_raises_clearly():
    with pytest.raises(BackendUnavailable, match="GPU|numba-cuda"):
        kernels.cuda_module()


@pytest.mark.skipif(not _gpu_available(), reason="needs a CUDA GPU")
def test_cupy_dispatch_matches_plain():
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(5)
    for dtype in DTYPES:
        logits, x = bce_data(rng, 33, 300, dtype)
        ls = rng.uniform(-1, 1, 300).astype(dtype)
        mu, lsz, eps = reparam_data(rng, 17, 9, dtype)
        dz = rng.standard_normal(mu.shape).astype(dtype)
        w = rng.uniform(0, 1, 9).astype(dtype)
        cases = [
            ("bce_with_logits", (logits, x, 0.5)),
            ("gaussian_nll", (logits, x, ls, 0.5)),
            ("gaussian_nll", (logits, x, ls[:1].copy(), 0.5)),
            ("reparameterize_kl", (mu, lsz, eps)),
            ("reparameterize_kl_backward", (dz, mu, lsz, eps, w)),
        ]
        for name, args in cases:
            want = getattr(losses, name)(*args)
            dev = [cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
            got = getattr(kernels, name)(*dev)
            for g, wnt in zip(got, want):
                assert isinstance(g, cupy.ndarray)
                np.testing.assert_allclose(cupy.asnumpy(g), wnt, rtol=RTOL[dtype] * 10,
                                           atol=ATOL[dtype] * 10 * float(np.max(np.abs(wnt))), err_msg=name)
        p = rng.standard_normal((40, 30)).astype(dtype)
        gp, m, v = cupy.asarray(p), cupy.zeros(p.shape, dtype), cupy.zeros(p.shape, dtype)
        m1, v1 = np.zeros_like(p), np.zeros_like(p)
        hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
        for step in range(1, 51):
            g = rng.standard_normal(p.shape).astype(dtype)
            optim.adam_update(p, g, m1, v1, step=step, **hyper)
            kernels.adam_update(gp, cupy.asarray(g), m, v, step=step, **hyper)
        np.testing.assert_allclose(cupy.asnumpy(gp), p, rtol=RTOL[dtype] * 10, atol=ATOL[dtype] * 10)


# ----------------------------------------------------------------------------
# benchmark: python tests/test_kernels.py --bench
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adam_update_many_equals_one_call_per_parameter(dtype):
    shapes = [(7, 5), (5,), (3, 2, 4), (1,)]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01)

    def fresh():
        r = np.random.default_rng(4)
        return [[r.standard_normal(s).astype(dtype) for s in shapes] for _ in range(4)]
    (p1, g1, m1, v1), (p2, g2, m2, v2) = fresh(), fresh()
    for a in m1 + v1 + m2 + v2:
        a[...] = np.abs(a)
    for step in (1, 2, 3):
        for quad in zip(p1, g1, m1, v1):
            kernels.adam_update(*quad, step=step, **hyper)
        kernels.adam_update_many(p2, g2, m2, v2, step=step, **hyper)
    for a, b in zip(p1 + m1 + v1, p2 + m2 + v2):
        np.testing.assert_array_equal(a, b)


def test_adam_update_many_checks_its_arguments():
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    a, b = np.zeros(3, np.float32), np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="need one of each per parameter"):
        kernels.adam_update_many([a, b], [a], [a, b], [a, b], **hyper)
    with pytest.raises(TypeError, match="parameter 1 is float64, parameter 0 is float32"):
        c = np.zeros(3)
        kernels.adam_update_many([a, c], [a, c], [a.copy(), c.copy()], [a.copy(), c.copy()], **hyper)
    with pytest.raises(ValueError, match="grad has shape"):
        kernels.adam_update_many([b], [a], [b.copy()], [b.copy()], **hyper)
    with pytest.raises(ValueError, match="param 0 must be C-contiguous"):
        kernels.adam_update_many([b.T], [b.T], [b.T.copy()], [b.T.copy()], **hyper)
    kernels.adam_update_many([], [], [], [], **hyper)   # nothing to do
