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

from scratchvae import backend as backend_mod
from scratchvae import checkpoint, datasets
from scratchvae.atomic import atomic_write
from scratchvae.train import TrainConfig, build_model, iwae_test_nll, load_parameters


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
        be = backend_mod.get(cfg.backend)
        data = datasets.load(cfg.dataset, data_dir=cfg.data_dir, binarize=cfg.binarize, rng=cfg.seed)
        model = build_model(cfg, data.image_shape, be)
        pmeta = load_parameters(run / ("best.npz" if args.params == "best" else "checkpoint.npz"), model, be)
    except checkpoint.CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    x_test = be.asarray(data.test, dtype=cfg.dtype)
    elbo = model.evaluate(x_test, be.rng(args.seed))
    t0 = time.perf_counter()
    nll = iwae_test_nll(model, x_test, args.iwae_k, be.rng(args.seed + 1), progress=False)
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
