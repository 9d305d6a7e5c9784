#!/usr/bin/env python
"""Training-step throughput: scratchvae vs PyTorch (same architecture, same init, same loss).

One step = ``zero_grad`` + ``loss_and_grad`` (fused kernels, ``check_data=False``,
eps given) + an Adam step, on real binarized-MNIST batches (float32).  The
PyTorch twin has the same layers with the weights copied from the scratchvae
model, the same loss (BCE with logits summed over pixels and averaged over
the batch, plus the analytic KL with ``z = mu + exp(log_sigma) * eps``) and
``torch.optim.Adam(lr=1e-3)``; both sides get the very same batches and eps.

Timing design (meant to withstand a noisy machine): after a warm-up, the sides
ALTERNATE within one run, round after round: a block of scratchvae steps, a
block of PyTorch steps, a block of the matmul "floor".  Each block lasts about
``--block-seconds``.  Every per-round figure is kept; the report is the MEDIAN
of the per-round ratios (speedup = torch time / scratchvae time; floor
multiple = scratchvae time / floor time).

The floor is the time of the step's matrix products alone, NumPy's BLAS,
float32, the same shapes (and the same transposed views) as the real step,
into preallocated outputs: for each Dense layer ``x @ W``, ``dy @ W.T`` and
``x.T @ dy``; for the convolutions the im2col products of
scratchvae.layers.conv.  ``floor`` counts every product scratchvae computes;
``floor_needed`` drops the input gradient of the first layer, which no one
uses (scratchvae computes it today).

Usage::

    python benchmarks/bench_train.py                      # full run (~3-5 min on 2 cores)
    python benchmarks/bench_train.py --quick              # a quick look
    python benchmarks/bench_train.py --threads 1 --models mlp --batches 128
    python benchmarks/bench_train.py --no-torch           # NumPy figures + floor only

Threads: ``--threads N`` (default ``os.cpu_count()``) pins NumPy's BLAS through
threadpoolctl (or, without it, the ``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS``
variables, set before NumPy is imported when this file runs as a script) and
calls ``torch.set_num_threads(N)``.  NumPy here uses OpenBLAS (see
``numpy.show_config()``; the JSON records threadpoolctl's view), PyTorch's CPU
wheel uses MKL + oneDNN with OpenMP threads.
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
import time

try:
    from . import _common as C
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import _common as C

TARGETS = {("mlp", 128): {"speedup_vs_torch": 2.0, "floor_multiple": 1.25},
           ("mlp", 1024): {"speedup_vs_torch": 1.3},
           ("conv", 128): {"speedup_vs_torch": 1.0},
           ("conv", 1024): {"speedup_vs_torch": 1.0}}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 rounds of short blocks (a quick look, noisy)")
    p.add_argument("--rounds", type=int, default=None, help="alternation rounds (default 7, --quick 3)")
    p.add_argument("--block-seconds", type=float, default=None,
                   help="target length of one block of steps (default 0.75 s, --quick 0.15 s)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per side (default 3, --quick 1)")
    p.add_argument("--models", default="mlp,conv", help="comma list of mlp, conv")
    p.add_argument("--batches", default="128,1024", help="comma list of batch sizes")
    p.add_argument("--no-gpu", action="store_true", help="skip the CuPy / torch CUDA comparison")
    C.add_common_args(p, default_json_name="bench_train")
    return p


# -- the scratchvae side -------------------------------------------------------------------

def build_model(kind, backend, seed, dtype="float32"):
    from scratchvae.vae import conv_vae, mlp_vae
    if kind == "mlp":
        return mlp_vae(784, hidden=(400,), latent_dim=20, activation="relu", backend=backend, seed=seed, dtype=dtype)
    if kind == "conv":
        return conv_vae((1, 28, 28), channels=(32, 64), latent_dim=20, backend=backend, seed=seed, dtype=dtype)
    raise ValueError(f"unknown model {kind!r}; choose mlp or conv")


class Batches:
    """``count`` fixed real batches and eps arrays, cycled through by both sides."""

    def __init__(self, X, B, L, seed, count=8):
        import numpy as np
        gen = np.random.default_rng(seed)
        self.x = [np.ascontiguousarray(X[gen.choice(X.shape[0], B, replace=False)]) for _ in range(count)]
        self.eps = [gen.standard_normal((B, L), dtype=np.float32) for _ in range(count)]
        self.count = count


def scratch_stepper(model, batches, xp_put=lambda a: a):
    from scratchvae.optim import Adam
    opt = Adam(lr=1e-3, fused=True)
    box = {"state": opt.init(model.params), "i": 0, "loss": None}
    xs = [xp_put(a) for a in batches.x]
    es = [xp_put(a) for a in batches.eps]
    n = batches.count

    def step():
        i = box["i"] % n
        box["i"] += 1
        model.zero_grad()
        loss, _ = model.loss_and_grad(xs[i], eps=es[i], check_data=False)
        box["state"] = opt.step(model.params, model.grads, box["state"])
        box["loss"] = loss

    return step, box


def torch_stepper(torch, net, batches, device="cpu"):
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xs = [torch.from_numpy(a).to(device) for a in batches.x]
    es = [torch.from_numpy(a).to(device) for a in batches.eps]
    n = batches.count
    box = {"i": 0, "loss": None, "optimizer": repr(opt.defaults)}

    def step():
        i = box["i"] % n
        box["i"] += 1
        opt.zero_grad(set_to_none=True)
        loss = net.loss(xs[i], es[i])
        loss.backward()
        opt.step()
        box["loss"] = loss

    return step, box


# -- the matmul floor ---------------------------------------------------------------------------

def matmul_products(model, B):
    """The (a_shape, b_shape, a_transposed, b_transposed, role, first_layer) products of one training step.

    Mirrors scratchvae.layers.dense.affine_forward/affine_backward and the
    products of scratchvae.layers.conv, in the order the step runs them.
    """
    from scratchvae.layers import Conv2d, ConvTranspose2d, Dense, Sequential

    layers = []

    def walk(layer, shape):
        """Collect (layer, input shape) along the forward pass; returns the output shape."""
        if isinstance(layer, Sequential):
            for child in layer.layers:
                shape = walk(child, shape)
            return shape
        if isinstance(layer, Dense):
            layers.append((layer, shape))
            return (shape[0], layer.out_features)
        if isinstance(layer, (Conv2d, ConvTranspose2d)):
            layers.append((layer, shape))
            Ho, Wo = layer.output_size(shape[2:])
            return (shape[0], layer.out_channels, Ho, Wo)
        if type(layer).__name__ in ("Reshape", "ToCHWB"):    # shapes are tracked in NCHW order
            return (shape[0],) + layer.shape
        if type(layer).__name__ in ("Flatten", "FromCHWB"):
            return (shape[0], math.prod(shape[1:]))
        return shape                     # elementwise

    shape = walk(model.encoder, (B, model.input_dim))
    walk(model.mu_head, shape)
    walk(model.log_sigma_head, shape)
    walk(model.decoder, (B, model.latent_dim))

    fwd, bwd = [], []
    first = layers[0][0]
    for layer, s in layers:
        is_first = layer is first
        if isinstance(layer, Dense):
            i, o = layer.in_features, layer.out_features
            fwd.append(((B, i), (i, o), False, False, "forward", is_first))
            bwd.append([((B, o), (i, o), False, True, "input_grad", is_first),       # dy @ W.T
                        ((B, i), (B, o), True, False, "weight_grad", is_first)])     # x.T @ dy
        elif isinstance(layer, Conv2d):
            kh, kw = layer.kernel_size
            Ho, Wo = layer.output_size(s[2:])
            K, N, Co = layer.in_channels * kh * kw, Ho * Wo * B, layer.out_channels
            fwd.append(((Co, K), (K, N), False, False, "forward", is_first))            # W2 @ cols
            bwd.append([((Co, N), (K, N), False, True, "weight_grad", is_first),         # dout2 @ cols.T
                        ((Co, K), (Co, N), True, False, "input_grad", is_first)])        # W2.T @ dout2
        else:  # ConvTranspose2d
            kh, kw = layer.kernel_size
            H, Wd = s[2:]
            Ci, Co = layer.in_channels, layer.out_channels
            K, N = Co * kh * kw, H * Wd * B
            fwd.append(((Ci, K), (Ci, N), True, False, "forward", is_first))           # W2.T @ x2
            bwd.append([((Ci, K), (K, N), False, False, "input_grad", is_first),         # W2 @ cols
                        ((Ci, N), (K, N), False, True, "weight_grad", is_first)])        # x2 @ cols.T
    # backward runs decoder first, then the heads, then the encoder: reverse layer order
    ordered = fwd + [p for group in reversed(bwd) for p in group]
    return ordered


def floor_stepper(products, seed, skip_first_input_grad=False):
    """A callable running the products on random float32 data, into preallocated outputs."""
    import numpy as np
    gen = np.random.default_rng(seed)
    work = []
    for a_shape, b_shape, ta, tb, role, is_first in products:
        if skip_first_input_grad and is_first and role == "input_grad":
            continue
        a = gen.standard_normal(a_shape, dtype=np.float32)
        b = gen.standard_normal(b_shape, dtype=np.float32)
        av = a.T if ta else a
        bv = b.T if tb else b
        out = np.empty((av.shape[0], bv.shape[1]), np.float32)
        work.append((av, bv, out))
    mm = np.matmul

    def step():
        for av, bv, out in work:
            mm(av, bv, out=out)

    return step, sum(2.0 * av.shape[0] * av.shape[1] * bv.shape[1] for av, bv, _ in work)


# -- one configuration ------------------------------------------------------------------------------

def _compare(torch, model, net, x_np, eps_np, device):
    import numpy as np
    be = model.backend
    model.zero_grad()
    loss_s, _ = model.loss_and_grad(be.asarray(x_np), eps=be.asarray(eps_np), check_data=False)
    net.zero_grad(set_to_none=True)
    loss_t = net.loss(torch.from_numpy(x_np).to(device), torch.from_numpy(eps_np).to(device))
    loss_t.backward()
    tg = C.torch_grads_by_scratch_name(torch, model, net)
    worst, where = 0.0, None
    for name, g in model.grads.items():
        gs = be.asnumpy(g).astype(np.float64)
        gt = tg[name].astype(np.float64)
        err = float(np.abs(gs - gt).max() / (np.abs(gt).max() + 1e-300))
        if err > worst:
            worst, where = err, name
    model.zero_grad()
    net.zero_grad(set_to_none=True)
    return {"loss_scratchvae": float(loss_s), "loss_torch": float(loss_t.item()),
            "rel_loss_diff": abs(float(loss_s) - float(loss_t.item())) / abs(float(loss_t.item())),
            "max_rel_grad_err": worst, "worst_param": where}


def check_equivalence(torch, kind, seed, model, net, batches, device="cpu"):
    """Same loss and gradients on both sides before any step.

    float64 (twins built from the same seed, 32 examples): proves the
    architectures, the init copy and the losses are the same (agreement to
    ~1e-12).  float32 (the benchmarked models, the whole first batch):
    agreement to float32 rounding; a unit whose ReLU input rounds to the
    other side of 0 can make one weight-gradient entry differ by more.
    """
    import numpy as np
    m64 = build_model(kind, model.backend, seed, dtype="float64")
    n64 = C.torch_twin(torch, m64, device)
    x64 = batches.x[0][:32].astype(np.float64)
    e64 = batches.eps[0][:32].astype(np.float64)
    f64 = _compare(torch, m64, n64, x64, e64, device)
    f32 = _compare(torch, model, net, batches.x[0], batches.eps[0], device)
    ok = f64["max_rel_grad_err"] < 1e-9 and f64["rel_loss_diff"] < 1e-12
    return {"ok": ok, "float64": f64, "float32": f32}


def run_config(kind, B, X, args, torch, log, device="cpu", cupy_be=None):
    """Alternate scratchvae / torch / floor for one (model, batch, device)."""

    seed = args.seed
    backend = cupy_be if device == "cuda" else None
    model = build_model(kind, backend, seed)
    batches = Batches(X, B, model.latent_dim, seed + B)
    res = {"model": kind, "batch": B, "device": device if device == "cpu" else f"cuda ({cupy_be.device})",
           "num_params": model.num_params()}

    net = None
    if torch is not None:
        tdev = "cuda" if device == "cuda" else "cpu"
        net = C.torch_twin(torch, model, tdev)
        res["check"] = check_equivalence(torch, kind, seed, model, net, batches, tdev)
        if not res["check"]["ok"]:
            log(f"  WARNING: scratchvae and PyTorch disagree on the first step: {res['check']}")

    if device == "cuda":
        put = cupy_be.asarray
        sync_s = cupy_be.synchronize
        sync_t = torch.cuda.synchronize if torch is not None else None
    else:
        put, sync_s, sync_t = (lambda a: a), None, None
    sides, sync = {}, {}
    s_step, s_box = scratch_stepper(model, batches, put)
    sides["scratchvae"] = s_step
    sync["scratchvae"] = sync_s
    if net is not None:
        t_step, t_box = torch_stepper(torch, net, batches, "cuda" if device == "cuda" else "cpu")
        sides["torch"] = t_step
        sync["torch"] = sync_t
    flops = None
    if device == "cpu":
        products = matmul_products(model, B)
        f_step, flops = floor_stepper(products, seed)
        fn_step, _ = floor_stepper(products, seed, skip_first_input_grad=True)
        sides["floor"] = f_step
        sides["floor_needed"] = fn_step
        res["floor_products"] = len(products)
        res["floor_gflop_per_step"] = flops / 1e9

    def synced(name, fn):
        s = sync.get(name)
        if s is None:
            return fn
        def g():
            fn()
            s()
        return g

    # warm-up (JIT, caches, allocator), then calibrate the block lengths
    for fn in sides.values():
        for _ in range(args.warmup):
            fn()
    steps, one = {}, {}
    for name, fn in sides.items():
        steps[name], one[name] = C.calibrate(synced(name, fn), args.block_seconds)
    res["steps_per_block"] = steps
    res["warmup_step_s"] = one
    log(f"  {kind} B={B} {res['device']}: blocks of " + ", ".join(f"{k} {v}" for k, v in steps.items())
        + f" steps, {args.rounds} rounds")

    times = C.alternate(sides, args.rounds, steps, sync)
    per_round = {f"{k}_s": v for k, v in times.items() if k != "load"}
    per_round["load"] = times["load"]
    med = {f"{k}_s": C.median(v) for k, v in times.items() if k != "load"}
    if "torch" in times:
        per_round["speedup_vs_torch"] = C.ratios(times["torch"], times["scratchvae"])
        med["speedup_vs_torch"] = C.median(per_round["speedup_vs_torch"])
        med["torch_images_per_s"] = B / med["torch_s"]
    if "floor" in times:
        per_round["floor_multiple"] = C.ratios(times["scratchvae"], times["floor"])
        per_round["floor_needed_multiple"] = C.ratios(times["scratchvae"], times["floor_needed"])
        med["floor_multiple"] = C.median(per_round["floor_multiple"])
        med["floor_needed_multiple"] = C.median(per_round["floor_needed_multiple"])
        med["floor_gflops"] = flops / med["floor_s"] / 1e9
        if "torch" in times:
            per_round["torch_floor_multiple"] = C.ratios(times["torch"], times["floor"])
            med["torch_floor_multiple"] = C.median(per_round["torch_floor_multiple"])
    med["scratchvae_images_per_s"] = B / med["scratchvae_s"]
    res["per_round"] = per_round
    res["median"] = med
    # the last batch's loss and the steps each side took (a sanity check that both trained, not a comparison)
    res["last_loss"] = {"scratchvae": float(s_box["loss"]) if s_box["loss"] is not None else None}
    res["steps_taken"] = {"scratchvae": s_box["i"]}
    if net is not None:
        res["last_loss"]["torch"] = float(t_box["loss"].item())
        res["steps_taken"]["torch"] = t_box["i"]
        res["torch_optimizer"] = t_box["optimizer"]
    target = TARGETS.get((kind, B))
    if target and device == "cpu":
        res["target"] = target
        met = {}
        if "speedup_vs_torch" in med:
            met["speedup_vs_torch"] = med["speedup_vs_torch"] >= target["speedup_vs_torch"]
        if "floor_multiple" in target and "floor_multiple" in med:
            met["floor_multiple"] = med["floor_multiple"] <= target["floor_multiple"]
        res["target_met"] = met
    return res


def _f(v, nd=2):
    return None if v is None else f"{v:.{nd}f}"


def table(results) -> str:
    rows = []
    for r in results:
        m = r["median"]
        tgt = r.get("target", {})
        met = r.get("target_met", {})
        mark = ""
        if met:
            mark = " ".join(f"{k.split('_')[0]}:{'ok' if v else 'MISS'}" for k, v in met.items())
        rows.append([f"{r['model']}", r["batch"], r["device"].split(" ")[0],
                     f"{m['scratchvae_images_per_s']:.0f}",
                     f"{m['torch_images_per_s']:.0f}" if "torch_images_per_s" in m else "-",
                     _f(m.get("speedup_vs_torch")) or "-",
                     _f(tgt.get("speedup_vs_torch")) or "-",
                     f"{m['scratchvae_s'] * 1e3:.2f}",
                     f"{m['floor_s'] * 1e3:.2f}" if "floor_s" in m else "-",
                     _f(m.get("floor_multiple")) or "-",
                     _f(m.get("floor_needed_multiple")) or "-",
                     _f(m.get("torch_floor_multiple")) or "-",
                     mark or "-"])
    return C.fmt_table(["model", "B", "dev", "svae img/s", "torch img/s", "speedup", "target", "svae ms",
                        "floor ms", "x floor", "x floor_needed", "torch x floor", "targets"], rows)


def main(argv=None, log=print) -> dict:
    args = build_parser().parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 7
    if args.block_seconds is None:
        args.block_seconds = 0.15 if args.quick else 0.75
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.rounds < 1 or args.block_seconds <= 0 or args.threads < 1:
        raise SystemExit("--rounds, --block-seconds and --threads must be positive")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    for m in models:
        if m not in ("mlp", "conv"):
            raise SystemExit(f"unknown model {m!r}; choose from mlp, conv")

    env_note = C.preset_thread_env(args.threads)
    torch, torch_reason = C.import_torch(args.no_torch)
    import numpy  # noqa: F401  (after the thread environment)

    cupy_be, cupy_reason = C.cupy_backend(args.no_gpu)
    tcuda, tcuda_reason = C.torch_cuda(torch) if not args.no_gpu else (None, "disabled (--no-gpu)")
    if torch is None:
        log(f"PyTorch: {torch_reason}; reporting scratchvae figures and the matmul floor only")
    log(f"cupy: {'available, ' + cupy_be.device if cupy_be else 'skipped (' + cupy_reason + ')'}")

    X = C.mnist("train")
    report = {"script": "bench_train", "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "argv": list(argv) if argv is not None else sys.argv[1:],
              "machine": C.machine_info(), "versions": C.versions(torch),
              "config": {"rounds": args.rounds, "block_seconds": args.block_seconds, "warmup": args.warmup,
                         "models": models, "batches": batches, "dtype": "float32", "seed": args.seed,
                         "thread_env": env_note},
              "torch": {"available": torch is not None, "reason": torch_reason},
              "cupy": {"available": cupy_be is not None, "reason": cupy_reason,
                       "device": cupy_be.device if cupy_be else None},
              "torch_cuda": {"available": tcuda is not None, "reason": tcuda_reason},
              "load_average": {"start": C.load_average()}, "warnings": [], "results": []}
    warn = C.busy_warning(args.threads)
    if warn:
        log("WARNING: " + warn)
        report["warnings"].append(warn)
    t_start = time.perf_counter()
    with C.thread_limits(args.threads, torch) as tinfo:
        report["threads"] = tinfo
        log(f"threads: NumPy BLAS {tinfo['numpy_blas']} ({tinfo['method']}), torch {tinfo['torch']}; "
            f"load average {report['load_average']['start']}")
        for kind in models:
            for B in batches:
                report["results"].append(run_config(kind, B, X, args, torch, log))
        if cupy_be is not None:
            gpu_torch = torch if tcuda is not None else None
            for kind in models:
                for B in batches:
                    report["results"].append(run_config(kind, B, X, args, gpu_torch, log, device="cuda",
                                                        cupy_be=cupy_be))
        else:
            report["results_gpu"] = f"cupy: skipped ({cupy_reason})"
    report["load_average"]["end"] = C.load_average()
    report["seconds"] = time.perf_counter() - t_start
    out = C.write_json(args.json or C.default_json_path("bench_train"), report)
    log("")
    log(table(report["results"]))
    log("\nspeedup = median over rounds of (torch step time / scratchvae step time); x floor = scratchvae step "
        "time / matmul-only time (x floor_needed: without the first layer's unused input gradient)")
    if cupy_be is None:
        log(f"cupy: skipped ({cupy_reason})")
    for w in report["warnings"]:
        log("WARNING: " + w)
    log(f"load average start {report['load_average']['start']} end {report['load_average']['end']}; "
        f"{report['seconds']:.0f} s; JSON: {out}")
    report["json_path"] = str(out)
    return report


if __name__ == "__main__":
    main()
