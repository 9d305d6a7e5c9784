#!/usr/bin/env python
"""Per layer: where the conv step's time goes, against PyTorch's layer of the same geometry and the floor.

The layers are those of the conv VAE that ``bench_train.py`` times
(``conv_vae((1, 28, 28), channels=(32, 64))``, fused, float32), at batch
``--batch``. For each layer with parameters, and for the ReLUs, the time of
one forward plus one backward (the input gradient skipped for the first
convolution, whose input is data, as in the model) is measured:

* scratchvae: the layer itself, in its CHWB layout, on random input;
* PyTorch: ``nn.Conv2d`` / ``nn.ConvTranspose2d`` / ``nn.Linear`` /
  ``nn.ReLU`` of the same geometry (NCHW), weights copied, ``backward`` of
  the same upstream gradient;
* floor: the layer's matrix products alone (NumPy/OpenBLAS, preallocated
  outputs, the shapes scratchvae's code multiplies).

Each library runs in its own worker process; the parent asks them in turn
(ABBA, ``--settle`` seconds apart) for ``--rounds`` rounds and reports the
medians.

    python benchmarks/bench_layers.py [--batch 128] [--threads 2] [--rounds 5]
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time

try:
    from . import _common as C
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import _common as C


def _layers(batch):
    """[(name, layer, input shape in the layer's layout, needs dx)] of the conv VAE, in step order."""
    import numpy as np  # noqa: F401 - the model is NumPy

    from scratchvae.models import conv_vae

    model = conv_vae(input_shape=(1, 28, 28), channels=(32, 64), latent_dim=20, seed=0)
    x = np.zeros((batch, 784), np.float32)
    out = []
    for part, seq in (("enc", model.encoder), ("dec", model.decoder)):
        h = x if part == "enc" else np.zeros((batch, 20), np.float32)
        for i, layer in enumerate(seq.layers):
            kind = type(layer).__name__
            if kind in ("Conv2d", "ConvTranspose2d", "Dense", "ReLU"):
                name = f"{part}.{i} {kind}" + (f" {layer.in_channels}->{layer.out_channels}"
                                                if hasattr(layer, "in_channels") else
                                                f" {layer.params['W'].shape[0]}->{layer.params['W'].shape[1]}"
                                                if kind == "Dense" else "")
                out.append((name, layer, h.shape, getattr(layer, "input_grad", True)))
            h = layer.forward(h)
    return out


def _seconds_per_call(step, reps):
    """Seconds per call of ``step()``, over ``reps`` calls after a fifth as many (at least 3) to warm up."""
    for _ in range(max(3, reps // 5)):
        step()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - t0) / reps


def scratch_worker(batch, reps):
    import numpy as np
    layers = _layers(batch)
    rng = np.random.default_rng(0)
    results = {}
    for name, layer, shape, need_dx in layers:
        x = rng.standard_normal(shape).astype(np.float32)
        y = layer.forward(x)
        dy = rng.standard_normal(y.shape).astype(np.float32)

        def step(layer=layer, x=x, dy=dy):
            layer.forward(x)
            layer.backward(dy)
        results[name] = _seconds_per_call(step, reps)
        results[name + " floor"] = _floor(layer, shape, y.shape, need_dx, reps)
    return results


def _floor(layer, x_shape, y_shape, need_dx, reps):
    """The layer's matrix products alone, into preallocated outputs (None for a ReLU)."""
    import numpy as np
    kind = type(layer).__name__
    W = layer.params.get("W") if layer.params else None
    if W is None:
        return None
    if kind == "Dense":
        B, n_in = x_shape
        n_out = W.shape[1]
        x, dy = np.ones((B, n_in), np.float32), np.ones((B, n_out), np.float32)
        prods = [(x, W, np.empty((B, n_out), np.float32)), (x.T, dy, np.empty((n_in, n_out), np.float32))]
        if need_dx:
            prods.append((dy, W.T, np.empty((B, n_in), np.float32)))
    else:
        kh, kw = layer.kernel_size
        if kind == "Conv2d":
            C_out, C_in = W.shape[:2]
            n_cols = y_shape[1] * y_shape[2] * y_shape[3]                   # Ho*Wo*B (CHWB output)
            W2, cols = W.reshape(C_out, -1), np.ones((C_in * kh * kw, n_cols), np.float32)
            dout2 = np.ones((C_out, n_cols), np.float32)
            prods = [(W2, cols, np.empty((C_out, n_cols), np.float32)),
                     (dout2, cols.T, np.empty((C_out, C_in * kh * kw), np.float32))]
            if need_dx:
                prods.append((W2.T, dout2, np.empty((C_in * kh * kw, n_cols), np.float32)))
        else:
            C_in, C_out = W.shape[:2]
            n_in = x_shape[1] * x_shape[2] * x_shape[3]                     # H*W*B (CHWB input)
            W2, x2 = W.reshape(C_in, -1), np.ones((C_in, n_in), np.float32)
            cols = np.ones((C_out * kh * kw, n_in), np.float32)
            prods = [(W2.T, x2, np.empty((C_out * kh * kw, n_in), np.float32)),
                     (W2, cols, np.empty((C_in, n_in), np.float32)),
                     (x2, cols.T, np.empty((C_in, C_out * kh * kw), np.float32))]
    for a, b, o in prods:
        np.matmul(a, b, out=o)
    t0 = time.perf_counter()
    for _ in range(reps):
        for a, b, o in prods:
            np.matmul(a, b, out=o)
    return (time.perf_counter() - t0) / reps


def torch_worker(batch, reps, threads):
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    nn = torch.nn
    results = {}
    for name, layer, shape, need_dx in _layers(batch):
        kind = type(layer).__name__
        if kind == "Dense":
            mod, x_shape = nn.Linear(*layer.params["W"].shape), shape
        elif kind == "ReLU":
            mod = nn.ReLU()
            x_shape = (shape[-1], *shape[:-1]) if len(shape) == 4 else shape      # CHWB -> NCHW
        else:
            C_in, C_out = layer.in_channels, layer.out_channels
            extra = {"output_padding": layer.output_padding} if kind == "ConvTranspose2d" else {}
            cls = nn.Conv2d if kind == "Conv2d" else nn.ConvTranspose2d
            mod = cls(C_in, C_out, layer.kernel_size, layer.stride, layer.padding, **extra)
            x_shape = (shape[-1], *shape[:-1])                                     # CHWB -> NCHW
        x = torch.from_numpy(np.random.default_rng(0).standard_normal(x_shape).astype(np.float32))
        x.requires_grad_(need_dx)
        with torch.no_grad():
            dy = torch.randn_like(mod(x))

        def step(mod=mod, x=x, dy=dy):
            for p in mod.parameters():
                p.grad = None
            x.grad = None
            mod(x).backward(dy)
        results[name] = _seconds_per_call(step, reps)
    return results


def _worker_main(side, batch, reps, threads):
    """A worker: waits for a line on stdin, answers one JSON line of timings, until EOF."""
    for line in sys.stdin:
        if not line.strip():
            continue
        result = scratch_worker(batch, reps) if side == "scratchvae" else torch_worker(batch, reps, threads)
        print(json.dumps(result), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--reps", type=int, default=30, help="forward+backward calls per layer per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--settle", type=float, default=1.0)
    p.add_argument("--json", default=None)
    p.add_argument("--worker", choices=("scratchvae", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker_main(args.worker, args.batch, args.reps, args.threads)
        return 0
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    sides = ("scratchvae", "torch") if importlib.util.find_spec("torch") is not None else ("scratchvae",)
    if len(sides) == 1:
        print("PyTorch is not installed (pip install torch==2.13.0): scratchvae and the floor only")
    workers = {side: subprocess.Popen([sys.executable, __file__, "--worker", side, "--batch", str(args.batch),
                                       "--reps", str(args.reps), "--threads", str(args.threads)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
               for side in sides}
    rounds = {side: [] for side in workers}
    try:
        for r in range(args.rounds):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                time.sleep(args.settle)
                workers[side].stdin.write("go\n")
                workers[side].stdin.flush()
                rounds[side].append(json.loads(workers[side].stdout.readline()))
    finally:
        for w in workers.values():
            w.stdin.close()
            w.wait(timeout=60)
    names = [k for k in rounds["scratchvae"][0] if not k.endswith(" floor")]
    rows, report_rows = [], []
    total = {"scratchvae": 0.0, "torch": 0.0, "floor": 0.0}
    for name in names:
        s = C.median([r[name] for r in rounds["scratchvae"]]) * 1e3
        t = C.median([r[name] for r in rounds["torch"]]) * 1e3 if rounds.get("torch") else float("nan")
        f = C.median([r[name + " floor"] for r in rounds["scratchvae"]])
        f = None if f is None else f * 1e3
        total["scratchvae"] += s
        total["torch"] += t
        total["floor"] += f or 0.0
        rows.append([name, f"{s:.3f}", f"{t:.3f}", f"{t / s:.2f}x", "" if f is None else f"{f:.3f}",
                     "" if f is None else f"{s - f:.3f}"])
        report_rows.append({"layer": name, "scratchvae_ms": s, "torch_ms": t, "floor_ms": f})
    rows.append(["all layers", f"{total['scratchvae']:.3f}", f"{total['torch']:.3f}",
                 f"{total['torch'] / total['scratchvae']:.2f}x", f"{total['floor']:.3f}",
                 f"{total['scratchvae'] - total['floor']:.3f}"])
    print(f"conv VAE layers, batch {args.batch}, {args.threads} thread(s): forward + backward, median of "
          f"{args.rounds} rounds")
    print(C.fmt_table(["layer", "scratchvae ms", "PyTorch ms", "speedup", "floor ms", "above floor ms"], rows))
    report = {"script": "bench_layers", "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "argv": sys.argv[1:], "machine": C.machine_info(), "versions": C.versions(), "batch": args.batch,
              "threads": args.threads, "rounds": args.rounds, "reps": args.reps, "layers": report_rows,
              "per_round": rounds}
    print("wrote", C.write_json(args.json or C.default_json_path("bench_layers"), report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
