#!/usr/bin/env python
"""Evaluate a finished or interrupted training run on the test split.

    python examples/evaluate_run.py RUN_DIR [--params best|last] [--iwae-k 5000]

Rebuilds the model from ``RUN_DIR/checkpoint.npz`` (its config), loads the
parameters of ``best.npz`` (the best validation epoch, written with
``--keep-best``) or of the checkpoint, and prints the test negative ELBO and
the importance-weighted bound on the test NLL (Burda et al., k samples per
image). Writes ``RUN_DIR/evaluation-<params>.json``.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy

from scratchvae import backend as backend_mod
from scratchvae import checkpoint, datasets
from scratchvae.atomic import atomic_write
from scratchvae.train import TrainConfig, build_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--params", choices=("best", "last"), default="best",
                   help="best.npz (best validation epoch; default) or the checkpoint's last parameters")
    p.add_argument("--iwae-k", type=int, default=5000, help="importance samples per test image (default 5000)")
    p.add_argument("--seed", type=int, default=7, help="seed of the IWAE samples")
    args = p.parse_args(argv)
    run = pathlib.Path(args.run_dir)
    try:
        _, meta = checkpoint.load(run / "checkpoint.npz")
        cfg = TrainConfig(**meta["config"])
        arrays, pmeta = checkpoint.load(run / ("best.npz" if args.params == "best" else "checkpoint.npz"))
    except checkpoint.CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    be = backend_mod.get(cfg.backend)
    data = datasets.load(cfg.dataset, data_dir=cfg.data_dir, binarize=cfg.binarize, rng=cfg.seed)
    model = build_model(cfg, data.image_shape, be)
    for name, a in model.params.items():
        a[...] = be.asarray(arrays[f"param/{name}"])
    x_test = be.asarray(data.test, dtype=cfg.dtype)
    elbo = model.evaluate(x_test, be.rng(args.seed))
    t0 = time.perf_counter()
    rng = be.rng(args.seed + 1)
    bounds = [model.iwae_bound(x_test[i:i + 100], args.iwae_k, rng) for i in range(0, x_test.shape[0], 100)]
    nll = -float(numpy.concatenate([be.asnumpy(b) for b in bounds]).mean())
    result = {"run": str(run), "params": args.params, "epoch": pmeta.get("epoch"),
              "test_neg_elbo": elbo["loss"], "test_nll_iwae": nll, "iwae_k": args.iwae_k,
              "iwae_seconds": time.perf_counter() - t0}
    print(f"{run} ({args.params} parameters, epoch {result['epoch']}): test negative ELBO {elbo['loss']:.3f}, "
          f"test NLL (IWAE, k={args.iwae_k}) {nll:.3f} nats")
    with atomic_write(run / f"evaluation-{args.params}.json") as f:
        f.write((json.dumps(result, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
