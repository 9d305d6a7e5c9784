"""Run every CUDA kernel of scratchvae.kernels.cuda under the CUDA simulator.

Usage (the variable must be set before numba is imported, hence a separate
process; tests/test_kernels.py runs it with ``sys.executable``)::

    NUMBA_ENABLE_CUDASIM=1 python tests/cuda_sim_check.py

The simulator runs each thread as a Python thread, so the arrays are tiny
(B=4, D=12, L=3).  It compares against scratchvae.losses in float32 and
float64, through the ``*_into`` launch wrappers with small blocks and
through raw launches with fewer blocks than rows/elements (to exercise the
grid-stride loops).  Prints one line per check; exits 1 on any mismatch.
"""
from __future__ import annotations

import os
import sys

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    sys.exit("cuda_sim_check.py: run with NUMBA_ENABLE_CUDASIM=1 in the environment")

import numpy as np  # noqa: E402
from scratchvae.kernels import cuda as ck  # noqa: E402

from scratchvae import losses, optim  # noqa: E402

B, D, L = 4, 12, 3
RTOL = {np.float32: 2e-5, np.float64: 1e-12}
failures = []


def compare(label, got, want, dtype):
    got = np.asarray(got)
    want = np.asarray(want)
    ok = got.dtype == want.dtype and got.shape == want.shape and np.allclose(
        got, want, rtol=RTOL[dtype], atol=RTOL[dtype] * max(1.0, float(np.max(np.abs(want)))) * 1e-3)
    err = float(np.max(np.abs(got.astype(np.float64) - want) / np.maximum(np.abs(want), 1e-30)))
    print(f"{'ok ' if ok else 'BAD'} {label:<46} max rel err {err:.2e}")
    if not ok:
        failures.append(label)


def run(dtype):
    rng = np.random.default_rng(7)
    name = np.dtype(dtype).name

    # BCE, including extreme logits
    logits = (4 * rng.standard_normal((B, D))).astype(dtype)
    logits[0, :4] = [1e4, -1e4, 1e4, -1e4]
    x = rng.random((B, D)).astype(dtype)
    x[0, :4] = [0, 0, 1, 1]
    want = losses.bce_with_logits(logits, x, 0.25)
    for threads in (16, 4):
        nll, dl = np.empty(B, dtype), np.empty((B, D), dtype)
        ck.bce_with_logits_into(logits, x, 0.25, nll, dl, threads=threads)
        compare(f"{name} bce nll (threads={threads})", nll, want[0], dtype)
        compare(f"{name} bce dlogits (threads={threads})", dl, want[1], dtype)
    nll, dl = np.empty(B, dtype), np.empty((B, D), dtype)
    ck.bce_with_logits_kernel[2, 8](logits, x, dtype(0.25), nll, dl)  # 2 blocks for 4 rows
    compare(f"{name} bce raw [2, 8] nll", nll, want[0], dtype)
    compare(f"{name} bce raw [2, 8] dlogits", dl, want[1], dtype)

    # Gaussian, per-pixel and shared log_sigma
    mean = rng.standard_normal((B, D)).astype(dtype)
    xg = rng.standard_normal((B, D)).astype(dtype)
    for shape in ((D,), (1,)):
        log_sigma = (0.5 * rng.standard_normal(shape)).astype(dtype)
        want = losses.gaussian_nll(mean, xg, log_sigma, 0.5)
        nll, dm, dls = np.empty(B, dtype), np.empty((B, D), dtype), np.full(shape, np.nan, dtype)
        ck.gaussian_nll_into(mean, xg, log_sigma, 0.5, nll, dm, dls, threads=8)
        for label, g, w in zip(("nll", "dmean", "dlog_sigma"), (nll, dm, dls), want):
            compare(f"{name} gaussian {label} log_sigma{shape}", g, w, dtype)
        nll, dm, dls = np.empty(B, dtype), np.empty((B, D), dtype), np.zeros(shape, dtype)
        ck.gaussian_nll_kernel[3, 4](mean, xg, log_sigma, dtype(0.5), nll, dm, dls)
        for label, g, w in zip(("nll", "dmean", "dlog_sigma"), (nll, dm, dls), want):
            compare(f"{name} gaussian raw [3, 4] {label} {shape}", g, w, dtype)

    # reparameterization forward and backward, log_sigma across [-20, 20]
    mu = rng.standard_normal((B, L)).astype(dtype)
    ls = np.linspace(-20, 20, B * L).reshape(B, L).astype(dtype)
    ls[0] = [1e-4, -3e-3, 0.3]
    eps = rng.standard_normal((B, L)).astype(dtype)
    want = losses.reparameterize_kl(mu, ls, eps)
    z, kl = np.empty((B, L), dtype), np.empty((B, L), dtype)
    ck.reparameterize_kl_into(mu, ls, eps, z, kl, threads=8)
    compare(f"{name} reparam z", z, want[0], dtype)
    compare(f"{name} reparam kl", kl, want[1], dtype)
    z, kl = np.empty(B * L, dtype), np.empty(B * L, dtype)
    ck.reparameterize_kl_kernel[1, 4](mu.ravel(), ls.ravel(), eps.ravel(), z, kl)
    compare(f"{name} reparam raw [1, 4] kl", kl.reshape(B, L), want[1], dtype)

    dz = rng.standard_normal((B, L)).astype(dtype)
    w = np.array([0.3, 0.0, 1.5], dtype)
    want = losses.reparameterize_kl_backward(dz, mu, ls, eps, w)
    dmu, dls = np.empty((B, L), dtype), np.empty((B, L), dtype)
    ck.reparameterize_kl_backward_into(dz, mu, ls, eps, w, dmu, dls, threads=8)
    compare(f"{name} reparam backward dmu", dmu, want[0], dtype)
    compare(f"{name} reparam backward dlog_sigma", dls, want[1], dtype)
    dmu, dls = np.empty(B * L, dtype), np.empty(B * L, dtype)
    ck.reparameterize_kl_backward_kernel[1, 4](dz.ravel(), mu.ravel(), ls.ravel(), eps.ravel(), w, dmu, dls)
    compare(f"{name} reparam backward raw [1, 4] dlog_sigma", dls.reshape(B, L), want[1], dtype)

    # Adam: 5 steps against the plain update
    p_plain = rng.standard_normal((5, 7)).astype(dtype)
    p_fused = p_plain.copy()
    m1, v1 = np.zeros_like(p_plain), np.zeros_like(p_plain)
    m2, v2 = np.zeros_like(p_plain), np.zeros_like(p_plain)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    for step in range(1, 6):
        g = rng.standard_normal(p_plain.shape).astype(dtype)
        optim.adam_update(p_plain, g, m1, v1, step=step, **hyper)
        ck.adam_update_into(p_fused, g, m2, v2, step=step, threads=8, **hyper)
    compare(f"{name} adam param after 5 steps", p_fused, p_plain, dtype)
    compare(f"{name} adam m", m2, m1, dtype)
    compare(f"{name} adam v", v2, v1, dtype)


def check_streams():
    """Every launch wrapper launches on the stream it is given (the public functions pass CuPy's
    current stream): each kernel's launch configuration is recorded, then the results are compared."""
    from numba import cuda
    stream = cuda.stream()
    seen = {}
    originals = {name: getattr(ck, name) for name in ("bce_with_logits_kernel", "gaussian_nll_kernel",
                                                      "reparameterize_kl_kernel",
                                                      "reparameterize_kl_backward_kernel", "adam_kernel")}

    class Recording:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, config):
            seen[self.name] = config[2] if len(config) > 2 else 0
            return self.kernel[config]

    for name, kernel in originals.items():
        setattr(ck, name, Recording(name, kernel))
    try:
        rng = np.random.default_rng(3)
        f = np.float32
        a, b = rng.standard_normal((B, D)).astype(f), rng.random((B, D)).astype(f)
        nll, dl = np.empty(B, f), np.empty((B, D), f)
        ck.bce_with_logits_into(a, b, 0.5, nll, dl, threads=16, stream=stream)
        compare("float32 bce on a stream", nll, losses.bce_with_logits(a, b, 0.5)[0], f)
        ls = (0.1 * rng.standard_normal(D)).astype(f)
        n2, dm, dls = np.empty(B, f), np.empty((B, D), f), np.empty(D, f)
        ck.gaussian_nll_into(a, b, ls, 0.5, n2, dm, dls, threads=16, stream=stream)
        compare("float32 gaussian on a stream", n2, losses.gaussian_nll(a, b, ls, 0.5)[0], f)
        mu, lsg, eps = (rng.standard_normal((B, L)).astype(f) for _ in range(3))
        z, kl = np.empty((B, L), f), np.empty((B, L), f)
        ck.reparameterize_kl_into(mu, lsg, eps, z, kl, threads=8, stream=stream)
        compare("float32 reparam on a stream", z, losses.reparameterize_kl(mu, lsg, eps)[0], f)
        dmu, dlsg = np.empty((B, L), f), np.empty((B, L), f)
        w = np.full(L, 0.25, f)
        ck.reparameterize_kl_backward_into(z, mu, lsg, eps, w, dmu, dlsg, threads=8, stream=stream)
        compare("float32 reparam backward on a stream", dmu, losses.reparameterize_kl_backward(z, mu, lsg, eps, w)[0], f)
        p1, g = rng.standard_normal(9).astype(f), rng.standard_normal(9).astype(f)
        p2, m1, v1, m2, v2 = p1.copy(), *(np.zeros(9, f) for _ in range(4))
        hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
        ck.adam_update_many_into([p2], [g], [m2], [v2], threads=8, stream=stream, **hyper)
        optim.adam_update(p1, g, m1, v1, **hyper)
        compare("float32 adam on a stream", p2, p1, f)
    finally:
        for name, kernel in originals.items():
            setattr(ck, name, kernel)
    wrong = {name: s for name, s in seen.items() if s is not stream}
    print(f"{'ok ' if not wrong and len(seen) == 5 else 'BAD'} every kernel launched on the given stream: {sorted(seen)}")
    if wrong or len(seen) != 5:
        failures.append(f"streams {wrong or seen}")


def check_flat_adam():
    """Parameters, gradients and moments laid out back to back (a model's flat buffers, Adam.init's
    moments) are updated in ONE launch, with the numbers of one update per parameter."""
    from scratchvae.backend import flat_views
    launches = []
    original = ck.adam_kernel

    class Counting:
        def __getitem__(self, config):
            launches.append(config)
            return original[config]

    rng = np.random.default_rng(5)
    f = np.float32
    shapes = {"W": (3, 4), "b": (4,), "W2": (4, 2)}
    like = {k: rng.standard_normal(s).astype(f) for k, s in shapes.items()}
    _, params = flat_views(np, like)
    _, grads = flat_views(np, {k: rng.standard_normal(s).astype(f) for k, s in shapes.items()})
    state = optim.Adam().init(params)
    apart = {k: p.copy() for k, p in params.items()}
    m_apart, v_apart = ({k: np.zeros(s, f) for k, s in shapes.items()} for _ in range(2))
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    ck.adam_kernel = Counting()
    try:
        for step in (1, 2, 3):
            ck.adam_update_many_into(list(params.values()), list(grads.values()), list(state.m.values()),
                                     list(state.v.values()), step=step, threads=8, **hyper)
    finally:
        ck.adam_kernel = original
    for step in (1, 2, 3):
        for k in shapes:
            optim.adam_update(apart[k], grads[k], m_apart[k], v_apart[k], step=step, **hyper)
    for k in shapes:
        compare(f"float32 flat adam {k} after 3 steps", params[k], apart[k], f)
    ok = len(launches) == 3
    print(f"{'ok ' if ok else 'BAD'} flat adam: {len(launches)} launches for 3 steps of 3 parameters")
    if not ok:
        failures.append(f"flat adam launches {len(launches)}")


for dt in (np.float32, np.float64):
    run(dt)
check_streams()
check_flat_adam()
if failures:
    print(f"{len(failures)} mismatches: {failures}")
    sys.exit(1)
print("all CUDA kernels match scratchvae.losses under the simulator")
