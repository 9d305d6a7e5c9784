"""The trainer: one run of a :class:`~scratchvae.config.TrainConfig`.

:func:`train` opens the run folder (:class:`~scratchvae.runfolder.RunFolder`:
locked, one run per folder), loads and checks the data, builds the model and
runs epochs of :func:`train_step` until the config's last epoch. It writes,
into ``config.out``:

* ``metrics.jsonl``: one JSON object per epoch (train and test negative ELBO,
  recon, KL, seconds, images/s);
* ``checkpoint.npz``: parameters, Adam state, position, random state, config
  and history, written atomically after every epoch (and on Ctrl-C);
* ``best.npz`` (with ``keep_best``): the parameters of the epoch with the
  lowest validation negative ELBO; the final test figures, the IWAE bound and
  the figures then use them;
* ``summary.json``: config, backend, device, versions, final figures (or the
  failure, when a run fails);
* the figures of :mod:`scratchvae.figures`.

Each of them records the run's identity (``run_id``), and the checkpoint
records the SHA-256 of the data (``data_sha256``): a run never resumes into
another run's folder or on other data.

The randomness of every epoch (the shuffle, the noise eps, dynamic
binarization, the denoising corruption) comes from generators seeded by
``(config.seed, epoch, stream)`` (:mod:`scratchvae.streams`) and drawn on the device;
nothing random is saved, so a resumed run regenerates what an uninterrupted
one drew and ends bit-identical to it. A step reads nothing back from the
device: the loss sums and a finiteness flag are read every
:data:`CHECK_EVERY` steps. The command line is :mod:`scratchvae.cli`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import platform
import sys
import time

import numpy

from . import backend as backend_mod
from . import checkpoint, datasets, distributed, memory
from .atomic import describe_os_error, to_jsonable, write_json
from .backend import contiguous_run, flat_views
from .build import build_model, loss_labels
from .config import TrainConfig
from .evaluation import iwae_test_nll
from .model_base import NonFiniteLoss
from .optim import Adam, AdamState, geometric_lr
from .run_data import check_same_data, prepare_data
from .runfolder import RunFolder, new_run_id
from .stop_signals import StopFlag
from .streams import DENOISING_STREAM, NOISE_SCHEME, seeds

__all__ = ["TrainConfig", "TrainingDiverged", "RunFailed", "RunState", "train", "train_step"]


# The loss sums and the finiteness flags (of the loss, the parameters and Adam's moments) stay on the
# device and are read every this many steps.
CHECK_EVERY = 50
# A run whose mean loss over CHECK_EVERY steps exceeds this many times the untrained model's test loss
# (at least RUNAWAY_FLOOR nats) has diverged, though it is still finite.
RUNAWAY_FACTOR = 10.0
RUNAWAY_FLOOR = 100.0


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the message says when, which term, and what was kept."""


class Diverged(ArithmeticError):
    """Raised inside a run: its state went bad (non-finite parameters or Adam moments, a runaway loss);
    :func:`train` turns it into :class:`TrainingDiverged` with what was kept."""


class RunFailed(RuntimeError):
    """The operating system refused a read or write (disk full, read-only folder, ...);
    the message says which file and what was kept."""


@dataclasses.dataclass
class RunState:
    """Where a run stands: everything a checkpoint saves and ``--resume`` restores."""

    run_id: str | None
    opt_state: AdamState
    epoch: int = 0                      # epochs finished
    step: int = 0                       # optimizer steps taken
    batch_in_epoch: int = 0             # batches of the current epoch already done
    epoch_sums: dict | None = None      # the current epoch's running loss sums, when stopped mid-epoch
    history: list = dataclasses.field(default_factory=list)
    initial_test: dict | None = None
    best: dict = dataclasses.field(default_factory=lambda: {"epoch": 0, "valid_loss": math.inf})
    saved_epoch: int | None = None      # the epoch of the last checkpoint this run wrote (or resumed)
    world_size: int = 1                 # processes of a data-parallel run (scratchvae.distributed)
    data_sha256: str | None = None      # the data the run trains on (RunData.sha256); resuming on other data is refused

    def meta(self, cfg: TrainConfig) -> dict:
        return to_jsonable({
            "run_id": self.run_id, "epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
            "adam_step": self.opt_state.step, "rng_state": {"scheme": NOISE_SCHEME},
            "epoch_rng_state": None, "config": dataclasses.asdict(cfg), "history": self.history,
            "partial": self.epoch_sums, "initial_test": self.initial_test, "best": self.best,
            "world_size": self.world_size, "data_sha256": self.data_sha256})


def train_step(model, opt, opt_state, xb, eps, *, beta, free_bits, lr, sync=True, x_in=None):
    """One optimizer step on the batch ``xb`` (B, D) with the noise ``eps`` (B, L).

    Returns ``(opt_state, loss, stats)``; the parameters are updated in place.
    With ``sync`` (the default) the loss is a host float and a non-finite loss
    raises :class:`~scratchvae.vae.NonFiniteLoss` before any update; without
    it the step reads nothing back from the device (the loss is a 0-d array
    and the caller checks it, as :func:`train` does every few steps). ``x_in``
    is what the encoder sees when it is not ``xb`` (a denoising model).
    """
    model.zero_grad()
    loss, stats = model.loss_and_grad(xb, eps=eps, beta=beta, free_bits=free_bits, check_data=False, sync=sync,
                                      x_in=x_in)
    opt_state = opt.step(model.params, model.grads, opt_state, lr=lr)
    return opt_state, loss, stats


def train(cfg: TrainConfig, *, resume: str | os.PathLike | None = None, overwrite: bool = False, log=print,
          on_step=None, progress: bool | None = None, comm=None) -> dict:
    """Train the model ``cfg`` describes; returns the summary dict.

    Parameters
    ----------
    cfg : TrainConfig
    resume : path, optional
        A run folder (or its ``checkpoint.npz``) to continue from.
    overwrite : bool
        ``cfg.out`` may hold a run: delete its files and start over (else refused).
    log : callable(str)
        Where the per-epoch lines go.
    on_step : callable(step, stats), optional
        Called after every optimizer step (tests use it to inject faults).
    progress : bool or None
        Show a progress bar (None: only on a terminal).
    comm : scratchvae.distributed.Communicator, optional
        Train data-parallel on the ranks of this MPI job (every rank calls ``train`` with the same
        config; ``cfg.batch_size`` is the global batch; rank 0 alone writes files).

    Raises
    ------
    RunFolderError
        ``cfg.out`` is unusable, in use, or holds another run.
    TrainingDiverged
        The loss, the parameters or Adam's state went bad; the last good checkpoint is untouched.
    RunFailed
        An OS error (disk full, read-only folder); the last good checkpoint is intact.
    """
    if resume is not None and overwrite:
        raise ValueError("--overwrite and --resume contradict each other: --resume continues a run, --overwrite "
                         "deletes the one in --out")
    # data-parallel: each rank's own GPU is selected before the backend allocates anything
    be = backend_mod.get(cfg.backend) if comm is None else comm.make_backend(cfg.backend)
    ckpt = None if resume is None else _checkpoint_path(resume)
    out = pathlib.Path(cfg.out)
    # a run folder belongs to one run: resuming (into the checkpoint's own folder or another) needs a folder
    # that is empty or holds only files of the checkpoint's run, which RunFolder checks
    mode = "resume" if ckpt is not None else ("overwrite" if overwrite else "new")
    run_id = None if ckpt is None else checkpoint.load_meta(ckpt).get("run_id")   # verified in full by _resume
    if comm is not None:
        log, progress = _join_ranks(comm, be, cfg, (str(ckpt), mode), log, progress)
    with _run_folder(out, mode, run_id, ckpt, comm) as removed:
        if removed:
            log(f"removed {len(removed)} temporary file(s) left by an interrupted write in {out}")
        run = _Run(cfg, be, out, log, progress, comm)
        try:
            with numpy.errstate(all="ignore"):   # overflow is found and reported by the run's checks, in one line
                return run.execute(ckpt, on_step)
        except NonFiniteLoss as err:
            raise run.fail("diverged", f"training stopped: non-finite loss at {run.where}: {err}; "
                           f"lower --lr (now {cfg.lr:g})", TrainingDiverged, err) from err
        except Diverged as err:
            raise run.fail("diverged", f"training diverged at {run.where}: {err}", TrainingDiverged, err) from err
        except OSError as err:
            raise run.fail("failed", describe_os_error(err), RunFailed, err) from err
        except KeyboardInterrupt as err:   # a second Ctrl-C, or one before the training loop
            err.kept = run.kept()
            raise


def _join_ranks(comm, be, cfg, how, log, progress):
    """Data-parallel: every rank checks it runs the same config the same way; rank 0 speaks for the job
    (the others get a silent log and no progress bar)."""
    comm.use_backend(be)
    comm.check_same("config", dataclasses.asdict(cfg))
    comm.check_same("--resume / --overwrite", how)
    if not comm.is_root:
        return (lambda *_: None), False
    if comm.local_size > 1 and be.name == "numpy" and not os.environ.get("OPENBLAS_NUM_THREADS"):
        cores = os.cpu_count() or 1
        log(f"note: {comm.local_size} processes share this machine's {cores} cores and OPENBLAS_NUM_THREADS is "
            f"not set, so each starts a BLAS thread per core (several times slower when they compete); "
            f"launch with mpiexec -genv OPENBLAS_NUM_THREADS {max(1, cores // comm.local_size)} ...")
    return log, progress


@contextlib.contextmanager
def _run_folder(out, mode, run_id, ckpt, comm):
    """Open (and lock) the run folder: in a data-parallel run, on rank 0 only, every rank learning
    whether it could; yields the stale temporary files removed."""
    with contextlib.ExitStack() as stack:
        def open_folder():
            return stack.enter_context(RunFolder(out, mode, run_id, checkpoint=ckpt)).removed_temporaries
        yield open_folder() if comm is None else comm.root_only(open_folder)


class _Run:
    """The pieces of one run that every phase needs (not a public API: :func:`train` is)."""

    def __init__(self, cfg, be, out, log, progress, comm=None):
        self.cfg, self.be, self.out, self.log, self.progress, self.comm = cfg, be, out, log, progress, comm
        self.parallel = None            # the data-parallel step (distributed.DataParallel), with comm
        self.ckpt_path, self.best_path = out / "checkpoint.npz", out / "best.npz"
        self.state: RunState | None = None
        self.summary: dict = {}
        self.where = "the start"
        self._noise = None              # the current epoch's shuffle and eps (_epoch_noise)
        self._snapshot_buffers = None   # device copies of params and moments (_snapshot), made once
        self.finishing = False          # in the final stage (the test evaluation): training is done

    # -- phases ------------------------------------------------------------------------
    def execute(self, ckpt, on_step) -> dict:
        cfg, comm = self.cfg, self.comm
        # rank 0 first: a folder of images is decoded and cached once, then read by the others
        self.data = self._agree(lambda: prepare_data(cfg, self.be, self.log, self.progress), root_first=True)
        if self.be.name == "numpy":   # refused in one line before the model is allocated, not killed by the kernel
            d = self.data
            n_eval = d.test.shape[0] + (0 if d.valid_dev is None else d.valid_dev.shape[0])
            self._agree(lambda: memory.check_fits(cfg, d.train.shape[0], n_eval, math.prod(d.image_shape),
                                                  d.train.dtype.itemsize))
        self.model = self._agree(lambda: build_model(cfg, self.data.image_shape, self.be))
        self.opt = Adam(lr=cfg.lr, fused=cfg.fused, normalize_grads=cfg.normalize_grads)
        self.steps_per_epoch = math.ceil(self.data.train.shape[0] / cfg.batch_size)
        if comm is not None:
            self._agree(lambda: _check_shards(self.data.train.shape[0], cfg.batch_size, comm.size))
            self.parallel = distributed.DataParallel(comm, self.model)
        self.state = self._agree(lambda: self._resume(ckpt)) if ckpt is not None else self._start()
        self.summary = {"run_id": self.state.run_id, "config": dataclasses.asdict(cfg), "data_sha256": self.data.sha256,
                        "labels": {k: v for k, v in loss_labels(cfg).items() if not k.endswith("_short")},
                        "backend": self.be.name,
                        "device": self.be.device, "versions": _versions(), "cpu_count": os.cpu_count(),
                        "world_size": self.state.world_size, "initial_test": self.state.initial_test}
        self._write_metrics()
        # a resumed run that had already stopped early (cut off in its final stage) only finishes
        stopped_early = ckpt is not None and self._early_stop()
        with StopFlag() as stop:
            while not stopped_early and self.state.epoch < cfg.epochs:
                if not self._run_epoch(stop, on_step):
                    return self._interrupted(mid_epoch=True)
                self._end_epoch()
                if self._early_stop():
                    break
                if self._stop_agreed(stop):
                    return self._interrupted(mid_epoch=False)
            # the final stage (the test evaluation, an hour at k = 5000) checks no flag: a signal ends it at
            # once, and --resume finishes it (the checkpoint of the last epoch is already written)
            stop.immediate = True
            self.finishing = True
            return self._finish()

    def _agree(self, action, root_first=False):
        """``action()``; in a data-parallel run, every rank raises when it raised on any."""
        return action() if self.comm is None else self.comm.agree(action, root_first)

    def _on_root(self, action):
        """``action()`` (writing files): in a data-parallel run on rank 0 only, then a barrier."""
        return action() if self.comm is None else self.comm.root_only(action)

    def _stop_agreed(self, stop) -> bool:
        """Ctrl-C or SIGTERM asked for a stop (in a data-parallel run: on any rank; every rank then stops)."""
        if self.comm is not None and self.comm.any(stop.requested):
            stop.requested = True
        return stop.requested

    def _share_params(self) -> None:
        """Data-parallel: every rank starts from rank 0's parameters, checked by checksum."""
        if self.comm is not None:
            self.comm.broadcast_params(self.model.params)

    def _start(self) -> RunState:
        cfg = self.cfg
        run_id = new_run_id() if self.comm is None else self.comm.bcast_obj(new_run_id())
        self._share_params()
        state = RunState(run_id=run_id, opt_state=self.opt.init(self.model.params),
                         world_size=1 if self.comm is None else self.comm.size, data_sha256=self.data.sha256)
        state.initial_test = self._test_metrics(0)
        loss_name = "loss" if cfg.model == "vae" else "reconstruction loss"
        self.log(f"{cfg.model} ({cfg.arch}) on {cfg.dataset}: {self.data.train.shape[0]} train / "
                 f"{self.data.test.shape[0]} test images, {self.model.num_params():,} parameters, backend "
                 f"{self.be.name} ({self.be.device}); initial test {loss_name} {state.initial_test['loss']:.2f}")
        if cfg.prior != "standard" or cfg.objective != "elbo":
            self.log(f"prior {cfg.prior}" + (f" ({cfg.pseudo_inputs} pseudo-inputs)" if cfg.prior == "vampprior" else "")
                     + f", objective {cfg.objective}" + (f" with {cfg.samples} samples per image" if cfg.samples > 1 else "")
                     + "; the KL is the one-sample estimate log q(z|x) - log p(z), not the analytic one")
        return state

    def _resume(self, path) -> RunState:
        arrays, meta, _ = checkpoint.load_run(path)
        world_size, stored_world = 1 if self.comm is None else self.comm.size, meta.get("world_size", 1)
        if world_size != stored_world:
            raise ValueError(f"--resume {path}: the run was trained on {stored_world} process(es) and this is "
                             f"{world_size}; its batches are split by the number of processes, so resume it with "
                             f"mpiexec -n {stored_world}" + (" ... --distributed" if stored_world > 1 else
                                                             " removed (one process, no --distributed)"))
        stored_epochs = meta["config"].get("epochs")
        if self.cfg.lr_final is not None and self.cfg.epochs != stored_epochs:
            raise ValueError(f"--resume {path}: the learning rate decays to lr_final over the run's {stored_epochs} "
                             f"epochs; resuming with epochs={self.cfg.epochs} would change the schedule midway. "
                             f"Resume with --epochs {stored_epochs}, or start a new run")
        check_same_data(meta, self.data, path, self.cfg)
        opt_state = self.opt.init(self.model.params)
        checkpoint.restore(path, arrays, self.model, opt_state, self.be)
        opt_state = opt_state._replace(step=meta["adam_step"])
        if meta["rng_state"].get("scheme") != NOISE_SCHEME:
            self.log(f"note: {path} was written by a scratchvae that drew its noise from one saved generator; "
                     "the run continues with per-epoch noise, so it will not match an uninterrupted run of that "
                     "version bit for bit")
        state = RunState(run_id=meta.get("run_id"), opt_state=opt_state, epoch=meta["epoch"],
                         step=meta["step"], batch_in_epoch=meta["batch_in_epoch"], epoch_sums=meta.get("partial"),
                         history=meta["history"], initial_test=meta.get("initial_test"),
                         best=meta.get("best", {"epoch": 0, "valid_loss": math.inf}), saved_epoch=meta["epoch"],
                         world_size=world_size, data_sha256=self.data.sha256)
        self._share_params()
        if self.cfg.keep_best and state.best["epoch"] > 0 and not self.best_path.exists():
            self.log(f"note: {self.best_path} (the parameters of epoch {state.best['epoch']}, the best so far) is "
                     "missing; the best epoch is chosen again among the epochs from here on")
            state.best = {"epoch": 0, "valid_loss": math.inf}
        if self.cfg.keep_best and state.best["epoch"] > 0:
            _, best_meta = checkpoint.load(self.best_path)
            if best_meta.get("run_id") != state.run_id:
                raise checkpoint.CheckpointError(
                    f"{self.best_path} was written by another run (run {best_meta.get('run_id')}, the checkpoint's "
                    f"is {state.run_id}); it is not this run's best epoch")
        if not _same_file(path, self.ckpt_path):   # continuing into a new folder: the checkpoint is not there
            state.saved_epoch = None
        self.log(f"resumed from {path}: epoch {state.epoch}, step {state.step}"
                 + (f", batch {state.batch_in_epoch}" if state.batch_in_epoch else ""))
        return state

    def _run_epoch(self, stop, on_step) -> bool:
        """Train the rest of the current epoch; False when Ctrl-C stopped it midway.

        The step reads nothing back from the device: the loss sums and a
        finiteness flag accumulate there and are read every CHECK_EVERY steps
        (and at the end), after a snapshot of the parameters and Adam state
        was taken; a non-finite loss is then found exactly by replaying the
        steps since the snapshot, one checked step at a time.
        """
        from tqdm.auto import tqdm

        cfg, st, xp = self.cfg, self.state, self.be.xp
        n = self.data.train.shape[0]
        self._noise = self._epoch_noise(st.epoch)
        sums = dict(st.epoch_sums) if st.batch_in_epoch else {"loss": 0.0, "recon": 0.0, "kl": 0.0, "batches": 0,
                                                             "seconds": 0.0}
        t0 = time.perf_counter()
        with tqdm(total=n, initial=min(n, st.batch_in_epoch * cfg.batch_size), unit="img", leave=False,
                  desc=f"epoch {st.epoch + 1}/{cfg.epochs}", file=sys.stderr,
                  disable=(not self.progress) if self.progress is not None else None) as bar:
            snapshot = self._snapshot(st.batch_in_epoch)
            pending, finite = xp.zeros(3, dtype=xp.float64), xp.ones((), dtype=bool)
            for b in range(st.batch_in_epoch, self.steps_per_epoch):
                loss, stats = self._step(b, sync=False)
                pending += xp.stack([loss, stats["recon"], stats["kl"]]).astype(xp.float64)
                finite &= xp.isfinite(loss)
                bar.update(min(cfg.batch_size, n - b * cfg.batch_size))
                if on_step is not None:
                    on_step(st.step, stats)
                last = b + 1 == self.steps_per_epoch
                # data-parallel ranks check (and agree to stop) only where all of them do
                stopping = stop.requested and self.comm is None
                if last or stopping or (b + 1 - snapshot["batch"]) % CHECK_EVERY == 0:
                    self._check(snapshot, b, pending, finite, sums, on_step)
                    if not bar.disable:
                        bar.set_postfix(loss=f"{sums['loss'] / max(sums['batches'], 1):.2f}")
                    snapshot = self._snapshot(b + 1)
                    pending, finite = xp.zeros(3, dtype=xp.float64), xp.ones((), dtype=bool)
                    stopping = self._stop_agreed(stop)
                if stopping and not last:
                    sums["seconds"] += time.perf_counter() - t0
                    st.batch_in_epoch, st.epoch_sums = b + 1, sums
                    return False
        sums["seconds"] += time.perf_counter() - t0
        st.batch_in_epoch, st.epoch_sums = 0, sums
        return True

    def _step(self, b, *, sync):
        """Train on batch ``b`` of the current epoch (no host transfer: data and noise are on the device)."""
        cfg, st = self.cfg, self.state
        self.where = f"epoch {st.epoch + 1}, step {st.step + 1} (batch {b + 1} of {self.steps_per_epoch})"
        xb, eps, x_in = self._batch(b)
        step = train_step if self.parallel is None else self.parallel.step   # data-parallel: this rank's rows
        st.opt_state, loss, stats = step(
            self.model, self.opt, st.opt_state, xb, eps, beta=self._beta(), free_bits=cfg.free_bits,
            lr=geometric_lr(cfg.lr, cfg.lr_final, st.step, cfg.epochs * self.steps_per_epoch), sync=sync, x_in=x_in)
        st.step += 1
        return loss, stats

    def _check(self, snapshot, b, pending, finite, sums, on_step):
        """Read the device's sums and flags (one transfer): on a non-finite loss, replay from ``snapshot``;
        on non-finite parameters or Adam moments, or a runaway loss, stop before anything is saved."""
        xp = self.be.xp
        read = self.be.asnumpy(xp.concatenate([pending, xp.stack([finite, self._state_finite()]).astype(xp.float64)]))
        values, loss_ok, state_ok = read[:3].tolist(), bool(read[3]), bool(read[4])
        if not loss_ok:
            self._replay(snapshot, b, on_step)      # raises NonFiniteLoss at the exact step and term
        steps = b + 1 - snapshot["batch"]
        if not state_ok:
            self._raise_bad_state(f"between steps {snapshot['step'] + 1} and {self.state.step}")
        self._check_runaway(values[0] / steps * (self.comm.size if self.comm is not None else 1))
        for key, value in zip(("loss", "recon", "kl"), values):
            sums[key] += value
        sums["batches"] += steps

    def _state_finite(self):
        """A 0-d device bool: every parameter and Adam moment is finite (one reduction per flat buffer)."""
        xp, st = self.be.xp, self.state
        flags = []
        for arrays in (self.model.params, st.opt_state.m, st.opt_state.v):
            flat = contiguous_run(arrays.values())
            flags += [xp.isfinite(flat).all()] if flat is not None else [xp.isfinite(a).all() for a in arrays.values()]
        return xp.stack(flags).all()

    def _raise_bad_state(self, when):
        """Diverged, naming the first array of the parameters or Adam's moments that is not finite."""
        st = self.state
        for what, arrays in (("parameter", self.model.params), ("Adam first moment of", st.opt_state.m),
                             ("Adam second moment of", st.opt_state.v)):
            for name, a in arrays.items():
                if not bool(self.be.xp.isfinite(a).all()):
                    raise Diverged(f"the {what} {name} overflowed to NaN or Inf ({self.cfg.dtype}) {when}; "
                                   f"lower --lr (now {self.cfg.lr:g})")

    def _check_runaway(self, mean_loss):
        """Diverged when the recent mean loss is RUNAWAY_FACTOR times the untrained model's test loss."""
        initial = (self.state.initial_test or {}).get("loss")
        if initial is None or not math.isfinite(initial):
            return
        limit = RUNAWAY_FACTOR * max(abs(initial), RUNAWAY_FLOOR)
        runaway = mean_loss > limit
        if self.comm is not None:
            runaway = self.comm.any(runaway)
        if runaway:
            raise Diverged(f"the training loss ran away to {mean_loss:.4g} nats (over {RUNAWAY_FACTOR:g} times "
                           f"the untrained model's {initial:.4g}); lower --lr (now {self.cfg.lr:g})")

    def _snapshot(self, batch) -> dict:
        """Copies (on the device, into buffers reused from one snapshot to the next) of what the
        steps from ``batch`` on change, to replay them from."""
        st, xp = self.state, self.be.xp
        parts = (("params", self.model.params), ("m", st.opt_state.m), ("v", st.opt_state.v))
        if self._snapshot_buffers is None:    # part -> (flat buffer, views shaped like the arrays)
            self._snapshot_buffers = {part: flat_views(xp, arrays, copy=False) for part, arrays in parts}
        for part, arrays in parts:
            flat, saved = self._snapshot_buffers[part]
            src = contiguous_run(arrays.values())
            if src is not None:
                xp.copyto(flat, src)            # one copy: the arrays lie back to back (flat_params, Adam.init)
            else:
                for k, a in arrays.items():
                    xp.copyto(saved[k], a)
        views = {part: saved for part, (_, saved) in self._snapshot_buffers.items()}
        return dict(views, batch=batch, step=st.step, adam_step=st.opt_state.step)

    def _replay(self, snapshot, b, on_step):
        """Restore ``snapshot`` and redo its steps checked one by one, so the error names the step and term."""
        st = self.state
        for k, p in self.model.params.items():
            p[...] = snapshot["params"][k]
        for k in st.opt_state.m:
            st.opt_state.m[k][...] = snapshot["m"][k]
            st.opt_state.v[k][...] = snapshot["v"][k]
        st.opt_state, st.step = st.opt_state._replace(step=snapshot["adam_step"]), snapshot["step"]
        for replayed in range(snapshot["batch"], b + 1):
            _, stats = self._step(replayed, sync=True)
            if on_step is not None:
                on_step(st.step, stats)
        err = NonFiniteLoss(f"a loss of steps {snapshot['step'] + 1} to {st.step} was not finite, but not when "
                            "they were replayed one by one (a nondeterministic fault)")
        raise err if self.comm is None else distributed.agreed(err)   # data-parallel: every rank replayed

    def _epoch_noise(self, epoch):
        """The epoch's shuffle (a device index array) and eps for all its steps (steps, B, L), or
        (steps, B, S, L) for an objective of S samples per image, on the device."""
        cfg, be = self.cfg, self.be
        n = self.data.train.shape[0]
        perm = numpy.random.default_rng(seeds(cfg.seed, epoch, 0)).permutation(n)
        eps = be.rng(seeds(cfg.seed, epoch, 1)).standard_normal(
            (self.steps_per_epoch, *self.model.noise_shape(cfg.batch_size)), dtype=numpy.dtype(cfg.dtype))
        return {"perm": be.asarray(perm), "eps": eps, "epoch": epoch}

    def _batch(self, b):
        """Batch ``b`` (B, D), its eps (B, L) and the encoder's input (None: the batch itself), made on
        the device; dynamic binarization and the denoising corruption are drawn there."""
        cfg, noise = self.cfg, self._noise
        idx = noise["perm"][b * cfg.batch_size:(b + 1) * cfg.batch_size]
        if self.data.levels:   # 8-bit images: dequantized (Gaussian) or grey levels as probabilities
            gen = self.be.rng(seeds(cfg.seed, noise["epoch"], 2 + b))
            xb = datasets.to_intensities(self.data.train[idx], cfg.likelihood, gen).astype(numpy.dtype(cfg.dtype))
        else:
            xb = self.data.train[idx].astype(numpy.dtype(cfg.dtype))
        if self.data.dynamic:
            u = self.be.rng(seeds(cfg.seed, noise["epoch"], 2 + b)).random(xb.shape, dtype=xb.dtype)
            xb = (u < xb).astype(xb.dtype)
        x_in = None
        if cfg.input_noise > 0:
            gen = self.be.rng(seeds(cfg.seed, noise["epoch"], DENOISING_STREAM + b))
            x_in = datasets.corrupt(xb, cfg.input_noise, gen, binary=self.data.binary)
        return xb, noise["eps"][b, :xb.shape[0]], x_in

    def _beta(self) -> float:
        cfg = self.cfg
        if cfg.kl_warmup > 0:
            return cfg.beta * min(1.0, self.state.step / (cfg.kl_warmup * self.steps_per_epoch))
        return cfg.beta

    def _end_epoch(self) -> None:
        cfg, st = self.cfg, self.state
        sums, n = st.epoch_sums, self.data.train.shape[0]
        st.epoch_sums = None
        test = self._test_metrics(st.epoch + 1)
        nb, seconds = sums["batches"], sums["seconds"]
        record = {"run_id": st.run_id, "epoch": st.epoch + 1, "step": st.step, "train_loss": sums["loss"] / nb,
                  "train_recon": sums["recon"] / nb, "train_kl": sums["kl"] / nb, "test_loss": test["loss"],
                  "test_recon": test["recon"], "test_kl": test["kl"], "seconds": seconds,
                  "images_per_s": n / seconds if seconds > 0 else float("nan"),
                  "lr": geometric_lr(cfg.lr, cfg.lr_final, st.step - 1, cfg.epochs * self.steps_per_epoch)}
        if self.data.levels and cfg.likelihood == "gaussian":   # a bound on the 8-bit images' NLL
            record["test_bits_per_dim"] = datasets.bits_per_dim(test["loss"], math.prod(self.data.image_shape))
        labels = loss_labels(cfg)
        record["labels"] = {k: labels[k] for k in ("train_loss", "test_loss", "recon_kl")
                            } | ({"valid_loss": labels["valid_loss"]} if cfg.keep_best else {})
        if "active_units" in test:   # a VAE: posterior collapse, made visible (a list per level, bottom first)
            activity = test["activity"]
            record.update(active_units=test["active_units"],
                          kl_per_dim=None if test["kl_per_dim"] is None else test["kl_per_dim"].tolist(),
                          latent_activity=[a.tolist() for a in activity] if isinstance(activity, list)
                          else activity.tolist())
        if cfg.keep_best:
            record["valid_loss"] = self._valid_loss(self.be.rng(cfg.seed * 1_000_003 + 500_000 + st.epoch + 1))
            if record["valid_loss"] < st.best["valid_loss"]:
                st.best = {"epoch": st.epoch + 1, "valid_loss": record["valid_loss"]}
                # written before the checkpoint that names it, so a crash in between cannot
                # leave a checkpoint pointing at an older best.npz
                self._on_root(lambda: checkpoint.save(
                    self.best_path, {f"param/{k}": self.be.asnumpy(p) for k, p in self.model.params.items()},
                    {"run_id": st.run_id, "epoch": st.epoch + 1, "valid_loss": record["valid_loss"]}))
        st.history.append(record)
        st.epoch += 1
        self._save()
        self._write_metrics()
        best_mark = "*" if st.best["epoch"] == st.epoch else " "
        self.log(f"epoch {st.epoch:3d}/{cfg.epochs}  train {labels['train_short']} {record['train_loss']:8.3f}  "
                 + (f"valid {labels['valid_short']} {record['valid_loss']:8.3f}{best_mark} " if cfg.keep_best else "")
                 + (f"test -ELBO {record['test_loss']:8.3f} (recon {record['test_recon']:7.3f}, kl {record['test_kl']:6.3f}, "
                    f"active {_units(record['active_units'], cfg.latent_dim)})"
                    if cfg.model == "vae" else f"test reconstruction loss {record['test_loss']:8.3f}")
                 + (f" {record['test_bits_per_dim']:.3f} bits/dim" if "test_bits_per_dim" in record else "")
                 + f"  {seconds:6.1f} s  {record['images_per_s']:8.0f} img/s")

    def _early_stop(self) -> bool:
        cfg, st = self.cfg, self.state
        if cfg.patience and st.epoch - st.best["epoch"] >= cfg.patience and st.epoch < cfg.epochs:
            self.log(f"early stop after epoch {st.epoch}: no better validation loss for {cfg.patience} epochs "
                     f"(best {st.best['valid_loss']:.3f} at epoch {st.best['epoch']})")
            self.summary["stopped_early"] = True
            return True
        return False

    def _interrupted(self, mid_epoch: bool) -> dict:
        st = self.state
        if mid_epoch:
            self._save()
        at = f"at epoch {st.epoch + 1}, step {st.step}" if mid_epoch else f"after epoch {st.epoch}"
        self.log(f"interrupted {at}: checkpoint saved to {self.ckpt_path}; continue with --resume {self.out}")
        self.summary.update(status="interrupted", history=st.history)
        self._on_root(self._write_summary)
        return self.summary

    def _finish(self) -> dict:
        cfg, st, summary = self.cfg, self.state, self.summary
        final = st.history[-1] if st.history else {}
        if cfg.keep_best and st.best["epoch"] > 0:
            checkpoint.load_parameters(self.best_path, self.model, self.be, run_id=st.run_id)
            final = st.history[st.best["epoch"] - 1]
            summary.update(best_epoch=st.best["epoch"], best_valid_loss=st.best["valid_loss"])
            self.log(f"using the parameters of epoch {st.best['epoch']} (validation loss "
                     f"{st.best['valid_loss']:.3f}) from {self.best_path}")
        summary.update(status="finished", history=st.history, epochs=st.epoch, steps=st.step,
                       test_loss=final.get("test_loss"), test_recon=final.get("test_recon"),
                       test_kl=final.get("test_kl"), test_bits_per_dim=final.get("test_bits_per_dim"),
                       active_units=final.get("active_units"),
                       kl_per_dim=final.get("kl_per_dim"), train_seconds=sum(h["seconds"] for h in st.history))
        if cfg.iwae_k > 0 and cfg.model == "vae":
            t0 = time.perf_counter()
            nll = self._on_root(lambda: iwae_test_nll(self.model, self.data.test_dev, cfg.iwae_k,
                                                      self.be.rng(cfg.seed + 7), progress=self.progress,
                                                      log=self.log))   # a bar on a terminal, else lines
            summary.update(test_nll_iwae=nll, iwae_k=cfg.iwae_k, iwae_seconds=time.perf_counter() - t0)
            self.log(f"test NLL (IWAE bound, k={cfg.iwae_k}): {nll:.2f} nats")
        self._on_root(self._write_outputs)
        what = "negative ELBO" if cfg.model == "vae" else "reconstruction loss"
        self.log(f"final test {what} {summary['test_loss']:.3f} nats; outputs in {self.out}")
        return summary

    def _write_outputs(self) -> None:
        """The figures and summary.json (rank 0's job in a data-parallel run)."""
        cfg, st, summary = self.cfg, self.state, self.summary
        self._write_summary()          # the final figures are on disk before any drawing can fail
        if cfg.figures:
            from . import figures
            noisy = None
            if cfg.input_noise > 0:   # the same corruption as in training, on the test images shown
                x_test = numpy.asarray(self.data.test, dtype=cfg.dtype).reshape(self.data.test.shape[0], -1)
                noisy = datasets.corrupt(x_test, cfg.input_noise, numpy.random.default_rng(cfg.seed + 11),
                                         binary=self.data.binary)
            summary["figures"] = figures.save_all(self.model, self.out, self.data.test, numpy.random.default_rng(cfg.seed),
                                                  labels=self.data.test_labels, history=st.history, run_id=st.run_id,
                                                  noisy=noisy, epoch=summary.get("best_epoch"))
            attributes = self._attribute_figure(figures)
            if attributes is not None:
                summary["figures"]["attribute_vectors"] = attributes
        self._write_summary()

    def _attribute_figure(self, figures):
        """A dataset with attributes (CelebA, attributes.csv): attribute_vectors.png for its first two
        attributes that both training and test images have and lack (examples/attribute_vectors.py
        draws any others)."""
        ds = self.data.dataset
        if ds is None or ds.attributes is None or ds.attributes.get("train") is None:
            return None
        a_train, a_test = ds.attributes["train"], self.data.test_attributes
        usable = [n for j, n in enumerate(ds.attribute_names)
                  if 0 < (a_train[:, j] == 1).sum() < a_train.shape[0] and (a_test[:, j] != 1).any()][:2]
        if not usable:
            return None
        as_seen = (lambda x: datasets.to_intensities(x, "bernoulli")) if ds.levels else (lambda x: x)
        keep = slice(0, 20_000)   # enough images for a mean
        blocks = figures.attribute_blocks(self.model, as_seen(ds.train[keep]), a_train[keep], self.data.test,
                                          a_test, ds.attribute_names, usable)
        return figures.plot_attribute_vectors(self.model, blocks, (0, 0.5, 1, 1.5, 2),
                                              self.out / "attribute_vectors.png", run_id=self.state.run_id)

    def kept(self) -> str:
        """What a run that stops now leaves behind to continue from (the end of an error line)."""
        st = self.state
        if self.finishing and self.ckpt_path.exists():   # stopped in the final stage: training is done
            return (f"training had ended at epoch {st.epoch} and its checkpoint {self.ckpt_path} is untouched; "
                    f"--resume {self.out} runs the final stage (the test evaluation)")
        if st is not None and st.saved_epoch is not None and self.ckpt_path.exists():
            return f"the last good checkpoint {self.ckpt_path} (epoch {st.saved_epoch}) is untouched"
        if st is None and self.ckpt_path.exists():   # stopped while loading: the folder's checkpoint was not touched
            return f"the checkpoint {self.ckpt_path} is untouched"
        return "no checkpoint of this run had been written yet"

    def _write_summary(self) -> None:
        """Write summary.json; when a continuation of a finished run stops or fails, the finished run's
        summary (final figures, figure list) is kept inside it as ``last_finished``."""
        if self.summary.get("status") != "finished":
            try:
                previous = json.loads((self.out / "summary.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                previous = None
            if isinstance(previous, dict) and previous.get("run_id") == self.summary.get("run_id"):
                finished = previous if previous.get("status") == "finished" else previous.get("last_finished")
                if finished is not None:
                    self.summary["last_finished"] = finished
        write_json(self.out / "summary.json", self.summary)

    def _finished_summary_on_disk(self) -> bool:
        """The folder's summary.json is this run's, and says finished (a failed continuation leaves it)."""
        try:
            previous = json.loads((self.out / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return (isinstance(previous, dict) and previous.get("status") == "finished"
                and previous.get("run_id") == self.summary.get("run_id"))

    def fail(self, status: str, message: str, kind: type, cause: BaseException | None = None) -> Exception:
        """The exception to raise for a failed run, after recording it in summary.json (when possible;
        in a data-parallel run, by rank 0; a finished run's summary is left as it was: the error line
        says what failed). It is marked agreed when ``cause`` was raised on every rank."""
        st = self.state
        message = f"{message}; {self.kept()}"
        self.summary.update(status=status, error=message, history=st.history if st else [])
        if (self.comm is None or self.comm.is_root) and not self._finished_summary_on_disk():
            try:   # (no collective here: other ranks may not be failing)
                self._write_summary()
            except OSError:
                pass   # the disk that failed the run may fail this too; the message says what matters
        err = kind(message)
        if getattr(cause, "agreed", False):
            distributed.agreed(err)
        return err

    # -- helpers -------------------------------------------------------------------------
    def _valid_loss(self, rng) -> float:
        """The loss that early stopping and ``best.npz`` follow: the training objective at beta = 1.

        The negative ELBO (one sample per image) for the ELBO; for the IWAE
        objective its own bound, ``-mean log (1/S) sum_s w_s`` with the run's S.
        """
        if self.cfg.valid_k > 0:
            return iwae_test_nll(self.model, self.data.valid_dev, self.cfg.valid_k, rng, progress=False)
        if self.cfg.objective == "iwae":
            return iwae_test_nll(self.model, self.data.valid_dev, self.cfg.samples, rng, progress=False)
        return self.model.evaluate(self.data.valid_dev, rng)["loss"]

    def _test_metrics(self, tag):
        return self.model.evaluate(self.data.test_dev, self.be.rng(self.cfg.seed * 1_000_003 + tag))

    def _save(self) -> None:
        if not bool(self.be.asnumpy(self._state_finite())):   # a checkpoint is written only of a good state
            self._raise_bad_state("before the checkpoint of epoch " + str(self.state.epoch))
        self._on_root(lambda: checkpoint.save(self.ckpt_path, checkpoint.run_arrays(self.model, self.state.opt_state,
                                                                                    self.be), self.state.meta(self.cfg)))
        self.state.saved_epoch = self.state.epoch

    def _write_metrics(self) -> None:
        text = "".join(json.dumps(h) + "\n" for h in self.state.history)
        self._on_root(lambda: write_json(self.out / "metrics.jsonl", text))


def _check_shards(n: int, batch_size: int, world_size: int) -> None:
    """Data-parallel: every rank must get at least one row of every batch, the last one included."""
    last = n % batch_size or batch_size
    if min(batch_size, last) < world_size:
        raise ValueError(f"--batch-size {batch_size} over {n} training images leaves a batch of {last} image(s), "
                         f"fewer than the {world_size} processes: a rank would get none; choose a batch size "
                         "(or --limit) for which every batch has at least one image per process")


def _units(active, latent_dim) -> str:
    """'12/20', or per level, bottom first, '[31, 4]/40 per level'."""
    return f"{active}/{latent_dim}" if isinstance(active, int) else f"{active}/{latent_dim} per level"


def _checkpoint_path(resume) -> pathlib.Path:
    path = pathlib.Path(resume)
    return path / "checkpoint.npz" if path.is_dir() else path


def _same_file(a, b) -> bool:
    return pathlib.Path(a).resolve() == pathlib.Path(b).resolve()


def _versions():
    out = {"python": platform.python_version(), "numpy": numpy.__version__}
    for name in ("numba", "cupy"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:  # not installed: just not reported
            out[name] = None
    return out


