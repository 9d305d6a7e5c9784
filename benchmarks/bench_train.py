#!/usr/bin/env python
"""Training-step throughput: scratchvae vs PyTorch (same architecture, same init, same loss).

One step = ``zero_grad`` + ``loss_and_grad`` (fused kernels, ``check_data=False``,
eps given) + an Adam step, on real binarized-MNIST batches (float32).  The
PyTorch twin has the same layers with the weights copied from the scratchvae
model, the same loss (BCE with logits summed over pixels and averaged over
the batch, plus the analytic KL with ``z = mu + exp(log_sigma) * eps``) and
``torch.optim.Adam(lr=1e-3)``; both sides get the very same batches and eps.

Timing design: measured the way a user runs. Each library runs alone in its
own worker process (in one process, OpenBLAS's and PyTorch's spinning worker
threads slow whichever side runs next). Each worker first trains its side on
real binarized-MNIST batches until a real run's steady state (1,500 MLP steps,
900 conv steps, in images at other batch sizes: the weights and the Adam
moments of a trained model, which change the cost), then waits. The parent
then asks the workers in turn for a block of steps of about
``--block-seconds``, pausing ``--settle-seconds`` before every block so that
the last process's threads have stopped spinning, in ABBA order (reversed
every other round) so that a slow drift of the machine hits both sides
alike. Every per-round figure is kept; the report is the MEDIAN of the
per-round ratios (speedup = torch time / scratchvae time).

The floor is the time of the step's matrix products alone, in float32, the
same shapes (and the same transposed views) as the real step, into
preallocated outputs: for each Dense layer ``x @ W``, ``dy @ W.T`` and
``x.T @ dy``; for the convolutions the im2col products of
scratchvae.layers.conv. It is measured for both BLAS libraries, each in its
own process: NumPy's OpenBLAS (``floor``: every product; ``floor_needed``:
without the first layer's input gradient, which neither side computes) and
PyTorch's MKL (``torch_floor``, the needed products).

Usage::

    python benchmarks/bench_train.py                      # full run (~5 min on 2 cores)
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
import os
import pathlib
import subprocess
import sys
import time

try:
    from . import _common as C
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import _common as C

TARGETS = {("mlp", 128): {"speedup_vs_torch": 1.5},
           ("mlp", 1024): {"speedup_vs_torch": 1.2},
           ("conv", 128): {"speedup_vs_torch": 1.0},
           ("vampprior", 100): {"speedup_vs_torch": 1.0},
           ("iwae", 100): {"speedup_vs_torch": 1.0},
           ("hvae", 100): {"speedup_vs_torch": 1.1}}
MODELS = ("mlp", "conv", "vampprior", "iwae", "hvae")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 rounds of short blocks, short warm-up (a quick look, noisy)")
    p.add_argument("--rounds", type=int, default=None, help="alternation rounds (default 7, --quick 3)")
    p.add_argument("--block-seconds", type=float, default=None,
                   help="target length of one block of steps (default 0.75 s, --quick 0.15 s)")
    p.add_argument("--warmup", type=int, default=None,
                   help="training steps per side before timing (default: a steady state, 1500 MLP / 900 conv "
                        "steps' worth of images; --quick 20)")
    p.add_argument("--settle-seconds", type=float, default=None,
                   help="pause before every block, so the other process's threads stop spinning (default 0.5)")
    p.add_argument("--models", default="mlp,conv", help="comma list of mlp, conv, vampprior (the gated 2x300 VAE, "
                   "z = 40, with the VampPrior of 500 pseudo-inputs), iwae (the gated VAE, standard prior, the IWAE "
                   "objective with 5 samples), hvae (the two-level gated VAE, z1 = z2 = 40, the VampPrior of 500 "
                   "pseudo-inputs on z2); the last three at --batches 100")
    p.add_argument("--batches", default="128,1024", help="comma list of batch sizes")
    p.add_argument("--no-gpu", action="store_true", help="skip the CuPy / torch CUDA comparison")
    p.add_argument("--gpu-only", action="store_true", help="only the CuPy / torch CUDA rows (benchmarks/gpu_check.sh)")
    p.add_argument("--worker", help=argparse.SUPPRESS)   # internal: run one side in this process
    C.add_common_args(p, default_json_name="bench_train")
    return p


# -- the scratchvae side -------------------------------------------------------------------

def build_model(kind, backend, seed, dtype="float32"):
    from scratchvae.models import conv_vae, mlp_vae
    if kind in C.GATED_MODELS:
        return C.gated_model(kind, backend, seed, dtype)
    if kind == "mlp":
        return mlp_vae(784, hidden=(400,), latent_dim=20, activation="relu", backend=backend, seed=seed, dtype=dtype)
    if kind == "conv":
        return conv_vae((1, 28, 28), channels=(32, 64), latent_dim=20, backend=backend, seed=seed, dtype=dtype)
    raise ValueError(f"unknown model {kind!r}; choose one of {MODELS}")


class Batches:
    """``count`` fixed real batches and eps arrays (``shape``: the model's ``noise_shape(B)``), cycled through
    by both sides."""

    def __init__(self, X, B, shape, seed, count=8):
        import numpy as np
        gen = np.random.default_rng(seed)
        self.x = [np.ascontiguousarray(X[gen.choice(X.shape[0], B, replace=False)]) for _ in range(count)]
        self.eps = [gen.standard_normal(shape, dtype=np.float32) for _ in range(count)]
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

    Mirrors scratchvae.layers.dense.affine_forward/affine_backward, the two
    of each of scratchvae.layers.gated, and the products of
    scratchvae.layers.conv, in the order the step runs them. The encoder runs
    on B rows, plus the K pseudo-inputs of a VampPrior (whose gradient needs
    the first layer's input gradient); the decoder on B * S rows for S
    samples per image. The VampPrior's density products ((B*S, L) by (L, K),
    under 1% of the layers' here) are not counted.
    """
    from scratchvae.layers import Conv2d, ConvTranspose2d, Dense, GatedDense, Sequential

    layers = []
    prior = getattr(model, "prior", None)
    pseudo = getattr(prior, "n_pseudo", 0)
    rows_enc, rows_dec = B + pseudo, B * getattr(model, "samples", 1)

    def walk(layer, shape):
        """Collect (layer, input shape) along the forward pass; returns the output shape."""
        if isinstance(layer, Sequential):
            for child in layer.layers:
                shape = walk(child, shape)
            return shape
        if isinstance(layer, (Dense, GatedDense)):
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

    if getattr(model, "levels", 1) > 1:     # a hierarchy: every part on the rows it sees
        data_firsts = _walk_hierarchy(model, B, rows_enc, walk)
        data_firsts = {id(f) for f in data_firsts[:-1]} | ({id(data_firsts[-1])} if not pseudo else set())
    else:
        shape = walk(model.encoder, (rows_enc, model.input_dim))
        walk(model.mu_head, shape)
        walk(model.log_sigma_head, shape)
        walk(model.decoder, (rows_dec, model.latent_dim))
        data_firsts = set() if pseudo else {id(layers[0][0])}

    fwd, bwd = [], []
    for layer, s in layers:
        is_first = id(layer) in data_firsts
        if isinstance(layer, (Dense, GatedDense)):
            i, o, R = layer.in_features, layer.out_features, s[0]
            for _ in range(2 if isinstance(layer, GatedDense) else 1):   # GatedDense: x @ W and x @ V
                fwd.append(((R, i), (i, o), False, False, "forward", is_first))
                bwd.append([((R, o), (i, o), False, True, "input_grad", is_first),       # dy @ W.T
                            ((R, i), (R, o), True, False, "weight_grad", is_first)])     # x.T @ dy
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


def _walk_hierarchy(model, B, rows_top, walk):
    """Walk a hierarchy's parts in forward order with their input shapes; returns the first layers of the
    networks that read the data (the lower levels' x-branches, then the top's)."""
    from scratchvae.layers.base import walk as layers_of
    P, T, Z, D = model.parts, model.levels, model.latent_dim, model.input_dim
    R = B * model.samples
    s = walk(P["encoder"], (rows_top, D))
    walk(P["mu"], s)
    walk(P["log_sigma"], s)
    for lvl in range(T - 1, 0, -1):
        hx = walk(P[f"q{lvl}.x"], (B, D))
        hz = walk(P[f"q{lvl}.z"], (R, Z))
        s = walk(P[f"q{lvl}.joint"], (R, hx[1] + hz[1]))
        walk(P[f"q{lvl}.mu"], s)
        walk(P[f"q{lvl}.log_sigma"], s)
        s = walk(P[f"p{lvl}.net"], (R, Z))
        walk(P[f"p{lvl}.mu"], s)
        walk(P[f"p{lvl}.log_sigma"], s)
    width = sum(walk(P[f"decoder.z{lvl}"], (R, Z))[1] for lvl in range(1, T + 1))
    walk(P["decoder"], (R, width))

    def first(part):
        return next(layer for layer in layers_of(part) if hasattr(layer, "in_features"))
    return [first(P[f"q{lvl}.x"]) for lvl in range(T - 1, 0, -1)] + [first(P["encoder"])]


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


# -- the worker processes ---------------------------------------------------------------------
#
# Each library runs alone in its own process. A worker builds its side, warms it up by
# training on real batches until the run's steady state (the weights and Adam moments of a
# real run, not fresh ones), then waits on its stdin; the parent asks one worker at a time
# for a block of steps, and pauses between blocks so that the other process's BLAS/OpenMP
# threads have stopped spinning before the next block starts.

# warm-up: images trained on before timing (1500 MLP steps, 900 conv steps at B=128; 1500 steps at B=100,
# three epochs, for the gated models)
WARMUP_IMAGES = {"mlp": 1500 * 128, "conv": 900 * 128, "vampprior": 1500 * 100, "iwae": 1500 * 100,
                 "hvae": 1500 * 100}


def worker_main(spec: dict) -> int:
    """Serve blocks of steps of ``spec["sides"]`` (one library) over stdin/stdout, one JSON line each."""
    import json

    C.preset_thread_env(spec["threads"])
    uses_torch = any(side.startswith("torch") for side in spec["sides"])
    torch = C.import_torch(False)[0] if uses_torch else None
    import numpy  # noqa: F401  (imported after the thread environment is set, so OpenBLAS reads it)

    with C.thread_limits(spec["threads"], torch) as tinfo:
        device = spec["device"]
        backend = C.cupy_backend(False)[0] if device == "cuda" else None
        model = build_model(spec["kind"], backend, spec["seed"])
        batches = Batches(C.mnist("train"), spec["batch"], model.noise_shape(spec["batch"]),
                          spec["seed"] + spec["batch"], count=spec["pool"])
        fns, syncs, boxes = {}, {}, {}
        ready = {"threads": tinfo, "versions": C.versions(torch), "pid": os.getpid(),
                 "torch_imported": "torch" in sys.modules}
        for side in spec["sides"]:
            if side == "scratchvae":
                put = backend.asarray if backend is not None else (lambda a: a)
                fns[side], boxes[side] = scratch_stepper(model, batches, put)
                syncs[side] = backend.synchronize if backend is not None else None
            elif side == "torch":
                tdev = "cuda" if device == "cuda" else "cpu"
                net = C.torch_twin(torch, model, tdev)
                ready["check"] = check_equivalence(torch, spec["kind"], spec["seed"], model, net, batches, tdev)
                fns[side], boxes[side] = torch_stepper(torch, net, batches, tdev)
                syncs[side] = torch.cuda.synchronize if device == "cuda" else None
            elif side in ("floor", "floor_needed"):
                products = matmul_products(model, spec["batch"])
                fns[side], flops = floor_stepper(products, spec["seed"], skip_first_input_grad=side == "floor_needed")
                ready[f"{side}_gflop_per_step"], ready["floor_products"] = flops / 1e9, len(products)
            elif side == "torch_floor":
                fns[side], flops = torch_floor_stepper(torch, matmul_products(model, spec["batch"]), spec["seed"])
            else:
                raise ValueError(f"unknown side {side!r}")
        t0 = time.perf_counter()
        for side, fn in fns.items():   # warm-up: training steps (the floors just run their products)
            for _ in range(spec["warmup_steps"] if side in ("scratchvae", "torch") else 3):
                fn()
            if syncs.get(side):
                syncs[side]()
        ready.update(ready=True, warmup_seconds=time.perf_counter() - t0,
                     warmup_loss={k: _loss(b) for k, b in boxes.items()})
        _send(json.dumps(ready, default=C._json_default))
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                break
            side, n = cmd["side"], int(cmd["steps"])
            fn, sync = fns[side], syncs.get(side)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            if sync:
                sync()
            seconds = time.perf_counter() - t0
            _send(json.dumps({"seconds": seconds, "loss": _loss(boxes.get(side)),
                              "steps_taken": boxes[side]["i"] if side in boxes else None}))
    return 0


def _loss(box):
    if box is None or box.get("loss") is None:
        return None
    loss = box["loss"]
    return float(loss.item()) if hasattr(loss, "item") else float(loss)


def _send(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def torch_floor_stepper(torch, products, seed):
    """The same products as :func:`floor_stepper`, with torch.matmul (MKL here), into preallocated outputs."""
    gen = torch.Generator().manual_seed(seed)
    work = []
    for a_shape, b_shape, ta, tb, role, is_first in products:
        if is_first and role == "input_grad":
            continue            # PyTorch skips the data's gradient too
        a, b = torch.randn(a_shape, generator=gen), torch.randn(b_shape, generator=gen)
        av, bv = (a.T if ta else a), (b.T if tb else b)
        work.append((av, bv, torch.empty((av.shape[0], bv.shape[1]))))

    def step():
        with torch.no_grad():
            for av, bv, out in work:
                torch.matmul(av, bv, out=out)

    return step, sum(2.0 * av.shape[0] * av.shape[1] * bv.shape[1] for av, bv, _ in work)


class Worker:
    """One worker process, driven one JSON line at a time."""

    def __init__(self, spec: dict):
        import json
        self._json = json
        self.proc = subprocess.Popen([sys.executable, str(pathlib.Path(__file__).resolve()), "--worker",
                                      json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"benchmark worker exited with code {code} before answering")
        return self._json.loads(line)

    def run(self, side: str, steps: int) -> dict:
        self.proc.stdin.write(self._json.dumps({"op": "run", "side": side, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, ValueError, subprocess.TimeoutExpired):   # a broken pipe, a closed file, a hang
                self.proc.kill()
                self.proc.wait()


def run_config(kind, B, args, torch_ok, log, device="cpu"):
    """Alternate the workers of one (model, batch, device), each library in its own process."""
    warmup_steps = args.warmup if args.warmup is not None else math.ceil(WARMUP_IMAGES[kind] / B)
    base = {"kind": kind, "batch": B, "threads": args.threads, "seed": args.seed, "device": device,
            "warmup_steps": warmup_steps, "pool": 64}
    groups = {"scratchvae": ["scratchvae"]}
    if torch_ok:
        groups["torch"] = ["torch"]
    if device == "cpu":
        groups["floor"] = ["floor", "floor_needed"]
        if torch_ok:
            groups["torch_floor"] = ["torch_floor"]
    res = {"model": kind, "batch": B, "device": device, "warmup_steps": warmup_steps,
           "settle_seconds": args.settle_seconds}
    workers = {}
    try:
        for name, sides in groups.items():       # started and warmed up one after the other
            t0 = time.perf_counter()
            workers[name] = Worker(dict(base, sides=sides))
            log(f"  {kind} B={B} {device}: {name} ready after {time.perf_counter() - t0:.1f} s "
                f"(warm-up {workers[name].ready['warmup_seconds']:.1f} s)")
        owner = {side: name for name, sides in groups.items() for side in sides}
        res["worker_ready"] = {name: w.ready for name, w in workers.items()}
        if "torch" in workers and "check" in workers["torch"].ready:
            res["check"] = workers["torch"].ready["check"]
            if not res["check"]["ok"]:
                log(f"  WARNING: scratchvae and PyTorch disagree on the first step: {res['check']}")
        res["floor_products"] = workers["floor"].ready.get("floor_products") if "floor" in workers else None
        steps = {}
        for side, name in owner.items():      # calibrate the blocks
            time.sleep(args.settle_seconds)
            probe = max(1, min(20, warmup_steps // 10 or 1))
            one = workers[name].run(side, probe)["seconds"] / probe
            steps[side] = max(1, round(args.block_seconds / max(one, 1e-9)))
        res["steps_per_block"] = steps
        times = {side: [] for side in owner}
        times["load"] = []
        order = list(owner)
        for r in range(args.rounds):          # ABBA: the order reverses every other round
            for side in (order if r % 2 == 0 else order[::-1]):
                time.sleep(args.settle_seconds)
                answer = workers[owner[side]].run(side, steps[side])
                times[side].append(answer["seconds"] / steps[side])
            la = C.load_average()
            times["load"].append(la[0] if la else None)
        res["last_loss"] = {side: workers[owner[side]].run(side, 1)["loss"] for side in ("scratchvae", "torch")
                            if side in owner}
    finally:
        for w in workers.values():
            w.close()
    med = {f"{k}_s": C.median(v) for k, v in times.items() if k != "load"}
    per_round = {f"{k}_s" if k != "load" else k: v for k, v in times.items()}
    if "torch" in times:
        per_round["speedup_vs_torch"] = C.ratios(times["torch"], times["scratchvae"])
        med["speedup_vs_torch"] = C.median(per_round["speedup_vs_torch"])
        med["torch_images_per_s"] = B / med["torch_s"]
    if "floor" in times:
        per_round["floor_multiple"] = C.ratios(times["scratchvae"], times["floor"])
        per_round["floor_needed_multiple"] = C.ratios(times["scratchvae"], times["floor_needed"])
        med["floor_multiple"] = C.median(per_round["floor_multiple"])
        med["floor_needed_multiple"] = C.median(per_round["floor_needed_multiple"])
    if "torch_floor" in times:
        per_round["torch_floor_multiple"] = C.ratios(times["torch"], times["torch_floor"])
        med["torch_floor_multiple"] = C.median(per_round["torch_floor_multiple"])
    med["scratchvae_images_per_s"] = B / med["scratchvae_s"]
    res["per_round"] = per_round
    res["median"] = med
    target = TARGETS.get((kind, B))
    if target and device == "cpu" and "speedup_vs_torch" in med:
        res["target"] = target
        res["target_met"] = {"speedup_vs_torch": med["speedup_vs_torch"] >= target["speedup_vs_torch"]}
    return res


def _f(v, nd=2):
    return None if v is None else f"{v:.{nd}f}"


def table(results) -> str:
    rows = []
    for r in results:
        m = r["median"]
        tgt = r.get("target", {})
        met = r.get("target_met", {})
        rows.append([r["model"], r["batch"], r["device"],
                     f"{m['scratchvae_s'] * 1e3:.2f}",
                     f"{m['torch_s'] * 1e3:.2f}" if "torch_s" in m else "-",
                     _f(m.get("speedup_vs_torch")) or "-",
                     (_f(tgt.get("speedup_vs_torch")) or "-") + (
                         "" if not met else (" ok" if met.get("speedup_vs_torch") else " MISS")),
                     f"{m['floor_needed_s'] * 1e3:.2f}" if "floor_needed_s" in m else "-",
                     f"{m['torch_floor_s'] * 1e3:.2f}" if "torch_floor_s" in m else "-",
                     _f(m.get("floor_needed_multiple")) or "-",
                     _f(m.get("torch_floor_multiple")) or "-"])
    return C.fmt_table(["model", "B", "dev", "svae ms", "torch ms", "speedup", "target", "OpenBLAS floor ms",
                        "MKL floor ms", "svae x floor", "torch x floor"], rows)


def main(argv=None, log=print) -> dict:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        import json
        return worker_main(json.loads(args.worker))
    if args.rounds is None:
        args.rounds = 3 if args.quick else 7
    if args.block_seconds is None:
        args.block_seconds = 0.15 if args.quick else 0.75
    if args.warmup is None and args.quick:
        args.warmup = 20
    if args.settle_seconds is None:
        args.settle_seconds = 0.1 if args.quick else 0.5
    if args.rounds < 1 or args.block_seconds <= 0 or args.threads < 1 or (args.warmup is not None and args.warmup < 0):
        raise SystemExit("--rounds, --block-seconds and --threads must be positive, --warmup >= 0")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}; choose from {', '.join(MODELS)}")

    # The parent only starts and times workers: it imports neither NumPy's BLAS work nor torch's.
    torch_ok, torch_reason = _probe("torch", args.no_torch)
    cupy_ok, cupy_reason = (False, "disabled (--no-gpu)") if args.no_gpu else _probe_cupy()
    if not torch_ok:
        log(f"PyTorch: {torch_reason}; reporting scratchvae figures and the matmul floor only")
    log(f"cupy: {'available' if cupy_ok else 'skipped (' + cupy_reason + ')'}")
    report = {"script": "bench_train", "method": "each library in its own worker process, alternating blocks "
                                                  "(ABBA order), after a steady-state warm-up",
              "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "argv": list(argv) if argv is not None else sys.argv[1:],
              "machine": C.machine_info(), "versions": C.versions(None),
              "config": {"rounds": args.rounds, "block_seconds": args.block_seconds, "warmup": args.warmup,
                         "settle_seconds": args.settle_seconds, "models": models, "batches": batches,
                         "dtype": "float32", "seed": args.seed, "threads": args.threads},
              "torch": {"available": torch_ok, "reason": torch_reason},
              "cupy": {"available": cupy_ok, "reason": cupy_reason},
              "load_average": {"start": C.load_average()}, "warnings": [], "results": []}
    warn = C.busy_warning(args.threads)
    if warn:
        log("WARNING: " + warn)
        report["warnings"].append(warn)
    t_start = time.perf_counter()
    if args.gpu_only and not cupy_ok:
        raise SystemExit(f"--gpu-only: the CuPy backend is unavailable ({cupy_reason})")
    devices = ([] if args.gpu_only else ["cpu"]) + (["cuda"] if cupy_ok else [])
    for device in devices:
        for kind in models:
            for B in batches:
                report["results"].append(run_config(kind, B, args, torch_ok, log, device=device))
    if not cupy_ok:
        report["results_gpu"] = f"cupy: skipped ({cupy_reason})"
    first = report["results"][0]["worker_ready"] if report["results"] else {}
    report["threads"] = {name: r.get("threads") for name, r in first.items()}
    report["versions"] = dict(report["versions"], **first.get("torch", {}).get("versions", {}))
    report["load_average"]["end"] = C.load_average()
    report["seconds"] = time.perf_counter() - t_start
    out = C.write_json(args.json or C.default_json_path("bench_train"), report)
    log("")
    log(table(report["results"]))
    log("\nspeedup = median over rounds of (torch step time / scratchvae step time), each in its own process; "
        "x floor = step time / its own BLAS's time for the step's matrix products")
    if not cupy_ok:
        log(f"cupy: skipped ({cupy_reason})")
    for w in report["warnings"]:
        log("WARNING: " + w)
    log(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; load average start "
        f"{report['load_average']['start']} end {report['load_average']['end']}; {report['seconds']:.0f} s; JSON: {out}")
    report["json_path"] = str(out)
    return report


def _probe(module: str, disabled: bool) -> tuple[bool, str]:
    """Whether a worker could import ``module`` (checked in a subprocess: the parent stays clean)."""
    if disabled:
        return False, f"disabled (--no-{module})"
    run = subprocess.run([sys.executable, "-c", f"import {module}; print({module}.__version__)"],
                         capture_output=True, text=True)
    if run.returncode != 0:
        return False, f"could not import {module!r}: {run.stderr.strip().splitlines()[-1] if run.stderr else ''}"
    return True, f"{module} {run.stdout.strip()}"


def _probe_cupy() -> tuple[bool, str]:
    code = "from scratchvae import backend; be = backend.get('cupy'); print(be.device)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if run.returncode != 0:
        lines = run.stderr.strip().splitlines()
        return False, lines[-1] if lines else "CuPy backend unavailable"
    return True, run.stdout.strip()


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
