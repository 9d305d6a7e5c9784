#!/usr/bin/env python
"""The fused Numba kernels (scratchvae.kernels) vs the plain array code (scratchvae.losses).

Cases (float32, NumPy):

* ``bce_with_logits`` at (128, 784) and (1024, 784), real binarized-MNIST targets;
* ``gaussian_nll`` at (128, 784) with a learned per-pixel log sigma;
* ``reparameterize_kl`` and ``reparameterize_kl_backward`` at (128, 20) and (1024, 20);
* ``adam_update`` on one 784x400 parameter;
* ``Adam.step`` over the whole mlp_vae (784-400-20) parameter set (fused=False vs fused=True,
  the Python loop over its 10 arrays included, as in training).

Both versions of a case alternate, round after round, in blocks of about
``--block-seconds``; the report is the median over rounds of the per-round
ratio plain time / fused time (> 1: the fused kernel is faster), and every
per-round time is kept in the JSON.

    python benchmarks/bench_kernels.py [--quick] [--rounds R] [--json PATH]
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time

try:
    from . import _common as C
except ImportError:  # run as a script
    import _common as C


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 rounds of short blocks")
    p.add_argument("--rounds", type=int, default=None, help="alternation rounds (default 15, --quick 3)")
    p.add_argument("--block-seconds", type=float, default=None, help="block length (default 0.1 s, --quick 0.02 s)")
    p.add_argument("--cases", default=None, help="comma list of case-name prefixes to run (default: all)")
    C.add_common_args(p, default_json_name="bench_kernels")
    return p


def make_cases(seed):
    """[(name, plain callable, fused callable, bytes moved per call)]."""
    import numpy as np

    from scratchvae import kernels, losses, optim
    from scratchvae.models import mlp_vae
    from scratchvae.optim import Adam

    gen = np.random.default_rng(seed)
    X = C.mnist("train")
    f32 = np.float32
    cases = []

    def check(name, a, b):
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5, err_msg=name)

    for B in (128, 1024):
        logits = (3 * gen.standard_normal((B, 784))).astype(f32)
        x = np.ascontiguousarray(X[:B])
        scale = 1.0 / B
        check("bce", losses.bce_with_logits(logits, x, scale), kernels.bce_with_logits(logits, x, scale))
        cases.append((f"bce_with_logits ({B},784)",
                      lambda logits=logits, x=x, scale=scale: losses.bce_with_logits(logits, x, scale),
                      lambda logits=logits, x=x, scale=scale: kernels.bce_with_logits(logits, x, scale),
                      logits.nbytes * 3 + B * 4))

    mean = gen.random((128, 784), dtype=f32)
    xg = np.ascontiguousarray(X[:128])
    ls = (0.1 * gen.standard_normal(784)).astype(f32)
    check("gaussian", losses.gaussian_nll(mean, xg, ls, 1 / 128), kernels.gaussian_nll(mean, xg, ls, 1 / 128))
    cases.append(("gaussian_nll (128,784)",
                  lambda: losses.gaussian_nll(mean, xg, ls, 1 / 128),
                  lambda: kernels.gaussian_nll(mean, xg, ls, 1 / 128), mean.nbytes * 3))

    for B in (128, 1024):
        mu = gen.standard_normal((B, 20), dtype=f32)
        lsig = (0.5 * gen.standard_normal((B, 20))).astype(f32)
        eps = gen.standard_normal((B, 20), dtype=f32)
        dz = gen.standard_normal((B, 20), dtype=f32)
        w = np.full(20, 1.0 / B, f32)
        check("reparam", losses.reparameterize_kl(mu, lsig, eps), kernels.reparameterize_kl(mu, lsig, eps))
        check("reparam_bwd", losses.reparameterize_kl_backward(dz, mu, lsig, eps, w),
              kernels.reparameterize_kl_backward(dz, mu, lsig, eps, w))
        cases.append((f"reparameterize_kl ({B},20)",
                      lambda mu=mu, lsig=lsig, eps=eps: losses.reparameterize_kl(mu, lsig, eps),
                      lambda mu=mu, lsig=lsig, eps=eps: kernels.reparameterize_kl(mu, lsig, eps), mu.nbytes * 5))
        cases.append((f"reparameterize_kl_backward ({B},20)",
                      lambda dz=dz, mu=mu, lsig=lsig, eps=eps, w=w: losses.reparameterize_kl_backward(dz, mu, lsig, eps, w),
                      lambda dz=dz, mu=mu, lsig=lsig, eps=eps, w=w: kernels.reparameterize_kl_backward(dz, mu, lsig, eps, w),
                      mu.nbytes * 6))

    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=10)

    def adam_arrays():
        p = gen.standard_normal((784, 400), dtype=f32)
        g = gen.standard_normal((784, 400), dtype=f32)
        return p, g, np.zeros_like(p), np.zeros_like(p)

    ap, ag, am, av = adam_arrays()
    bp, bg, bm, bv = adam_arrays()
    cases.append(("adam_update 784x400",
                  lambda: optim.adam_update(ap, ag, am, av, **hyper),
                  lambda: kernels.adam_update(bp, bg, bm, bv, **hyper), ap.nbytes * 7))

    models, states = [], []
    for fused in (False, True):
        m = mlp_vae(seed=seed)
        for g in m.grads.values():
            g[...] = gen.standard_normal(g.shape, dtype=f32) * 1e-2
        opt = Adam(lr=1e-3, fused=fused)
        models.append((m, opt))
        states.append(opt.init(m.params))
    nbytes = sum(p.nbytes for p in models[0][0].params.values()) * 7

    def adam_step(k):
        m, opt = models[k]
        states[k] = opt.step(m.params, m.grads, states[k])

    cases.append((f"Adam.step mlp_vae ({len(models[0][0].params)} arrays, {models[0][0].num_params():,} params)",
                  lambda: adam_step(0), lambda: adam_step(1), nbytes))
    return cases


def main(argv=None, log=print) -> dict:
    args = build_parser().parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 15
    if args.block_seconds is None:
        args.block_seconds = 0.02 if args.quick else 0.1
    env_note = C.preset_thread_env(args.threads)
    import numpy  # noqa: F401

    report = {"script": "bench_kernels", "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "argv": list(argv) if argv is not None else sys.argv[1:], "machine": C.machine_info(),
              "versions": C.versions(None),
              "config": {"rounds": args.rounds, "block_seconds": args.block_seconds, "dtype": "float32",
                         "seed": args.seed, "thread_env": env_note},
              "load_average": {"start": C.load_average()}, "warnings": [], "results": []}
    warn = C.busy_warning(args.threads)
    if warn:
        report["warnings"].append(warn)
    t_start = time.perf_counter()
    with C.thread_limits(args.threads) as tinfo:
        report["threads"] = tinfo
        cases = make_cases(args.seed)
        if args.cases:
            prefixes = [c.strip() for c in args.cases.split(",") if c.strip()]
            cases = [c for c in cases if any(c[0].startswith(p) for p in prefixes)]
        for name, plain, fused, nbytes in cases:
            for _ in range(3):                  # warm-up: JIT compile (or load the cache), allocator
                plain()
                fused()
            steps = {"plain": C.calibrate(plain, args.block_seconds, 100000)[0],
                     "fused": C.calibrate(fused, args.block_seconds, 100000)[0]}
            times = C.alternate({"plain": plain, "fused": fused}, args.rounds, steps)
            speedup = C.ratios(times["plain"], times["fused"])
            med = {"plain_s": C.median(times["plain"]), "fused_s": C.median(times["fused"]),
                   "speedup": C.median(speedup)}
            med["fused_gb_per_s"] = nbytes / med["fused_s"] / 1e9
            med["plain_gb_per_s"] = nbytes / med["plain_s"] / 1e9
            report["results"].append({"case": name, "bytes_per_call": nbytes, "steps_per_block": steps,
                                      "per_round": {"plain_s": times["plain"], "fused_s": times["fused"],
                                                    "speedup": speedup, "load": times["load"]},
                                      "median": med})
            log(f"  {name}: plain {med['plain_s'] * 1e6:.1f} us, fused {med['fused_s'] * 1e6:.1f} us, "
                f"x{med['speedup']:.2f}")
    report["load_average"]["end"] = C.load_average()
    report["seconds"] = time.perf_counter() - t_start
    out = C.write_json(args.json or C.default_json_path("bench_kernels"), report)
    rows = [[r["case"], f"{r['median']['plain_s'] * 1e6:.1f}", f"{r['median']['fused_s'] * 1e6:.1f}",
             f"{r['median']['speedup']:.2f}", f"{r['median']['fused_gb_per_s']:.1f}",
             f"{min(r['per_round']['speedup']):.2f}-{max(r['per_round']['speedup']):.2f}"]
            for r in report["results"]]
    log("")
    log(C.fmt_table(["case", "plain us", "fused us", "speedup (median)", "fused GB/s", "per-round range"], rows))
    log(f"\nload average start {report['load_average']['start']} end {report['load_average']['end']}; "
        f"{report['seconds']:.0f} s; JSON: {out}")
    report["json_path"] = str(out)
    return report


if __name__ == "__main__":
    main()
