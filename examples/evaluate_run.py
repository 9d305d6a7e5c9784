#!/usr/bin/env python
"""Evaluate a finished or interrupted training run on the test split.

    python examples/evaluate_run.py RUN_DIR [--params auto|best|last] [--iwae-k 5000] [--data-dir DIR]

Rebuilds the model from ``RUN_DIR/checkpoint.npz`` (its config), loads the
parameters of ``best.npz`` (the best validation epoch, written with
``--keep-best``) or of the checkpoint, and prints the test negative ELBO and
the importance-weighted bound on the test NLL (Burda et al., k samples per
image). ``--params auto`` (the default) takes ``best`` for a run trained
with ``--keep-best`` and ``last`` otherwise; a ``best.npz`` written by another
run is refused, and so is a folder whose files belong to another run than
its checkpoint. Writes ``RUN_DIR/evaluation-<params>.json``. Progress shows
as a bar on a terminal and as a line at every tenth of the images (with the
time left) otherwise; Ctrl-C or SIGTERM ends it with one ``error:`` line and
writes nothing.
"""
from __future__ import annotations

import argparse
import pathlib
import signal
import sys
import time

from scratchvae.atomic import write_json
from scratchvae.cli import USER_ERRORS, describe_error
from scratchvae.evaluation import iwae_test_nll
from scratchvae.reload import load_trained
from scratchvae.runfolder import run_ids


def evaluate(run: pathlib.Path, params: str, iwae_k: int, seed: int, progress, data_dir=None, log=None) -> dict:
    model, data, cfg, meta, params = load_trained(run, params, data_dir=data_dir)
    others = {name: rid for name, rid in run_ids(run).items() if rid != meta.get("run_id")}
    if others:
        name, rid = next(iter(others.items()))
        raise ValueError(f"{run} holds files of another run ({name}: run {rid}; its checkpoint.npz: run "
                         f"{meta.get('run_id')}), so results written there would be filed under the wrong run; "
                         "evaluate the checkpoint in its own run folder")
    elbo = model.evaluate(data.test_dev, model.backend.rng(seed))
    t0 = time.perf_counter()
    nll = iwae_test_nll(model, data.test_dev, iwae_k, model.backend.rng(seed + 1), progress=progress,
                        log=log)
    return {"run": str(run), "run_id": meta.get("run_id"), "params": params, "epoch": meta["params_epoch"],
            "test_neg_elbo": elbo["loss"], "test_nll_iwae": nll, "iwae_k": iwae_k,
            "iwae_seconds": time.perf_counter() - t0}


def _interrupt(signum, frame):
    raise KeyboardInterrupt   # SIGTERM (a scheduler's stop) ends the evaluation as Ctrl-C does


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--params", choices=("auto", "best", "last"), default="auto",
                   help="best.npz (best validation epoch), the checkpoint's last parameters, or auto: best for a "
                        "run trained with --keep-best, else last (default)")
    p.add_argument("--iwae-k", type=int, default=5000, help="importance samples per test image (default 5000)")
    p.add_argument("--seed", type=int, default=7, help="seed of the IWAE samples")
    p.add_argument("--data-dir", help="where the run's data is now, when it moved (checked against the run's "
                                      "record of its data)")
    p.add_argument("--progress", action="store_true", default=None,
                   help="force the progress bar on (default: on a terminal)")
    args = p.parse_args(argv)
    if args.iwae_k < 1:
        print(f"error: --iwae-k must be >= 1, got {args.iwae_k}", file=sys.stderr)
        return 1
    run = pathlib.Path(args.run_dir)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = evaluate(run, args.params, args.iwae_k, args.seed, args.progress, args.data_dir,
                          log=lambda line: print(line, flush=True))
    except (*USER_ERRORS, OSError) as err:
        print(f"error: {describe_error(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing was written into {run}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{run} ({result['params']} parameters, epoch {result['epoch']}): test negative ELBO "
          f"{result['test_neg_elbo']:.3f}, test NLL (IWAE, k={args.iwae_k}) {result['test_nll_iwae']:.3f} nats")
    target = run / f"evaluation-{result['params']}.json"
    try:
        write_json(target, result)
    except OSError as err:
        print(f"error: {describe_error(err)}; the figures above were not saved to {target}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
