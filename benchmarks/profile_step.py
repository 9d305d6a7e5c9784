#!/usr/bin/env python
"""Where does a scratchvae training step spend its time?

One step = ``zero_grad`` + ``loss_and_grad`` (fused, ``check_data=False``,
eps given) + ``Adam.step``, float32, NumPy, real binarized-MNIST batches
(``image:B``: the 64 x 64 colour conv VAE of docs/images.md on generated
CelebA-layout images, decoded by scratchvae).

Method: manual timers, installed by wrapping library functions IN THIS
PROCESS ONLY (the library's files are untouched):

* Dense: ``affine_forward`` / ``affine_backward`` / ``Dense.backward`` are
  replaced by line-for-line copies with a timer around each statement, so
  that the ``@`` products are separated from the bias add, the bias-gradient
  sum and the ``grads += dW`` accumulation;
* convolutions: ``numpy.matmul`` (which the conv code calls as
  ``xp.matmul``), ``im2col``, ``col2im`` and the four conv forward/backward
  functions (whose remaining, *exclusive* time is the layout copies to and
  from the batch-innermost layout, the bias add and the bias gradient) and
  the ``ToCHWB``/``FromCHWB`` layers (the transposes at the ends of the
  conv stacks, counted with the layout copies);
* ReLU forward/backward; the loss kernels' validating wrappers in
  ``scratchvae.kernels`` and the Numba kernels in ``scratchvae.kernels.cpu``;
  ``Adam.step``, ``kernels.adam_update(_many)`` and the Numba Adam kernels;
  ``zero_grad``.

Timers are exclusive (a wrapped callee's time is subtracted from its
caller's), so the categories add up; "Python & other" is the step time
minus everything timed (argument checks, dict look-ups, the small
reductions in ``loss_and_grad``, timer overhead).  Before measuring, an
instrumented model and an untouched twin take one step on the same batch
and their gradients must be bit-identical (the copies are faithful).

``--cprofile`` adds cProfile's top functions by own time for the untouched
model (where ``x @ W`` counts as time of the function that runs it).

The gated models of bench_train.py (``vampprior:100``, ``iwae:100``,
``hvae:100``, the two-level model by the distribution each network computes) are
timed by part instead (encoder, heads, decoder, the prior's density, the
objective, the likelihood kernel, Adam), and for the VampPrior the
pseudo-inputs' encoder pass is measured on its own: the encoder and heads,
forward and backward, on B + K rows against B rows.

    python benchmarks/profile_step.py [--configs mlp:128,mlp:1024,conv:128,image:64] [--rounds R] [--threads N]
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import pstats
import sys
import time

try:
    from . import _common as C
except ImportError:  # run as a script
    import _common as C

# category -> group (the brief's coarse categories)
GROUPS = {
    "matmul: Dense": "matrix products",
    "matmul: conv": "matrix products",
    "im2col": "im2col/col2im",
    "col2im": "im2col/col2im",
    "conv layout copies + bias": "elementwise passes",
    "ReLU fwd/bwd": "elementwise passes",
    "Dense bias add + db sum + grads +=": "elementwise passes",
    "zero_grad": "elementwise passes",
    "loss: Numba kernels": "loss kernels",
    "loss: wrappers (validate, alloc)": "loss kernels",
    "Adam: Numba kernel": "optimizer",
    "Adam: wrappers + loop": "optimizer",
    "Python & other": "Python overhead & other",
    # the gated models (vampprior, iwae), timed by part
    "encoder (B + K rows)": "encoder",
    "heads (B + K rows)": "encoder",
    "decoder (B * S rows)": "decoder",
    "prior density": "prior & objective",
    "objective": "prior & objective",
    "likelihood (BCE kernel)": "loss kernels",
    "Adam": "optimizer",
    # the hierarchy (hvae), timed by part
    "q(z_T|x) (B + K rows)": "encoder",
    "q(z_l|x, z_l+1)": "encoder",
    "p(z_l|z_l+1)": "conditional priors",
    "decoder branches + joint": "decoder",
}


class _Frame:
    __slots__ = ("timers", "category", "children", "t0")

    def __init__(self, timers, category):
        self.timers, self.category, self.children = timers, category, 0.0

    def __enter__(self):
        self.timers.stack.append(self)
        self.t0 = self.timers.clock()
        return self

    def __exit__(self, *exc):
        timers = self.timers
        elapsed = timers.clock() - self.t0
        timers.stack.pop()
        totals = timers.totals
        totals[self.category] = totals.get(self.category, 0.0) + elapsed - self.children
        if timers.stack:
            timers.stack[-1].children += elapsed
        return False


class Timers:
    """Exclusive-time accumulators with a call stack (``with T("category"): ...``)."""

    def __init__(self):
        self.totals = {}
        self.stack = []
        self.clock = time.perf_counter

    def __call__(self, category):
        return _Frame(self, category)

    def wrap(self, category, fn):
        timers = self

        def wrapper(*args, **kwargs):
            with _Frame(timers, category):
                return fn(*args, **kwargs)

        wrapper.__wrapped__ = fn
        return wrapper

    def reset(self):
        self.totals = {}


@contextlib.contextmanager
def instrumented(T):
    """Install the timers (see the module docstring); restore everything on exit."""
    import numpy
    from scratchvae.kernels import cpu as kcpu

    from scratchvae import kernels
    from scratchvae.layers import activations, conv, dense
    from scratchvae.model_base import ModelBase
    from scratchvae.optim import Adam

    saved = []

    def patch(owner, name, value):
        saved.append((owner, name, owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)))
        setattr(owner, name, value)

    EW = "Dense bias add + db sum + grads +="
    MM = "matmul: Dense"

    # -- Dense: statement-level copies of scratchvae/layers/dense.py
    def affine_forward(x, W, b, order="C"):
        with T(MM):
            out = (W.T @ x.T).T if order == "F" else x @ W
        with T(EW):
            out += b
        return out, (x, W)

    def affine_backward(dout, cache, need_dx=True):
        x, W = cache
        with T(MM):
            if not need_dx:
                dx = None
            elif x.flags.f_contiguous and not x.flags.c_contiguous:
                dx = (W @ dout.T).T
            else:
                dx = dout @ W.T
            dW = x.T @ dout
        with T(EW):
            db = dout.sum(axis=0)
        return dx, dW, db

    def dense_backward(self, dy):
        cache = self._get_cache()
        self._check_dy(dy, (cache[0].shape[0], self.out_features))
        dx, dW, db = dense.affine_backward(dy, cache, need_dx=self.input_grad)
        with T(EW):
            self.grads["W"] += dW
            self.grads["b"] += db
        return dx

    patch(dense, "affine_forward", affine_forward)
    patch(dense, "affine_backward", affine_backward)
    patch(dense.Dense, "backward", dense_backward)

    # -- convolutions
    patch(numpy, "matmul", T.wrap("matmul: conv", numpy.matmul))
    patch(conv, "im2col", T.wrap("im2col", conv.im2col))
    patch(conv, "col2im", T.wrap("col2im", conv.col2im))
    for fname in ("conv2d_forward", "conv2d_backward", "conv_transpose2d_forward", "conv_transpose2d_backward"):
        patch(conv, fname, T.wrap("conv layout copies + bias", getattr(conv, fname)))
    from scratchvae.layers import shape as shape_layers  # ToCHWB / FromCHWB: the transposes at the stack's ends
    for cls in (shape_layers.ToCHWB, shape_layers.FromCHWB):
        for meth in ("forward", "backward"):
            patch(cls, meth, T.wrap("conv layout copies + bias", getattr(cls, meth)))

    # -- activations (ReLU only in these models)
    patch(activations.ReLU, "_forward", T.wrap("ReLU fwd/bwd", activations.ReLU._forward))
    patch(activations.ReLU, "_backward", T.wrap("ReLU fwd/bwd", activations.ReLU._backward))

    # -- loss kernels: validating wrappers, then the Numba kernels inside them
    for fname in ("bce_with_logits", "gaussian_nll", "reparameterize_kl", "reparameterize_kl_backward"):
        patch(kernels, fname, T.wrap("loss: wrappers (validate, alloc)", getattr(kernels, fname)))
    for fname in ("bce_with_logits_kernel", "gaussian_nll_kernel", "reparameterize_kl_kernel",
                  "reparameterize_kl_backward_kernel"):
        patch(kcpu, fname, T.wrap("loss: Numba kernels", getattr(kcpu, fname)))

    # -- optimizer
    patch(Adam, "step", T.wrap("Adam: wrappers + loop", Adam.step))
    patch(kernels, "adam_update", T.wrap("Adam: wrappers + loop", kernels.adam_update))
    patch(kernels, "adam_update_many", T.wrap("Adam: wrappers + loop", kernels.adam_update_many))
    patch(kcpu, "adam_kernel", T.wrap("Adam: Numba kernel", kcpu.adam_kernel))
    patch(kcpu, "adam_many_kernel", T.wrap("Adam: Numba kernel", kcpu.adam_many_kernel))

    patch(ModelBase, "zero_grad", T.wrap("zero_grad", ModelBase.zero_grad))
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


@contextlib.contextmanager
def instrumented_parts(T, model):
    """The gated models' timers: one per part of ``model`` (instance attributes, removed on exit)."""
    from scratchvae.model_base import ModelBase
    from scratchvae.optim import Adam

    if model.levels > 1:   # a hierarchy: each network under the distribution it computes
        top = "q(z_T|x) (B + K rows)"
        where = {"encoder": top, "mu": top, "log_sigma": top, "q": "q(z_l|x, z_l+1)", "p": "p(z_l|z_l+1)",
                 "decoder": "decoder branches + joint"}
        parts = [(layer, ("forward", "backward"), where.get(name.split(".")[0], where.get(name[0])))
                 for name, layer in model.parts.items() if name != "prior"]
    else:
        parts = [(model.encoder, ("forward", "backward"), "encoder (B + K rows)"),
                 (model.mu_head, ("forward", "backward"), "heads (B + K rows)"),
                 (model.log_sigma_head, ("forward", "backward"), "heads (B + K rows)"),
                 (model.decoder, ("forward", "backward"), "decoder (B * S rows)")]
    parts += [(model.prior, ("log_prob", "log_prob_backward"), "prior density"),
             (model.objective, ("reduce",), "objective"),
             (model, ("_nll_and_grad",), "likelihood (BCE kernel)")]
    for obj, names, category in parts:
        for name in names:
            setattr(obj, name, T.wrap(category, getattr(obj, name)))
    saved = [(Adam, "step", Adam.step), (ModelBase, "zero_grad", ModelBase.zero_grad)]
    Adam.step = T.wrap("Adam", Adam.step)
    ModelBase.zero_grad = T.wrap("zero_grad", ModelBase.zero_grad)
    try:
        yield
    finally:
        for obj, names, _ in parts:
            for name in names:
                delattr(obj, name)
        for owner, name, value in saved:
            setattr(owner, name, value)


def _instrument(T, model):
    return instrumented_parts(T, model) if model.samples > 1 or not model.prior.analytic else instrumented(T)


def build(kind, seed):
    from scratchvae.models import conv_vae, mlp_vae
    from scratchvae.optim import Adam
    if kind in C.GATED_MODELS:
        model = C.gated_model(kind, seed=seed)
    elif kind == "image":   # the conv VAE of docs/images.md, 64 x 64 colour
        model = conv_vae((3, C.IMAGE_SIZE, C.IMAGE_SIZE), seed=seed, **C.IMAGE_MODEL)
    else:
        model = mlp_vae(seed=seed) if kind == "mlp" else conv_vae(seed=seed)
    opt = Adam(lr=1e-3)
    return model, opt, opt.init(model.params)


def make_step(model, opt, state_box, xs, es):
    box = {"i": 0}

    def step():
        i = box["i"] % len(xs)
        box["i"] += 1
        model.zero_grad()
        model.loss_and_grad(xs[i], eps=es[i], check_data=False)
        state_box[0] = opt.step(model.params, model.grads, state_box[0])

    return step


def verify_faithful(kind, seed, x, eps, T):
    """An instrumented step must give bit-identical gradients and parameters."""
    import numpy as np
    results = []
    for inst in (False, True):
        model, opt, state = build(kind, seed)
        ctx = _instrument(T, model) if inst else contextlib.nullcontext()
        with ctx:
            model.zero_grad()
            loss, _ = model.loss_and_grad(x, eps=eps, check_data=False)
            grads = {k: g.copy() for k, g in model.grads.items()}
            opt.step(model.params, model.grads, state)
        results.append((loss, grads, {k: p.copy() for k, p in model.params.items()}))
    (l0, g0, p0), (l1, g1, p1) = results
    T.reset()
    same = l0 == l1 and all(np.array_equal(g0[k], g1[k]) for k in g0) and all(np.array_equal(p0[k], p1[k]) for k in p0)
    if not same:
        raise AssertionError(f"{kind}: the instrumented step differs from the library's step; "
                             "the statement copies in profile_step.py are out of date")
    return True


def profile_config(kind, B, X, args, log):
    import numpy as np
    gen = np.random.default_rng(args.seed + B)
    # the gated models cycle through 64 batches, as bench_train.py does: a few batches trained on again and
    # again are memorized, and their saturated logits make subnormal gradients that no real run has
    pool = 64 if kind in C.GATED_MODELS else 4
    xs = [np.ascontiguousarray(X[gen.choice(X.shape[0], B, replace=False)]) for _ in range(pool)]
    model, opt, state = build(kind, args.seed)
    es = [gen.standard_normal(model.noise_shape(B), dtype=np.float32) for _ in range(pool)]
    T = Timers()
    verify_faithful(kind, args.seed, xs[0], es[0], T)

    box = [state]
    step = make_step(model, opt, box, xs, es)
    for _ in range(args.warmup):
        step()
    n, one = C.calibrate(step, args.block_seconds, 10000)

    rounds = []
    for _ in range(args.rounds):
        # untouched step time, then the instrumented breakdown, alternating
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        plain = (time.perf_counter() - t0) / n
        T.reset()
        with _instrument(T, model):
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            total = (time.perf_counter() - t0) / n
        cats = {k: v / n for k, v in T.totals.items()}
        cats["Python & other"] = max(0.0, total - sum(cats.values()))
        rounds.append({"plain_step_s": plain, "instrumented_step_s": total, "categories_s": cats})

    names = [c for c in GROUPS if any(c in r["categories_s"] for r in rounds)]
    med = {c: C.median([r["categories_s"].get(c, 0.0) for r in rounds]) for c in names}
    pct = {c: C.median([100 * r["categories_s"].get(c, 0.0) / r["instrumented_step_s"] for r in rounds])
           for c in names}
    groups = {}
    for r in rounds:
        g = {}
        for c, v in r["categories_s"].items():
            g[GROUPS[c]] = g.get(GROUPS[c], 0.0) + 100 * v / r["instrumented_step_s"]
        for k, v in g.items():
            groups.setdefault(k, []).append(v)
    res = {"model": kind, "batch": B, "steps_per_round": n, "rounds": rounds,
           "median": {"plain_step_s": C.median([r["plain_step_s"] for r in rounds]),
                      "instrumented_step_s": C.median([r["instrumented_step_s"] for r in rounds]),
                      "categories_s": med, "categories_percent": pct,
                      "groups_percent": {k: C.median(v) for k, v in groups.items()}}}
    if model.prior.encoder_inputs() is not None and model.levels == 1:
        res["pseudo_inputs_pass"] = pseudo_inputs_pass(model, xs[0], args, res["median"]["plain_step_s"])
    if args.cprofile:
        prof = cProfile.Profile()
        k = max(1, n)
        prof.enable()
        for _ in range(k):
            step()
        prof.disable()
        st = pstats.Stats(prof)
        rows = []
        for (fn_file, line, fname), (_, nc, tt, ct, _) in st.stats.items():
            rows.append({"function": f"{fname} ({fn_file.split('/')[-1]}:{line})", "calls_per_step": nc / k,
                         "tottime_per_step_s": tt / k, "cumtime_per_step_s": ct / k})
        rows.sort(key=lambda r: -r["tottime_per_step_s"])
        res["cprofile_top"] = rows[:args.cprofile_top]
    log(f"  {kind} B={B}: step {res['median']['plain_step_s'] * 1e3:.2f} ms "
        f"(instrumented {res['median']['instrumented_step_s'] * 1e3:.2f} ms), {args.rounds} rounds of {n} steps")
    return res


def pseudo_inputs_pass(model, x, args, step_s):
    """The VampPrior's new cost: the encoder and heads, forward and backward, on the B + K rows of a step
    against the B rows of the batch alone (the standard prior's pass), alternating; the difference is
    the pseudo-inputs' pass."""
    import numpy as np
    rows = {"batch": x, "batch + pseudo-inputs": np.concatenate([x, model.prior.pseudo_inputs()])}

    def one_pass(xin):
        h = model.encoder.forward(xin)
        mu, log_sigma = model.mu_head.forward(h), model.log_sigma_head.forward(h)
        dh = model.mu_head.backward(np.ones_like(mu))
        dh += model.log_sigma_head.backward(np.ones_like(log_sigma))
        model.encoder.backward(dh)

    steps = {k: C.calibrate(lambda v=v: one_pass(v), args.block_seconds / 4, 10000)[0] for k, v in rows.items()}
    times = {k: [] for k in rows}
    for _ in range(args.rounds):
        for k, v in rows.items():
            t0 = time.perf_counter()
            for _ in range(steps[k]):
                one_pass(v)
            times[k].append((time.perf_counter() - t0) / steps[k])
    model.zero_grad()
    med = {k: C.median(v) for k, v in times.items()}
    extra = med["batch + pseudo-inputs"] - med["batch"]
    return {"rows": {k: int(v.shape[0]) for k, v in rows.items()}, "per_round_s": times,
            "encoder_pass_s": med, "pseudo_inputs_s": extra, "pseudo_inputs_percent_of_step": 100 * extra / step_s}


def tables(results) -> str:
    out = []
    for r in results:
        m = r["median"]
        rows = [[c, GROUPS[c], f"{m['categories_s'][c] * 1e3:.3f}", f"{m['categories_percent'][c]:.1f}"]
                for c in m["categories_s"]]
        rows.sort(key=lambda row: -float(row[3]))
        out.append(f"{r['model']} B={r['batch']}: step {m['plain_step_s'] * 1e3:.2f} ms untouched, "
                   f"{m['instrumented_step_s'] * 1e3:.2f} ms instrumented (median of {len(r['rounds'])} rounds)")
        out.append(C.fmt_table(["category", "group", "ms/step", "% of step"], rows))
        g = sorted(m["groups_percent"].items(), key=lambda kv: -kv[1])
        out.append("groups: " + ", ".join(f"{k} {v:.1f}%" for k, v in g))
        if "pseudo_inputs_pass" in r:
            pp = r["pseudo_inputs_pass"]
            out.append("the encoder and heads, forward and backward: "
                       + ", ".join(f"{k} ({pp['rows'][k]} rows) {v * 1e3:.2f} ms" for k, v in pp["encoder_pass_s"].items())
                       + f"; the pseudo-inputs' pass {pp['pseudo_inputs_s'] * 1e3:.2f} ms "
                       f"= {pp['pseudo_inputs_percent_of_step']:.0f}% of the step")
        if "cprofile_top" in r:
            out.append("cProfile, top functions by own time (per step):")
            out.append(C.fmt_table(["function", "calls", "own ms", "cum ms"],
                                   [[x["function"][:70], f"{x['calls_per_step']:.0f}",
                                     f"{x['tottime_per_step_s'] * 1e3:.3f}", f"{x['cumtime_per_step_s'] * 1e3:.3f}"]
                                    for x in r["cprofile_top"]]))
        out.append("")
    return "\n".join(out)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="mlp:128,mlp:1024,conv:128", help="comma list of model:batch (mlp, conv, image, vampprior, iwae, hvae)")
    p.add_argument("--quick", action="store_true", help="2 short rounds")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 5, --quick 2)")
    p.add_argument("--block-seconds", type=float, default=None, help="steps per round: about this long (default 1 s)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cprofile", action="store_true", help="also print cProfile's top functions")
    p.add_argument("--cprofile-top", type=int, default=15)
    C.add_common_args(p, default_json_name="profile_step")
    return p


def main(argv=None, log=print) -> dict:
    args = build_parser().parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.block_seconds is None:
        args.block_seconds = 0.1 if args.quick else 1.0
    configs = []
    for item in args.configs.split(","):
        kind, _, b = item.strip().partition(":")
        if kind not in ("mlp", "conv", "image", *C.GATED_MODELS) or not b.isdigit():
            raise SystemExit(f"bad --configs item {item!r}; expected mlp:128, conv:128, image:64, vampprior:100 "
                             "or iwae:100")
        configs.append((kind, int(b)))
    env_note = C.preset_thread_env(args.threads)
    import numpy  # noqa: F401

    report = {"script": "profile_step", "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "argv": list(argv) if argv is not None else sys.argv[1:], "machine": C.machine_info(),
              "versions": C.versions(None),
              "config": {"rounds": args.rounds, "block_seconds": args.block_seconds, "configs": configs,
                         "seed": args.seed, "thread_env": env_note},
              "load_average": {"start": C.load_average()}, "warnings": [], "results": []}
    warn = C.busy_warning(args.threads)
    if warn:
        report["warnings"].append(warn)
    t_start = time.perf_counter()
    X = C.mnist("train") if any(kind != "image" for kind, _ in configs) else None
    X_image = C.image_data() if any(kind == "image" for kind, _ in configs) else None
    with C.thread_limits(args.threads) as tinfo:
        report["threads"] = tinfo
        for kind, B in configs:
            report["results"].append(profile_config(kind, B, X_image if kind == "image" else X, args, log))
    report["load_average"]["end"] = C.load_average()
    report["seconds"] = time.perf_counter() - t_start
    out = C.write_json(args.json or C.default_json_path("profile_step"), report)
    log("")
    log(tables(report["results"]))
    log(f"threads {tinfo['numpy_blas']}; load average start {report['load_average']['start']} "
        f"end {report['load_average']['end']}; {report['seconds']:.0f} s; JSON: {out}")
    report["json_path"] = str(out)
    return report


if __name__ == "__main__":
    main()
