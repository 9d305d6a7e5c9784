#!/usr/bin/env python
"""Draw a trained run's figures from its folder (a run trained with --no-figures, or one still training).

    python examples/draw_figures.py RUN [--params auto|best|last] [--out DIR]

Rebuilds the model from ``RUN/checkpoint.npz``, loads the parameters of
``best.npz`` or of the checkpoint (as ``evaluate_run.py`` does) and writes
every figure of a finished run into ``--out`` (default ``RUN/figures``, so
that the run's own files are left as they are): samples (drawn top-down for
a hierarchy), reconstructions, curves, posterior collapse (per level for a
hierarchy), the latent space, the manifold, interpolations and a
VampPrior's pseudo-inputs. For a VampPrior it also measures how the test
split uses the prior's components (``figures.json``:
``prior_component_usage``).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from scratchvae import analysis, figures
from scratchvae.cli import USER_ERRORS, describe_error
from scratchvae.reload import load_trained


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--params", choices=("auto", "best", "last"), default="auto",
                   help="best.npz, the checkpoint's last parameters, or auto: best for a --keep-best run (default)")
    p.add_argument("--out", help="folder for the PNGs (default RUN/figures)")
    args = p.parse_args(argv)
    run = pathlib.Path(args.run_dir)
    out = pathlib.Path(args.out) if args.out else run / "figures"
    try:
        model, data, cfg, meta, params = load_trained(run, args.params)
        drawn = figures.save_all(model, out, data.test, np.random.default_rng(cfg.seed), labels=data.test_labels,
                                 history=meta["history"], run_id=meta.get("run_id"), epoch=meta["params_epoch"])
        usage = analysis.prior_component_usage(model, data.test, np.random.default_rng(cfg.seed))
    except (*USER_ERRORS, OSError) as err:
        print(f"error: {describe_error(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted; the figures drawn so far are in {out}", file=sys.stderr)
        return 130
    summary = {"run_id": meta.get("run_id"), "params": params, "epoch": meta["params_epoch"], "figures": drawn,
               "prior_component_usage": usage}
    (out / "figures.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    if usage is not None:
        print(f"VampPrior: the test split's top-level codes use {usage['effective_components']:.0f} of its "
              f"{usage['components']} components (exp of the entropy of their shares); "
              f"{usage['pseudo_pixels_at_0']:.1%} of the pseudo-inputs' pixels are clamped at 0")
    print(f"{len(drawn)} figures of {run} ({params} parameters, epoch {meta['params_epoch']}) in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
