"""The training program behind ``examples/train_mnist.py``.

:class:`TrainConfig` is the typed config; :func:`train` runs it and writes,
into ``config.out``:

* ``metrics.jsonl``: one JSON object per epoch (train and test negative ELBO,
  recon, KL, seconds, images/s);
* ``checkpoint.npz``: parameters, Adam state, position, random state, config
  and history, written atomically after every epoch (and on Ctrl-C);
* ``best.npz`` (with ``keep_best``): the parameters of the epoch with the
  lowest validation negative ELBO; the final test figures, the IWAE bound and
  the figures then use them;
* ``summary.json``: config, backend, device, versions, final figures;
* the figures of :mod:`scratchvae.figures`.

All randomness (shuffling, noise eps, dynamic binarization) comes from one
host NumPy generator seeded by ``config.seed`` and saved in every checkpoint,
so a resumed run ends bit-identical to an uninterrupted one on NumPy.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import signal
import sys
import time

import numpy

from . import backend as backend_mod
from . import checkpoint, datasets
from .atomic import atomic_write
from .optim import Adam, geometric_lr
from .vae import NonFiniteLoss, conv_autoencoder, conv_vae, mlp_autoencoder, mlp_vae

__all__ = ["TrainConfig", "TrainingDiverged", "train", "build_model", "load_parameters", "iwae_test_nll",
           "build_parser", "main"]


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (the command line's flags)."""

    backend: str = "numpy"
    dataset: str = "binarized-mnist"
    data_dir: str | None = None
    binarize: str | None = None
    arch: str = "mlp"
    hidden: tuple = (400,)
    channels: tuple = (32, 64)
    latent_dim: int = 20
    activation: str = "relu"
    likelihood: str = "bernoulli"
    model: str = "vae"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    lr_final: float | None = None
    beta: float = 1.0
    kl_warmup: float = 0.0
    free_bits: float = 0.0
    seed: int = 0
    dtype: str = "float32"
    limit: int | None = None
    test_limit: int | None = None
    iwae_k: int = 0
    keep_best: bool = False
    patience: int = 0
    out: str = "runs/latest"
    fused: bool = True
    figures: bool = True

    def __post_init__(self):
        self.hidden = tuple(int(h) for h in self.hidden)
        self.channels = tuple(int(c) for c in self.channels)
        choices = {"arch": ("mlp", "conv"), "model": ("vae", "ae"), "likelihood": ("bernoulli", "gaussian"),
                   "dtype": ("float32", "float64"), "backend": backend_mod.NAMES,
                   "binarize": (None, "static", "dynamic")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "latent_dim": self.latent_dim}
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if self.lr <= 0 or self.beta < 0 or self.kl_warmup < 0 or self.free_bits < 0 or self.iwae_k < 0:
            raise ValueError("lr must be > 0 and beta, kl_warmup, free_bits, iwae_k >= 0")
        if self.lr_final is not None and self.lr_final <= 0:
            raise ValueError(f"lr_final must be > 0 when given, got {self.lr_final}")
        if self.patience < 0 or (self.patience > 0 and not self.keep_best):
            raise ValueError(f"patience must be >= 0 and needs keep_best (it counts epochs without a better "
                             f"validation loss); got patience={self.patience}, keep_best={self.keep_best}")
        for key in ("limit", "test_limit"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 when given")


# Settings that define the model and the optimization: a resumed run must keep them.
RUN_DEFINING = ("dataset", "binarize", "arch", "hidden", "channels", "latent_dim", "activation", "likelihood",
                "model", "batch_size", "lr", "lr_final", "beta", "kl_warmup", "free_bits", "seed", "dtype", "limit", "fused")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the message says when and which term."""


def build_model(cfg: TrainConfig, image_shape, be):
    """The model ``cfg`` asks for, on backend ``be``."""
    common = dict(latent_dim=cfg.latent_dim, likelihood=cfg.likelihood, backend=be, dtype=cfg.dtype,
                  seed=cfg.seed, activation=cfg.activation, fused=cfg.fused)
    if cfg.arch == "mlp":
        build = mlp_vae if cfg.model == "vae" else mlp_autoencoder
        return build(input_dim=math.prod(image_shape), hidden=cfg.hidden, input_shape=tuple(image_shape), **common)
    build = conv_vae if cfg.model == "vae" else conv_autoencoder
    return build(input_shape=tuple(image_shape), channels=cfg.channels, hidden=cfg.hidden[0] if cfg.hidden else None,
                 **common)


def _versions():
    out = {"python": platform.python_version(), "numpy": numpy.__version__}
    for name in ("numba", "cupy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # not installed or broken: just not reported
            out[name] = None
    return out


def _write_json(path: pathlib.Path, obj) -> None:
    text = obj if isinstance(obj, str) else json.dumps(obj, indent=2, default=_json_default) + "\n"
    with atomic_write(path) as f:
        f.write(text.encode())


def _json_default(o):
    if isinstance(o, numpy.generic):
        return o.item()
    if isinstance(o, numpy.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON-serializable: {type(o).__name__}")


class _StopFlag:
    """SIGINT sets a flag that the loop checks between steps; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: Ctrl-C handling is the caller's business
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _checkpoint_arrays(model, opt_state, be):
    arrays = {}
    for name, p in model.params.items():
        arrays[f"param/{name}"] = be.asnumpy(p)
        arrays[f"adam_m/{name}"] = be.asnumpy(opt_state["m"][name])
        arrays[f"adam_v/{name}"] = be.asnumpy(opt_state["v"][name])
    return arrays


def _restore(path, arrays, model, opt_state, be):
    """Copy ``arrays`` (from a checkpoint file) into the model's parameters and, unless
    ``opt_state`` is None, the Adam moments; every array is checked against its target."""
    for name, p in model.params.items():
        targets = [("param", p)]
        if opt_state is not None:
            targets += [("adam_m", opt_state["m"][name]), ("adam_v", opt_state["v"][name])]
        for prefix, target in targets:
            key = f"{prefix}/{name}"
            if key not in arrays:
                raise checkpoint.CheckpointError(f"checkpoint {path} does not fit the model: no array {key!r}")
            a = arrays[key]
            if a.shape != target.shape or a.dtype != target.dtype:
                raise checkpoint.CheckpointError(
                    f"checkpoint {path} does not fit the model: {key} is {a.shape} {a.dtype}, "
                    f"the model needs {tuple(target.shape)} {target.dtype}")
            target[...] = be.asarray(a)
    extra = {k.split("/", 1)[1] for k in arrays} - set(model.params)
    if extra:
        raise checkpoint.CheckpointError(f"checkpoint {path} does not fit the model: unknown parameters {sorted(extra)}")


def load_parameters(path, model, be) -> dict:
    """Load the parameters of a checkpoint or ``best.npz`` into ``model`` (checked); returns the file's meta."""
    arrays, meta = checkpoint.load(path)
    _restore(path, {k: a for k, a in arrays.items() if k.startswith("param/")}, model, None, be)
    return meta


def iwae_test_nll(model, x, k, rng, *, chunk=100, progress=None) -> float:
    """The test NLL as papers quote it: ``-mean`` of the IWAE bound with ``k`` samples per image.

    ``x`` (N, D) on the model's backend, ``rng`` a generator of that backend;
    the images go through :meth:`VAE.iwae_bound` ``chunk`` at a time (the
    progress bar counts chunks).
    """
    from tqdm.auto import tqdm

    bounds = [model.iwae_bound(x[start:start + chunk], k, rng)
              for start in tqdm(range(0, x.shape[0], chunk), desc=f"IWAE k={k}", leave=False,
                                disable=(not progress) if progress is not None else None, file=sys.stderr)]
    return -float(numpy.concatenate(bounds).mean())


def train(cfg: TrainConfig, *, resume: str | os.PathLike | None = None, log=print, on_step=None,
          progress: bool | None = None) -> dict:
    """Train the model ``cfg`` describes; returns the summary dict.

    Parameters
    ----------
    cfg : TrainConfig
    resume : path, optional
        A run folder (or its ``checkpoint.npz``) to continue from.
    log : callable(str)
        Where the per-epoch lines go.
    on_step : callable(step, stats), optional
        Called after every optimizer step (tests use it to inject faults).
    progress : bool or None
        Show a progress bar (None: only on a terminal).

    Raises
    ------
    TrainingDiverged
        The loss became NaN or Inf; nothing is written to the checkpoint.
    """
    from tqdm.auto import tqdm

    be = backend_mod.get(cfg.backend)
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.npz"

    # -- data: refused before training if bad -------------------------------------------
    data = datasets.load(cfg.dataset, data_dir=cfg.data_dir, binarize=cfg.binarize, rng=cfg.seed, log=log)
    x_train, x_test, test_labels = data.train, data.test, data.test_labels
    if cfg.limit is not None:
        x_train = x_train[:cfg.limit]
    if cfg.test_limit is not None and cfg.test_limit < x_test.shape[0]:
        # evenly spaced, not the first N: MNIST's test split is ordered by class
        keep = numpy.linspace(0, x_test.shape[0] - 1, cfg.test_limit).round().astype(numpy.int64)
        x_test = x_test[keep]
        test_labels = None if test_labels is None else test_labels[keep]
    x_valid = data.valid if cfg.keep_best else None
    if cfg.keep_best and x_valid is None:
        raise ValueError(f"keep_best needs a validation split and dataset {cfg.dataset!r} has none")
    for name, x in (("training data", x_train), ("validation data", x_valid), ("test data", x_test)):
        if x is not None:
            datasets.validate_images(x, cfg.likelihood, name=f"{cfg.dataset} {name}", expected_shape=data.image_shape)
    dtype = numpy.dtype(cfg.dtype)
    x_train = numpy.ascontiguousarray(x_train, dtype=dtype)
    x_test_dev = be.asarray(x_test, dtype=dtype)
    x_valid_dev = None if x_valid is None else be.asarray(x_valid, dtype=dtype)
    best_path = out / "best.npz"
    dynamic = data.dynamic_binarization

    # -- model, optimizer, random state -------------------------------------------------
    model = build_model(cfg, data.image_shape, be)
    opt = Adam(lr=cfg.lr, fused=cfg.fused)
    opt_state = opt.init(model.params)
    rng = numpy.random.default_rng(cfg.seed)
    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    epoch, step, batch_start, history, partial = 0, 0, 0, [], None
    best = {"epoch": 0, "valid_loss": math.inf}
    epoch_rng_state = resume_rng_state = None
    initial = None

    def test_metrics(tag):
        return model.evaluate(x_test_dev, be.rng(cfg.seed * 1_000_003 + tag))

    def valid_metrics(tag):
        return model.evaluate(x_valid_dev, be.rng(cfg.seed * 1_000_003 + 500_000 + tag))

    if resume is not None:
        path = pathlib.Path(resume)
        path = path / "checkpoint.npz" if path.is_dir() else path
        arrays, meta = checkpoint.load(path)
        stored_epochs = meta["config"]["epochs"]
        if cfg.lr_final is not None and cfg.epochs != stored_epochs:
            raise ValueError(f"--resume {path}: the learning rate decays to lr_final over the run's {stored_epochs} "
                             f"epochs; resuming with epochs={cfg.epochs} would change the schedule midway. "
                             f"Resume with epochs={stored_epochs}, or start a new run")
        _restore(path, arrays, model, opt_state, be)
        opt_state["step"] = int(meta["adam_step"])
        epoch, step, batch_start = int(meta["epoch"]), int(meta["step"]), int(meta["batch_in_epoch"])
        rng.bit_generator.state = meta["rng_state"]
        resume_rng_state = meta["rng_state"]
        epoch_rng_state = meta["epoch_rng_state"]
        history, partial, initial = meta["history"], meta["partial"], meta["initial_test"]
        best = meta.get("best", best)
        log(f"resumed from {path}: epoch {epoch}, step {step}" + (f", batch {batch_start}" if batch_start else ""))
    else:
        initial = test_metrics(0)
        log(f"{cfg.model} ({cfg.arch}) on {cfg.dataset}: {n} train / {x_test.shape[0]} test images, "
            f"{model.num_params():,} parameters, backend {be.name} ({be.device}); "
            f"initial test loss {initial['loss']:.2f}")

    def save(batch_in_epoch, sums):
        meta = {"epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, "adam_step": opt_state["step"],
                "rng_state": rng.bit_generator.state, "epoch_rng_state": epoch_rng_state,
                "config": dataclasses.asdict(cfg), "history": history, "partial": sums, "initial_test": initial,
                "best": best}
        checkpoint.save(ckpt_path, _checkpoint_arrays(model, opt_state, be), json.loads(json.dumps(meta, default=_json_default)))

    def write_metrics():
        _write_json(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))

    summary = {"config": dataclasses.asdict(cfg), "backend": be.name, "device": be.device,
               "versions": _versions(), "cpu_count": os.cpu_count(), "initial_test": initial}
    write_metrics()
    status = "running"
    with _StopFlag() as stop:
        while epoch < cfg.epochs:
            if batch_start == 0:
                epoch_rng_state = rng.bit_generator.state
                perm = rng.permutation(n)
                sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0, "batches": 0, "seconds": 0.0}
            else:  # resuming mid-epoch: replay the epoch's permutation, then the saved state
                rng.bit_generator.state = epoch_rng_state
                perm = rng.permutation(n)
                rng.bit_generator.state = resume_rng_state
                sums = dict(partial)
            t0 = time.perf_counter()
            bar = tqdm(total=n, initial=min(n, batch_start * cfg.batch_size), unit="img", leave=False,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=(not progress) if progress is not None else None,
                       file=sys.stderr)
            for b in range(batch_start, steps_per_epoch):
                idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                xb = x_train[idx]                                               # (B, D) host
                if dynamic:
                    xb = datasets.binarize_dynamic(xb, rng)
                eps = rng.standard_normal((xb.shape[0], cfg.latent_dim)).astype(dtype)   # (B, L)
                beta = cfg.beta
                if cfg.kl_warmup > 0:
                    beta *= min(1.0, step / (cfg.kl_warmup * steps_per_epoch))
                model.zero_grad()
                try:
                    loss, stats = model.loss_and_grad(be.asarray(xb), eps=be.asarray(eps), beta=beta,
                                                      free_bits=cfg.free_bits, check_data=False)
                except NonFiniteLoss as err:
                    bar.close()
                    where = f"epoch {epoch + 1}, step {step + 1} (batch {b + 1} of {steps_per_epoch})"
                    kept = (f"the last good checkpoint {ckpt_path} (epoch {epoch}) is untouched"
                            if ckpt_path.exists() else "no checkpoint had been written yet")
                    summary.update(status="diverged", error=f"non-finite loss at {where}: {err}", history=history)
                    _write_json(out / "summary.json", summary)
                    raise TrainingDiverged(f"training stopped: non-finite loss at {where}: {err}; {kept}") from err
                opt_state = opt.step(model.params, model.grads, opt_state,
                                     lr=geometric_lr(cfg.lr, cfg.lr_final, step, total_steps))
                step += 1
                sums["loss"] += loss
                sums["recon"] += stats["recon"]
                sums["kl"] += stats["kl"]
                sums["batches"] += 1
                bar.update(xb.shape[0])
                if b % 20 == 0 and not bar.disable:
                    done = (b + 1 - batch_start) * cfg.batch_size
                    bar.set_postfix(loss=f"{sums['loss'] / sums['batches']:.2f}",
                                    img_s=f"{done / max(time.perf_counter() - t0, 1e-9):.0f}")
                if on_step is not None:
                    on_step(step, stats)
                if stop.requested and b + 1 < steps_per_epoch:
                    be.synchronize()
                    sums["seconds"] += time.perf_counter() - t0
                    save(b + 1, sums)
                    bar.close()
                    log(f"interrupted at epoch {epoch + 1}, step {step}: checkpoint saved to {ckpt_path}; "
                        f"continue with --resume {out}")
                    summary.update(status="interrupted", history=history)
                    _write_json(out / "summary.json", summary)
                    return summary
            be.synchronize()
            bar.close()
            seconds = sums["seconds"] + time.perf_counter() - t0
            batch_start = 0
            test = test_metrics(epoch + 1)
            nb = sums["batches"]
            record = {"epoch": epoch + 1, "step": step, "train_loss": sums["loss"] / nb,
                      "train_recon": sums["recon"] / nb, "train_kl": sums["kl"] / nb,
                      "test_loss": test["loss"], "test_recon": test["recon"], "test_kl": test["kl"],
                      "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else float("nan"),
                      "lr": geometric_lr(cfg.lr, cfg.lr_final, step - 1, total_steps)}
            if cfg.keep_best:
                record["valid_loss"] = valid_metrics(epoch + 1)["loss"]
                if record["valid_loss"] < best["valid_loss"]:
                    best = {"epoch": epoch + 1, "valid_loss": record["valid_loss"]}
                    # written before the checkpoint that names it, so a crash in between cannot
                    # leave a checkpoint pointing at an older best.npz
                    checkpoint.save(best_path, {f"param/{k}": be.asnumpy(p) for k, p in model.params.items()},
                                    {"epoch": epoch + 1, "valid_loss": record["valid_loss"]})
            history.append(record)
            epoch += 1
            save(0, None)
            write_metrics()
            log(f"epoch {epoch:3d}/{cfg.epochs}  train {record['train_loss']:8.3f}  "
                + (f"valid {record['valid_loss']:8.3f}{'*' if best['epoch'] == epoch else ' '} "
                   if cfg.keep_best else "")
                + f"test {record['test_loss']:8.3f} (recon {record['test_recon']:7.3f}, kl {record['test_kl']:6.3f})  "
                f"{seconds:6.1f} s  {record['images_per_s']:8.0f} img/s")
            if cfg.patience and epoch - best["epoch"] >= cfg.patience and epoch < cfg.epochs:
                log(f"early stop after epoch {epoch}: no better validation loss for {cfg.patience} epochs "
                    f"(best {best['valid_loss']:.3f} at epoch {best['epoch']})")
                summary["stopped_early"] = True
                break
            if stop.requested:
                log(f"interrupted after epoch {epoch}: checkpoint saved to {ckpt_path}; continue with --resume {out}")
                summary.update(status="interrupted", history=history)
                _write_json(out / "summary.json", summary)
                return summary
        status = "finished"

    final = history[-1] if history else {}
    if cfg.keep_best and best["epoch"] > 0:
        load_parameters(best_path, model, be)
        final = history[best["epoch"] - 1]
        summary.update(best_epoch=best["epoch"], best_valid_loss=best["valid_loss"])
        log(f"using the parameters of epoch {best['epoch']} (validation loss {best['valid_loss']:.3f}) from {best_path}")
    summary.update(status=status, history=history, epochs=epoch, steps=step,
                   test_loss=final.get("test_loss"), test_recon=final.get("test_recon"), test_kl=final.get("test_kl"),
                   train_seconds=sum(h["seconds"] for h in history))
    if cfg.iwae_k > 0 and cfg.model == "vae":
        t0 = time.perf_counter()
        nll = iwae_test_nll(model, x_test_dev, cfg.iwae_k, be.rng(cfg.seed + 7), progress=progress)
        summary.update(test_nll_iwae=nll, iwae_k=cfg.iwae_k, iwae_seconds=time.perf_counter() - t0)
        log(f"test NLL (IWAE bound, k={cfg.iwae_k}): {nll:.2f} nats")
    if cfg.figures:
        from . import figures
        summary["figures"] = figures.save_all(model, out, x_test, numpy.random.default_rng(cfg.seed),
                                              labels=test_labels, history=history)
    _write_json(out / "summary.json", summary)
    log(f"final test negative ELBO {summary['test_loss']:.3f} nats; outputs in {out}")
    return summary


# -- command line ---------------------------------------------------------------------

def _int_tuple(text):
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_mnist.py",
        description="Train a VAE (or a plain autoencoder) on MNIST with scratchvae and write metrics, "
                    "checkpoints and figures into --out.",
        argument_default=argparse.SUPPRESS)
    d = TrainConfig()
    a = p.add_argument
    a("--backend", choices=backend_mod.NAMES, help=f"array backend: numpy (CPU) or cupy (GPU) (default {d.backend})")
    a("--dataset", choices=datasets.DATASETS,
      help="binarized-mnist: static binarized MNIST shipped with scratchvae (default); mnist: grayscale MNIST, "
           "downloaded on first use; idx: IDX files in --data-dir")
    a("--data-dir", help="folder for downloaded or IDX files (default: the user cache folder)")
    a("--binarize", choices=("static", "dynamic"), help="turn grayscale pixels into 0/1: once (static) or every epoch "
                                                       "(dynamic); default: use them as probabilities")
    a("--arch", choices=("mlp", "conv"), help=f"encoder/decoder architecture (default {d.arch})")
    a("--hidden", type=_int_tuple, help="hidden widths, comma-separated (mlp: every layer; conv: the Dense "
                                        "bottleneck) (default 400)")
    a("--channels", type=_int_tuple, help="conv channels of the stride-2 convolutions (default 32,64)")
    a("--latent-dim", type=int, help=f"latent dimensions (default {d.latent_dim})")
    a("--activation", choices=("relu", "leaky_relu", "tanh", "softplus"), help="hidden activation (default relu)")
    a("--likelihood", choices=("bernoulli", "gaussian"), help="p(x|z): bernoulli (logits) or gaussian with a learned "
                                                              "per-pixel sigma (default bernoulli)")
    a("--model", choices=("vae", "ae"), help="vae, or a plain autoencoder for comparison (default vae)")
    a("--epochs", type=int, help=f"total epochs; with --resume, train up to this many (default {d.epochs})")
    a("--batch-size", type=int, help=f"examples per step (default {d.batch_size})")
    a("--lr", type=float, help=f"Adam learning rate (default {d.lr})")
    a("--lr-final", type=float, help="decay the learning rate geometrically, step by step, from --lr to this "
                                     "value at the end of --epochs (default: constant)")
    a("--beta", type=float, help="weight of the KL term (beta-VAE; default 1 = the ELBO)")
    a("--kl-warmup", type=float, metavar="EPOCHS", help="ramp beta linearly from 0 over this many epochs (default 0)")
    a("--free-bits", type=float, help="per-dimension KL floor in nats against posterior collapse (default 0: off)")
    a("--seed", type=int, help="seed for weights, shuffling and noise (default 0)")
    a("--dtype", choices=("float32", "float64"), help="floating-point precision (default float32)")
    a("--limit", type=int, metavar="N", help="use only the first N training images (smoke runs)")
    a("--test-limit", type=int, metavar="N", help="use only N evenly spaced test images (the test split is ordered by class)")
    a("--iwae-k", type=int, metavar="K", help="importance samples for the final test NLL (5000 is the paper figure; "
                                              "0 skips, default)")
    a("--keep-best", dest="keep_best", action="store_true",
      help="evaluate the validation split after every epoch, keep the best parameters in best.npz and report "
           "the final test figures, IWAE bound and figures with them (model selection; needs a valid split)")
    a("--patience", type=int, metavar="EPOCHS", help="with --keep-best: stop after this many epochs without a "
                                                      "better validation loss (default 0: never)")
    a("--out", help=f"output folder (default {d.out}; with --resume, the resumed folder)")
    a("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint.npz")
    a("--no-fused", dest="fused", action="store_false", help="use the plain array loss instead of the Numba kernels")
    a("--no-figures", dest="figures", action="store_false", help="skip the PNG figures")
    a("--progress", dest="progress", action="store_true", help="force the progress bar on (default: on a terminal)")
    return p


def config_from_args(args: dict) -> tuple[TrainConfig, str | None]:
    """Merge parsed flags into a config; with --resume, onto the checkpoint's config."""
    args = dict(args)
    args.pop("progress", None)
    resume = args.pop("resume", None)
    if resume is None:
        return TrainConfig(**args), None
    path = pathlib.Path(resume)
    ckpt = path / "checkpoint.npz" if path.is_dir() else path
    _, meta = checkpoint.load(ckpt)
    stored = meta["config"]
    for key in RUN_DEFINING:
        if key in args:
            given = tuple(args[key]) if isinstance(args[key], tuple) else args[key]
            old = tuple(stored[key]) if isinstance(stored[key], list) else stored[key]
            if given != old:
                raise ValueError(f"--resume {resume}: the run was trained with {key}={old!r}, "
                                 f"you passed {given!r}; drop the flag or start a new run")
    merged = dict(stored, **args)
    if "out" not in args:
        merged["out"] = str(ckpt.parent)
    return TrainConfig(**merged), str(ckpt)


def main(argv=None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    progress = args.get("progress") or None
    try:
        cfg, resume = config_from_args(args)
        summary = train(cfg, resume=resume, progress=progress)
    except (ValueError, TypeError, backend_mod.BackendUnavailable, checkpoint.CheckpointError,
            datasets.DatasetUnavailable, datasets.DatasetIntegrityError, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if summary.get("status") == "interrupted":
        return 130
    return 0
