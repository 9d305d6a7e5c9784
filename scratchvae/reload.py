"""A trained run, back from its folder: the model with its parameters and the data as the run saw it."""
from __future__ import annotations

import dataclasses
import pathlib

from . import backend as backend_mod
from . import checkpoint
from .build import build_model
from .run_data import check_same_data, prepare_data

__all__ = ["load_trained"]


def load_trained(run, params: str = "auto", log=None, data_dir=None):
    """A trained run's model with its parameters: ``(model, data, cfg, meta, params)``.

    ``run`` is a run folder; ``params`` ``"best"`` (``best.npz``), ``"last"``
    (the checkpoint's) or ``"auto"`` (best for a run trained with
    ``--keep-best``). ``data`` is :func:`prepare_data`'s, as the run saw it;
    ``data_dir`` replaces the folder the run recorded (the data moved), and
    the data found there must be the run's (its SHA-256).
    """
    run = pathlib.Path(run)
    _, meta, cfg = checkpoint.load_run(run / "checkpoint.npz")
    if data_dir is not None:
        cfg = dataclasses.replace(cfg, data_dir=str(pathlib.Path(data_dir).expanduser().absolute()))
    if params == "auto":
        params = "best" if cfg.keep_best and meta.get("best", {}).get("epoch", 0) > 0 else "last"
    elif params == "best" and not (run / "best.npz").exists():
        raise ValueError(f"--params best: {run} has no best.npz (the run was trained without --keep-best); "
                         "use --params last")
    be = backend_mod.get(cfg.backend)
    data = prepare_data(cfg, be, log)
    check_same_data(meta, data, run / "checkpoint.npz", cfg)
    model = build_model(cfg, data.image_shape, be)
    source = run / ("best.npz" if params == "best" else "checkpoint.npz")
    pmeta = checkpoint.load_parameters(source, model, be, run_id=meta.get("run_id"))
    return model, data, cfg, dict(meta, params_epoch=pmeta.get("epoch")), params
