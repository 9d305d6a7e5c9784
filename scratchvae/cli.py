"""The training command line (``examples/train_mnist.py``, ``python -m scratchvae``, the ``scratchvae``
command): flags -> :class:`TrainConfig` -> :func:`train`.

Every failure the user can cause or meet (a bad flag value, a run folder in
use, a corrupted checkpoint, missing data, a full disk, a NaN loss) ends with
one ``error:`` line that says what happened and what was kept, and exit
code 1; never a traceback. Ctrl-C or SIGTERM saves a checkpoint (or, before
training, stops at once) and exits with 130. In an MPI job every rank first
agrees on ``--distributed`` (:func:`scratchvae.distributed.init`).
"""
from __future__ import annotations

import argparse
import contextlib
import pathlib
import signal
import sys
import time

from . import backend as backend_mod
from . import checkpoint, datasets, distributed
from .atomic import describe_os_error
from .config import AE_UNUSED, CHOICES, RUN_DEFINING, TrainConfig
from .runfolder import RunFolder, RunFolderError, new_run_folder, point_latest
from .train import RunFailed, TrainingDiverged, train

__all__ = ["build_parser", "config_from_args", "main", "USER_ERRORS", "describe_error", "IWAE_DEFAULT_SAMPLES"]

# The samples per image of --objective iwae without --samples (Burda et al.'s k = 5).
IWAE_DEFAULT_SAMPLES = 5

# What the command line turns into one "error:" line (and exit code 1).
USER_ERRORS = (ValueError, TypeError, backend_mod.BackendUnavailable, checkpoint.CheckpointError,
               datasets.DatasetUnavailable, datasets.DatasetIntegrityError, TrainingDiverged, RunFailed,
               RunFolderError, distributed.DistributedUnavailable)


def describe_error(err: BaseException) -> str:
    """The text of the ``error:`` line for one of :data:`USER_ERRORS` or an ``OSError`` (which names its file)."""
    return describe_os_error(err) if isinstance(err, OSError) else str(err)


def _int_tuple(text):
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _offered(key):
    """The values the command line offers for ``key``: the config's choices (None is "not given")."""
    return tuple(c for c in CHOICES[key] if c is not None)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a VAE (or a plain autoencoder) on MNIST with scratchvae and write metrics, "
                    "checkpoints and figures into --out.",
        argument_default=argparse.SUPPRESS)
    d = TrainConfig()
    a = p.add_argument
    a("--backend", choices=backend_mod.NAMES, help=f"array backend: numpy (CPU) or cupy (GPU) (default {d.backend})")
    a("--dataset", choices=datasets.DATASETS,
      help="binarized-mnist: static binarized MNIST shipped with scratchvae (default); mnist: grayscale MNIST, "
           "downloaded on first use; fashion-mnist: Fashion-MNIST (from --data-dir or Debian's "
           "dataset-fashion-mnist package); idx: IDX files in --data-dir; folder: every image file under "
           "--data-dir (PNG, JPEG, BMP, WebP; decoded once and cached); celeba: CelebA as distributed, in --data-dir")
    a("--data-dir", help="folder of the data: IDX files, downloaded MNIST (default: the user cache folder), "
                         "your images (--dataset folder) or CelebA as distributed (--dataset celeba)")
    a("--color", choices=_offered("color"), help="--dataset folder/celeba: train on RGB (default) or grayscale images")
    a("--image-size", type=int, metavar="PIXELS", help="--dataset folder/celeba: center-crop to a square and resize "
                                                       f"to PIXELS x PIXELS (default {d.image_size})")
    a("--max-image-pixels", type=int, metavar="N", help="--dataset folder/celeba: refuse images of more than N "
                                                         f"pixels before decoding them (default {d.max_image_pixels:,})")
    a("--binarize", choices=_offered("binarize"), help="turn grayscale pixels into 0/1: once (static) or every epoch "
                                                       "(dynamic); default: use them as probabilities")
    a("--arch", choices=_offered("arch"), help="encoder/decoder architecture: mlp (Dense and --activation), "
      "gated (GatedDense layers and the log variance clamped to [-6, 2], the VampPrior paper's MLP) or conv "
      f"(default {d.arch})")
    a("--hidden", type=_int_tuple, help="hidden widths, comma-separated (mlp: every layer; conv: the Dense "
                                        "bottleneck) (default 400)")
    a("--channels", type=_int_tuple, help="conv channels of the stride-2 convolutions (default 32,64)")
    a("--downsample", choices=_offered("downsample"), help="--arch conv: halve the image with stride-2 convolutions "
                                                      "(default), or with 3x3 convolutions and 2x2 max-pooling "
                                                      "(the decoder then up-samples)")
    a("--latent-dim", type=int, help=f"latent dimensions (default {d.latent_dim})")
    a("--levels", type=int, metavar="T", help="stochastic levels of --latent-dim each (default 1); 2 with --arch "
      "gated is the VampPrior paper's hierarchical VAE: q(z2|x), q(z1|x,z2), p(z1|z2), p(x|z1,z2), the prior on z2")
    a("--activation", choices=_offered("activation"), help="hidden activation (default relu)")
    a("--init", choices=_offered("init"), help="the weights of the Dense and GatedDense layers (--arch mlp, gated): "
      "uniform, PyTorch's default U(-k, k), k = 1/sqrt(fan_in) (default), or he, N(0, 2/fan_in) as in the VampPrior "
      "code; biases stay uniform")
    a("--likelihood", choices=_offered("likelihood"), help="p(x|z): bernoulli (logits) or gaussian with a learned "
                                                              "per-pixel sigma (default bernoulli)")
    a("--prior", choices=_offered("prior"), help="p(z): standard N(0, I) (default), or vampprior, a "
      "mixture of the encoder's posteriors at --pseudo-inputs learned pseudo-inputs (its KL is then the "
      "one-sample estimate log q(z|x) - log p(z))")
    a("--pseudo-inputs", type=int, metavar="K", help=f"the VampPrior's components (default {d.pseudo_inputs})")
    a("--objective", choices=_offered("objective"), help="elbo (default) or iwae, the importance-weighted bound of "
      "--samples latents per image (Burda et al.)")
    a("--samples", type=int, metavar="S", help="latents per image: 1 for the ELBO (default), S >= 2 for --objective "
                                                "iwae (default 5 there)")
    a("--model", choices=_offered("model"), help="vae, or a plain autoencoder for comparison (default vae)")
    a("--epochs", type=int, help=f"total epochs; with --resume, train up to this many (default {d.epochs})")
    a("--batch-size", type=int, help=f"examples per step (default {d.batch_size})")
    a("--lr", type=float, help=f"Adam learning rate (default {d.lr})")
    a("--lr-final", type=float, help="decay the learning rate geometrically, step by step, from --lr to this "
                                     "value at the end of --epochs (default: constant)")
    a("--normalize-grads", dest="normalize_grads", action="store_true",
      help="divide each parameter's gradient by its L2 norm before the Adam step, as the VampPrior authors' "
           "code does (AdamNormGrad)")
    a("--beta", type=float, help="weight of the KL term (beta-VAE; default 1 = the ELBO; VAE only)")
    a("--kl-warmup", type=float, metavar="EPOCHS", help="ramp beta linearly from 0 over this many epochs "
                                                        "(default 0; VAE only)")
    a("--free-bits", type=float, help="per-dimension KL floor in nats against posterior collapse "
                                      "(default 0: off; VAE only)")
    a("--input-noise", type=float, metavar="P", help="train a denoising model: the encoder sees corrupted images "
                                                    "(binary data: a share P of the pixels set to random 0/1; "
                                                    "continuous data: Gaussian noise of standard deviation P) and "
                                                    "the reconstruction is scored against the clean ones (default 0)")
    a("--seed", type=int, help="seed for weights, shuffling and noise (default 0)")
    a("--dtype", choices=_offered("dtype"), help="floating-point precision (default float32)")
    a("--limit", type=int, metavar="N", help="use only the first N training images (smoke runs)")
    a("--test-limit", type=int, metavar="N", help="use only N evenly spaced test images (the test split is ordered by class)")
    a("--iwae-k", type=int, metavar="K", help="importance samples for the final test NLL (5000 is the paper figure; "
                                              "0 skips, default; VAE only)")
    a("--keep-best", dest="keep_best", action="store_true",
      help="evaluate the validation split after every epoch, keep the best parameters in best.npz and report "
           "the final test figures, IWAE bound and figures with them (model selection; needs a valid split)")
    a("--valid-k", type=int, metavar="K", help="with --keep-best: the validation loss is the negative IWAE bound "
      "with K samples per image (less noisy than the one-sample ELBO, and the figure the test NLL reports; "
      "default 0: the training objective at beta = 1)")
    a("--patience", type=int, metavar="EPOCHS", help="with --keep-best: stop after this many epochs without a "
                                                      "better validation loss (default 0: never)")
    a("--out", help="output folder, one run per folder (default: a new folder runs/DATE_TIME, with runs/latest "
                    "pointing at the newest; with --resume, the resumed folder)")
    a("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint.npz")
    a("--overwrite", dest="overwrite", action="store_true",
      help="--out holds an earlier run: delete its files and start a new run there (without this, such a "
           "folder is refused)")
    a("--no-fused", dest="fused", action="store_false", help="use the plain array loss instead of the Numba kernels")
    a("--no-figures", dest="figures", action="store_false", help="skip the PNG figures")
    a("--progress", dest="progress", action="store_true", help="force the progress bar on (default: on a terminal)")
    a("--distributed", dest="distributed", action="store_true",
      help="data-parallel training on the processes of an MPI job: mpiexec -n N python -m mpi4py "
           "examples/train_mnist.py --distributed ... (--batch-size is the global batch; needs the mpi extra)")
    return p


def config_from_args(args: dict) -> tuple[TrainConfig, str | None]:
    """Merge parsed flags into a config; with --resume, onto the checkpoint's config."""
    args = dict(args)
    for key in ("progress", "overwrite", "distributed"):
        args.pop(key, None)
    resume = args.pop("resume", None)
    given = [f"--{k.replace('_', '-')}" for k in AE_UNUSED if k in args]
    if args.get("model") == "ae" and given:
        raise ValueError(f"{', '.join(given)}: a plain autoencoder (--model ae) has no KL term and no "
                             "importance-weighted bound, so this does nothing; drop it or train a VAE")
    if args.get("data_dir"):   # recorded absolute, so evaluate_run.py finds the data from any folder
        args["data_dir"] = str(pathlib.Path(args["data_dir"]).expanduser().absolute())
    if args.get("objective") == "iwae" and "samples" not in args and resume is None:
        args["samples"] = IWAE_DEFAULT_SAMPLES
    if resume is None:
        return TrainConfig(**args), None
    path = pathlib.Path(resume)
    if not path.exists():
        raise ValueError(f"--resume {resume}: no such folder or file; pass a run folder (the --out of the run "
                         "to continue) or its checkpoint.npz")
    ckpt = path / "checkpoint.npz" if path.is_dir() else path
    if path.is_dir() and not ckpt.exists() and RunFolder(path).run_files():
        raise ValueError(f"--resume {resume}: the run in {path} stopped before writing its first checkpoint "
                         f"(there is no {ckpt.name}), so nothing can be resumed; start it again with "
                         f"--out {path} --overwrite")
    if ckpt.name != "checkpoint.npz" and "out" not in args:
        raise ValueError(f"--resume {resume}: this file is not a run folder's checkpoint.npz, so it names no run "
                         "folder to continue in; pass --out to choose the folder the continued run writes into")
    _, _, stored = checkpoint.load_run(ckpt)
    for key in RUN_DEFINING:
        if key in args:
            given = tuple(args[key]) if isinstance(args[key], (tuple, list)) else args[key]
            old = getattr(stored, key)
            if given != old:
                raise ValueError(f"--resume {resume}: the run was trained with {key}={old!r}, "
                                 f"you passed {given!r}; drop the flag or start a new run")
    merged = dict(vars(stored), **args)
    if "out" not in args:
        merged["out"] = str(ckpt.parent)
    return TrainConfig(**merged), str(ckpt)


def main(argv=None, prog: str | None = None) -> int:
    """Command-line entry point (``examples/train_mnist.py``, ``python -m scratchvae``, the ``scratchvae``
    command); returns the exit code."""
    parser = build_parser(prog)
    args = vars(parser.parse_args(argv))
    progress = args.get("progress") or None
    overwrite = bool(args.get("overwrite"))
    if overwrite and "resume" in args:
        print("error: --overwrite and --resume contradict each other: --resume continues the run in its "
              "folder, --overwrite deletes it", file=sys.stderr)
        return 1
    comm, folder = None, None
    try:
        stack = contextlib.ExitStack()
        stack.enter_context(_sigterm_interrupts())
        # the ranks of an MPI job agree on --distributed first (a rank without it joins only to say so)
        comm = distributed.init(bool(args.get("distributed")))
        if "out" not in args and "resume" not in args:   # a new run gets a new folder; runs/latest points at it
            folder = str(new_run_folder()) if comm is None else comm.bcast_obj(str(new_run_folder()))
            args["out"] = folder
        cfg, resume = config_from_args(args) if comm is None else comm.agree(lambda: config_from_args(args))
        if folder is not None and (comm is None or comm.is_root):
            print(f"run folder: {folder} (runs/latest points at it)", flush=True)
        summary = train(cfg, resume=resume, overwrite=overwrite, progress=progress, comm=comm)
    except (*USER_ERRORS, OSError) as err:   # OSError: outside a run (reading a checkpoint to resume, say)
        return _error(describe_error(err), err, getattr(err, "communicator", comm))
    except MemoryError as err:
        return _error(f"out of memory ({err or 'MemoryError'}); try a smaller --batch-size or model", err, comm)
    except KeyboardInterrupt as err:
        _error(f"interrupted; {getattr(err, 'kept', 'nothing was written')}", err, comm)
        return 130
    finally:
        stack.close()
        if folder is not None and pathlib.Path(folder).is_dir() and (comm is None or comm.is_root):
            note = point_latest(folder)
            if note:
                print(note, file=sys.stderr)
    if summary.get("status") == "interrupted":
        return 130
    return 0


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (a scheduler's stop) interrupts like Ctrl-C while the command runs, so that work outside
    the training loop (decoding images into the cache, say) cleans up and says so; the training loop
    installs its own handler, which stops at the next step."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:   # not the main thread: the caller's business
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _error(message: str, err: BaseException, comm) -> int:
    """Print the one ``error:`` line; returns exit code 1.

    In a data-parallel run an error that every rank raised alike (the ranks
    agreed on it) is printed by rank 0 and every rank exits; an error of this
    rank alone aborts the whole job (the other ranks may be waiting for it in
    a collective), naming the rank.
    """
    if comm is None:
        print(f"error: {message}", file=sys.stderr)
        return 1
    if getattr(err, "agreed", False):
        if comm.is_root:
            print(f"error: {message}", file=sys.stderr, flush=True)
        comm.barrier()   # printed before any rank exits: under python -m mpi4py, exit code 1 aborts the job
        return 1
    print(f"error: (rank {comm.rank} of {comm.size}) {message}; stopping every rank", file=sys.stderr, flush=True)
    time.sleep(1.0)   # let the launcher forward the line: MPI_Abort ends the job at once, unread output with it
    comm.abort(1)
    return 1


if __name__ == "__main__":
    sys.exit(main(prog="python -m scratchvae.cli"))
