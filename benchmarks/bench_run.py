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

``--run celeba-conv`` is the run for people's own images: a CelebA-layout
folder (``img_align_celeba/`` of 178 x 218 JPEGs, ``list_attr_celeba.txt``,
``list_eval_partition.txt``) of ``--images`` generated pictures (soft
coloured shapes on gradients, seeded) is written once, then each side runs the
whole job from the files: scratchvae's real command (``--dataset celeba
--image-size 64 --arch conv --channels 32,64,128,256 --hidden 512
--latent-dim 64 --batch-size 64``, Bernoulli likelihood on intensities x/255)
with a fresh image cache each run, so that decoding and caching are inside the
run; the PyTorch twin decodes the same files with Pillow the same way (the
aligned-face crop, Lanczos to 64 x 64), writes its uint8 cache, and trains the
same model (weights copied from scratchvae's, seed 0) on batches made from it.
The figure is the whole process's wall-clock time, start to exit, imports
included; the epochs' training loops are reported beside it.

    python benchmarks/bench_run.py --run celeba-conv --images 3000 --epochs 3
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


def run_scratchvae(epochs, threads, folder, extra_args=(), extra_env=None) -> dict:
    """``examples/train_mnist.py --no-figures`` in its own process: its epoch times, last test loss and
    wall-clock time."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), **(extra_env or {}))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "examples" / "train_mnist.py"), *extra_args, "--epochs", str(epochs),
                    "--no-figures", "--out", str(folder)], check=True, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": [h["seconds"] for h in history], "test_loss": history[-1]["test_loss"], "process_s": wall}


def run_torch(epochs, threads, out, worker_args) -> dict:
    """This script's PyTorch worker (``worker_args``: which one and its options) in its own process."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, *worker_args, "--epochs", str(epochs)], check=True, env=env,
                   capture_output=True, text=True)
    wall = time.perf_counter() - t0
    result = json.loads(pathlib.Path(out).read_text())
    return {"seconds": [e["seconds"] for e in result["epochs"]], "test_loss": result["epochs"][-1]["test_loss"],
            "process_s": wall, "decode_s": result.get("decode_s"), "torch": result["torch"], "threads": result["threads"]}


# -- the image run: a CelebA-layout folder, 64 x 64 colour, the conv VAE ----------------------------------

IMAGE_SIZE, IMAGE_BATCH, IMAGE_LATENT = C.IMAGE_SIZE, 64, C.IMAGE_MODEL["latent_dim"]
IMAGE_RECIPE = ["--dataset", "celeba", "--image-size", str(IMAGE_SIZE), "--arch", "conv",
                "--channels", ",".join(map(str, C.IMAGE_MODEL["channels"])), "--hidden", str(C.IMAGE_MODEL["hidden"]),
                "--latent-dim", str(IMAGE_LATENT), "--batch-size", str(IMAGE_BATCH)]


def torch_image_worker(data_dir: str, epochs: int, out: str, seed: int = 0) -> None:
    """The PyTorch twin of the image run: decode the CelebA-layout folder with Pillow as scratchvae does
    (aligned-face crop, RGB, Lanczos to 64 x 64, uint8), cache it atomically, train the same conv VAE on
    batches of x/255, evaluate the test loss before and after every epoch, save a checkpoint every epoch."""
    import numpy as np
    import torch
    from PIL import Image

    from scratchvae.datasets.images import CELEBA_CROP
    from scratchvae.models import conv_vae

    torch.manual_seed(seed)
    root, t0 = pathlib.Path(data_dir), time.perf_counter()
    fields = (root / "list_eval_partition.txt").read_text().split()
    names, split = fields[0::2], np.array(fields[1::2], dtype=int)
    pixels = np.empty((len(names), 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)                     # (N, C, H, W)
    for k, name in enumerate(names):
        with Image.open(root / "img_align_celeba" / name) as im:
            im.load()
            w, h = im.size
            side = max(1, round(min(w, h) * CELEBA_CROP))
            left, top = (w - side) // 2, (h - side) // 2
            im = im.crop((left, top, left + side, top + side)).convert("RGB")
            im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
            pixels[k] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    cache = pathlib.Path(out).with_suffix(".npy")
    with open(cache.with_suffix(".tmp"), "wb") as f:
        np.save(f, pixels)
    os.replace(cache.with_suffix(".tmp"), cache)
    pixels = np.load(cache, mmap_mode="r").reshape(len(names), -1)
    x_train = torch.from_numpy(np.ascontiguousarray(pixels[split == 0]))                  # uint8 (N, C*H*W)
    x_test = torch.from_numpy(np.asarray(pixels[split == 2], dtype=np.float32) / 255)
    decode_s = time.perf_counter() - t0
    net = C.torch_twin(torch, conv_vae((3, IMAGE_SIZE, IMAGE_SIZE), seed=seed, **C.IMAGE_MODEL))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def test_loss():
        with torch.no_grad():
            return float(net.loss(x_test, torch.randn(x_test.shape[0], IMAGE_LATENT)))
    rng, n, B = np.random.default_rng(seed), x_train.shape[0], IMAGE_BATCH
    initial, epochs_out = test_loss(), []
    for epoch in range(1, epochs + 1):
        perm = torch.from_numpy(rng.permutation(n))
        t_epoch = time.perf_counter()
        for start in range(0, n, B):
            xb = x_train[perm[start:start + B]].to(torch.float32).div_(255)
            opt.zero_grad(set_to_none=True)
            loss = net.loss(xb, torch.randn(xb.shape[0], IMAGE_LATENT))
            loss.backward()
            opt.step()
        seconds = time.perf_counter() - t_epoch
        epochs_out.append({"epoch": epoch, "seconds": seconds, "test_loss": test_loss()})
        checkpoint = pathlib.Path(out).with_suffix(".pt")
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch},
                   checkpoint.with_suffix(".pt.tmp"))
        os.replace(checkpoint.with_suffix(".pt.tmp"), checkpoint)
    pathlib.Path(out).write_text(json.dumps({"epochs": epochs_out, "decode_s": decode_s, "initial_test_loss": initial,
                                             "torch": torch.__version__, "threads": torch.get_num_threads()}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", choices=("mnist", "celeba-conv"), default="mnist",
                   help="mnist: the default recipe (784-400-20 MLP, binarized MNIST); celeba-conv: the conv VAE on a "
                        "generated 64 x 64 colour CelebA-layout folder, decoding and caching included (default mnist)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 10 for mnist, 3 for celeba-conv)")
    p.add_argument("--images", type=int, default=3000, help="celeba-conv: images in the generated folder (default 3000)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--settle", type=float, default=20.0, help="seconds of rest before every run (default 20)")
    p.add_argument("--limit", type=int, default=None, help="mnist: only the first N training images (a smoke run)")
    p.add_argument("--json", default=None)
    p.add_argument("--torch-worker", metavar="OUT", help=argparse.SUPPRESS)
    p.add_argument("--torch-image-worker", metavar="OUT", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    epochs = args.epochs or (10 if args.run == "mnist" else 3)
    if args.torch_worker:
        torch_worker(epochs, args.torch_worker, limit=args.limit)
        return 0
    if args.torch_image_worker:
        torch_image_worker(args.data_dir, epochs, args.torch_image_worker)
        return 0
    if epochs < 1 or args.rounds < 1 or args.images < 10:
        p.error("--epochs and --rounds must be >= 1 and --images >= 10")
    sides = ("scratchvae", "torch") if importlib.util.find_spec("torch") is not None else ("scratchvae",)
    if len(sides) == 1:
        print("PyTorch is not installed (pip install torch==2.13.0): the scratchvae runs only")
    runs = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        if args.run == "celeba-conv":
            t0 = time.perf_counter()
            data_dir = C.write_celeba_folder(tmp / "celeba", args.images)
            print(f"wrote {args.images} CelebA-layout images in {time.perf_counter() - t0:.1f} s", flush=True)
        for r in range(args.rounds):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                time.sleep(args.settle)
                folder, out = tmp / f"run{r}", str(tmp / f"torch{r}.json")
                if args.run == "celeba-conv" and side == "scratchvae":   # a fresh image cache: decoding inside the run
                    result = run_scratchvae(epochs, args.threads, folder, [*IMAGE_RECIPE, "--data-dir", str(data_dir)],
                                            {"XDG_CACHE_HOME": str(tmp / f"run{r}-cache")})
                elif args.run == "celeba-conv":
                    result = run_torch(epochs, args.threads, out, ["--torch-image-worker", out, "--data-dir", str(data_dir)])
                elif side == "scratchvae":
                    result = run_scratchvae(epochs, args.threads, folder, ["--limit", str(args.limit)] if args.limit else [])
                else:
                    result = run_torch(epochs, args.threads, out,
                                       ["--torch-worker", out] + (["--limit", str(args.limit)] if args.limit else []))
                runs[side].append(result)
                print(f"round {r + 1} {side:10s}: {result['process_s']:6.1f} s whole run, {sum(result['seconds']):6.1f} s "
                      f"of training ({', '.join(f'{s:.2f}' for s in result['seconds'])}), test loss "
                      f"{result['test_loss']:.3f}", flush=True)
    rows, nan = [], float("nan")
    for e in range(epochs):
        s = C.median([run["seconds"][e] for run in runs["scratchvae"]])
        t = C.median([run["seconds"][e] for run in runs["torch"]]) if "torch" in runs else nan
        rows.append([e + 1, f"{s:.2f}", f"{t:.2f}", f"{t / s:.2f}x"])
    totals = {side: C.median([sum(run["seconds"]) for run in runs[side]]) for side in runs}
    wall = {side: C.median([run["process_s"] for run in runs[side]]) for side in runs}
    totals.setdefault("torch", nan)
    wall.setdefault("torch", nan)
    rows.append(["training", f"{totals['scratchvae']:.1f}", f"{totals['torch']:.1f}",
                 f"{totals['torch'] / totals['scratchvae']:.2f}x"])
    rows.append(["whole run", f"{wall['scratchvae']:.1f}", f"{wall['torch']:.1f}", f"{wall['torch'] / wall['scratchvae']:.2f}x"])
    print(C.fmt_table(["epoch", "scratchvae s", "PyTorch s", "speedup"], rows))
    print("training: the epochs' training loops; whole run: the process, start to exit (imports, data, "
          "evaluations and checkpoints included)")
    report = {"script": "bench_run", "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "argv": sys.argv[1:], "machine": C.machine_info(), "versions": C.versions(), "run": args.run,
              "threads": args.threads, "settle_s": args.settle, "rounds": args.rounds, "epochs": epochs,
              "images": args.images if args.run == "celeba-conv" else None,
              "runs": runs, "median_total_s": totals, "median_process_s": wall,
              "speedup_total": totals["torch"] / totals["scratchvae"],
              "speedup_whole_run": wall["torch"] / wall["scratchvae"]}
    path = args.json or C.default_json_path("bench_run" if args.run == "mnist" else "bench_run-celeba-conv")
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; wrote {C.write_json(path, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
