#!/usr/bin/env python
"""A whole run, as a user runs it: ``python examples/train_mnist.py`` against a PyTorch twin of it.

The scratchvae side is the real command (``examples/train_mnist.py
--no-figures``: the default recipe, 784-400-20 ReLU VAE, binarized MNIST,
batch 128, Adam 1e-3, 10 epochs); its epoch times are the ``seconds`` of its
``metrics.jsonl`` (the training loop of each epoch, without the test
evaluation). The PyTorch side is a worker process running the same recipe
with PyTorch 2.x eager: the same architecture and initial weights (copied
from scratchvae's, seed 0), the same 50,000 training images in a fresh
permutation each epoch, eps from PyTorch's generator, ``torch.optim.Adam``;
its epoch times are likewise the training loop alone, and it evaluates the
test negative ELBO after every epoch as the trainer does.

Each run is its own process, one after the other, ``--settle`` seconds apart
(a virtual machine may slow down under sustained load and recover when idle), in ABBA
order over ``--rounds`` rounds; the report gives every run's epoch times,
the per-epoch medians side by side and the whole-run totals.

    python benchmarks/bench_run.py                 # 2 rounds (~5 minutes on 2 cores)
    python benchmarks/bench_run.py --rounds 1 --epochs 3
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

try:
    from . import _common as C
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import _common as C

REPO = pathlib.Path(__file__).resolve().parents[1]


def torch_worker(epochs: int, out: str, seed: int = 0, limit: int | None = None) -> None:
    """Train the PyTorch twin of the default recipe; write its epoch times and test losses to ``out``."""
    import numpy as np
    import torch

    from scratchvae.models import mlp_vae

    torch.manual_seed(seed)
    x_train = torch.from_numpy(np.ascontiguousarray(C.mnist("train")[:limit], dtype=np.float32))
    x_test = torch.from_numpy(np.ascontiguousarray(C.mnist("test"), dtype=np.float32))
    net = C.torch_twin(torch, mlp_vae(784, hidden=(400,), latent_dim=20, seed=seed))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    rng, n, B = np.random.default_rng(seed), x_train.shape[0], 128
    epochs_out = []
    for epoch in range(1, epochs + 1):
        perm = torch.from_numpy(rng.permutation(n))
        t0 = time.perf_counter()
        total = 0.0
        for start in range(0, n, B):
            xb = x_train[perm[start:start + B]]
            eps = torch.randn(xb.shape[0], 20)
            opt.zero_grad(set_to_none=True)
            loss = net.loss(xb, eps)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            test = float(net.loss(x_test, torch.randn(x_test.shape[0], 20)))
        epochs_out.append({"epoch": epoch, "seconds": seconds, "train_loss": total / -(-n // B), "test_loss": test})
    pathlib.Path(out).write_text(json.dumps({"epochs": epochs_out, "torch": torch.__version__,
                                             "threads": torch.get_num_threads()}))


def run_scratchvae(epochs, threads, folder, limit=None) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "examples" / "train_mnist.py"), "--epochs", str(epochs),
                    "--no-figures", "--out", str(folder)] + (["--limit", str(limit)] if limit else []),
                   check=True, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": [h["seconds"] for h in history], "test_loss": history[-1]["test_loss"], "process_s": wall}


def run_torch(epochs, threads, out, limit=None) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--torch-worker", out, "--epochs", str(epochs)]
                   + (["--limit", str(limit)] if limit else []), check=True, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    result = json.loads(pathlib.Path(out).read_text())
    return {"seconds": [e["seconds"] for e in result["epochs"]], "test_loss": result["epochs"][-1]["test_loss"],
            "process_s": wall, "torch": result["torch"], "threads": result["threads"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--settle", type=float, default=20.0, help="seconds of rest before every run (default 20)")
    p.add_argument("--limit", type=int, default=None, help="only the first N training images (a smoke run)")
    p.add_argument("--json", default=None)
    p.add_argument("--torch-worker", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.torch_worker:
        torch_worker(args.epochs, args.torch_worker, limit=args.limit)
        return 0
    sides = ("scratchvae", "torch") if importlib.util.find_spec("torch") is not None else ("scratchvae",)
    if len(sides) == 1:
        print("PyTorch is not installed (pip install torch==2.13.0): the scratchvae runs only")
    runs = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                time.sleep(args.settle)
                if side == "scratchvae":
                    result = run_scratchvae(args.epochs, args.threads, pathlib.Path(tmp) / f"run{r}", args.limit)
                else:
                    result = run_torch(args.epochs, args.threads, str(pathlib.Path(tmp) / f"torch{r}.json"),
                                       args.limit)
                runs[side].append(result)
                print(f"round {r + 1} {side:10s}: {sum(result['seconds']):6.1f} s of training "
                      f"({', '.join(f'{s:.2f}' for s in result['seconds'])}), test loss {result['test_loss']:.3f}",
                      flush=True)
    rows, nan = [], float("nan")
    for e in range(args.epochs):
        s = C.median([run["seconds"][e] for run in runs["scratchvae"]])
        t = C.median([run["seconds"][e] for run in runs["torch"]]) if "torch" in runs else nan
        rows.append([e + 1, f"{s:.2f}", f"{t:.2f}", f"{t / s:.2f}x"])
    totals = {side: C.median([sum(run["seconds"]) for run in runs[side]]) for side in runs}
    totals.setdefault("torch", nan)
    rows.append(["total", f"{totals['scratchvae']:.1f}", f"{totals['torch']:.1f}",
                 f"{totals['torch'] / totals['scratchvae']:.2f}x"])
    print(C.fmt_table(["epoch", "scratchvae s", "PyTorch s", "speedup"], rows))
    report = {"script": "bench_run", "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "argv": sys.argv[1:], "machine": C.machine_info(), "versions": C.versions(),
              "threads": args.threads, "settle_s": args.settle, "rounds": args.rounds, "epochs": args.epochs,
              "runs": runs, "median_total_s": totals, "speedup_total": totals["torch"] / totals["scratchvae"]}
    path = args.json or C.default_json_path("bench_run")
    print("wrote", C.write_json(path, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
