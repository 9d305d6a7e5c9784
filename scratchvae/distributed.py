"""Data-parallel training over MPI: the ranks, the gradient all-reduce, the agreements.

The design is ChainerMN's, with Horovod's fused buffer:

* MPI (through mpi4py) launches the ranks and coordinates them: broadcasts,
  config checks, agreement on stopping and on failures;
* every step each rank computes the gradient of its shard of the global batch,
  scaled so that the sum over ranks is the whole batch's mean
  (``loss_and_grad(..., batch_total=B)``), packs it with the loss sums and a
  non-finite count into **one flat buffer** in a fixed parameter order, and
  sums that buffer over the ranks with **one all-reduce**: MPI ``Allreduce``
  on the CPU, NCCL (``cupy.cuda.nccl``) on GPUs, where the buffer never leaves
  the device;
* every rank then applies the same Adam step to the same parameters, so they
  stay bit-identical without being sent again.

Every rank draws the same shuffle and noise for the global batch and takes its
own rows (:meth:`Communicator.shard`), so an N-rank run is the single-process
run with the same batch, up to the order of float sums.

Only rank 0 writes files; failures that one rank meets (a full disk) are
broadcast so that every rank stops with the same message.
"""
from __future__ import annotations

import hashlib

import numpy

from . import backend as backend_mod
from .backend import contiguous_run
from .model_base import NonFiniteLoss

__all__ = ["Communicator", "DataParallel", "GradientBuffer", "DistributedUnavailable", "DistributedMismatch", "init",
           "agreed", "params_checksum", "INSTALL_HINT"]

INSTALL_HINT = ("pip install -e \".[mpi]\" (mpi4py and MPICH from binary wheels; on a cluster, build mpi4py "
                "against the site's MPI instead: env MPICC=mpicc pip install --no-binary=mpi4py mpi4py)")


class DistributedUnavailable(RuntimeError):
    """--distributed cannot start: mpi4py (or NCCL) is missing, or this process is not part of an MPI job."""


class DistributedMismatch(ValueError):
    """The ranks disagree (config, parameters, world size): every rank raises the same message."""

    agreed = True   # raised on every rank alike: no rank is left waiting in a collective


def init(distributed: bool = True) -> Communicator | None:
    """The communicator of this MPI job (``COMM_WORLD``), after every rank agreed on ``--distributed``.

    With ``distributed`` false it returns None, unless this process is one
    rank of a multi-process MPI job: it then joins the agreement, so that
    ranks started with ``--distributed`` never wait for it in a collective,
    and every rank raises the same :class:`DistributedMismatch`.

    Raises :class:`DistributedUnavailable` when mpi4py is not installed or
    the job has one process (a launcher that started N independent "rank 0
    of 1" processes must not let them write N copies of one run).
    """
    if not distributed and not _in_mpi_job():
        return None
    try:
        from mpi4py import MPI
    except ImportError as err:
        if err.name not in ("mpi4py", "mpi4py.MPI"):
            raise
        if not distributed:
            return None   # no MPI here to agree through, so no rank of this job can be using it
        raise DistributedUnavailable(f"--distributed needs mpi4py and an MPI library ({err}); install them: "
                                     f"{INSTALL_HINT}") from err
    comm = MPI.COMM_WORLD
    if comm.Get_size() < 2:
        if not distributed:
            return None
        raise DistributedUnavailable(
            "--distributed: this process is rank 0 of a world of 1 (it was not started by mpiexec, or the "
            "launcher started independent processes); launch it as "
            "mpiexec -n 2 python -m mpi4py examples/train_mnist.py --distributed ...")
    communicator = Communicator(comm)
    modes = comm.allgather(bool(distributed))     # the first collective: no rank can be left waiting
    if not all(modes):
        err = DistributedMismatch(
            f"--distributed: this MPI job has {len(modes)} processes and rank(s) "
            f"{[r for r, m in enumerate(modes) if not m]} were started without --distributed"
            + (f", rank(s) {[r for r, m in enumerate(modes) if m]} with it" if any(modes) else "")
            + "; give every rank --distributed, or run a single process without mpiexec")
        err.communicator = communicator   # for the command line's agreed exit
        raise err
    return communicator


# Variables that MPI launchers (MPICH's Hydra, Open MPI, PMIx) give every process of a job.
_WORLD_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def _in_mpi_job() -> bool:
    """Whether this process looks like one of several ranks of an MPI job (``python -m mpi4py`` already
    started MPI, or a launcher's variables say so)."""
    import os
    import sys
    if "mpi4py.MPI" in sys.modules:
        return True
    return any(os.environ.get(v, "").isdigit() and int(os.environ[v]) > 1 for v in _WORLD_SIZE_VARIABLES)


class Communicator:
    """One rank of a data-parallel job.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
        The ranks (``COMM_WORLD``).

    Arrays are summed through MPI ``Allreduce`` until :meth:`use_backend`
    selects CuPy: each rank then uses GPU ``local_rank`` of its machine
    (:meth:`make_backend`, before anything is allocated) and sums go through NCCL
    on CuPy's current stream (its unique id sent by ``comm.bcast`` from rank 0).
    """

    def __init__(self, comm):
        from mpi4py import MPI

        self._MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()   # the ranks on this machine
        local.Free()
        self.backend, self._nccl = None, None

    def make_backend(self, name: str):
        """The array backend ``name`` for this rank, the same on every rank or an agreed error.

        With ``"cupy"`` each rank of a machine takes a GPU of its own (its
        ``local_rank``), selected before the first allocation, so no rank
        leaves a context on another's GPU; NCCL refuses two ranks on one GPU,
        so more ranks than GPUs on a machine are refused here, in one line.
        """
        def make():
            if name == "cupy":
                count = backend_mod.gpu_count()
                if self.local_size > count:
                    raise DistributedUnavailable(
                        f"--distributed --backend cupy: {self.local_size} processes run on this machine and it has "
                        f"{count} GPU(s); NCCL needs a GPU of its own for every process, so launch at most "
                        f"{count} per machine (mpiexec -n {count} ...)")
                return backend_mod.get(name, device=self.local_rank)
            return backend_mod.get(name)
        return self.agree(make)

    def use_backend(self, backend) -> None:
        """Sum arrays of ``backend`` (numpy: through MPI; cupy: through NCCL, set up here once).

        The NCCL set-up runs in agreed steps (the library and this rank's GPU; rank 0's unique
        id, broadcast; the communicator), so a rank that fails one stops every rank there
        instead of leaving the others in the broadcast."""
        self.backend = backend
        if backend.name == "cupy" and self._nccl is None:
            nccl = self.agree(self._nccl_library)
            uid = self.agree(lambda: nccl.get_unique_id() if self.is_root else None)
            uid = self.bcast_obj(uid)
            self._nccl = nccl, self.agree(lambda: nccl.NcclCommunicator(self.size, uid, self.rank))

    def _nccl_library(self):
        """CuPy's NCCL binding, with this rank's GPU (``local_rank``) current."""
        import cupy
        from cupy.cuda import nccl  # imports without the library, and says so in nccl.available
        if not getattr(nccl, "available", False):
            raise DistributedUnavailable("--distributed --backend cupy sums the gradients with NCCL, and CuPy "
                                         "finds no NCCL library; install it: pip install 'nvidia-nccl-cu12>=2.18.1,<3'")
        cupy.cuda.Device(self.local_rank).use()    # selected by make_backend() already; the NCCL calls need it current
        return nccl

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's rows of a global batch of ``n`` rows: contiguous, sizes differing by at most one."""
        return slice(n * self.rank // self.size, n * (self.rank + 1) // self.size)

    # -- collectives on arrays of the backend ----------------------------------------------
    def allreduce_(self, buf):
        """Sum the 1-D array ``buf`` (of the backend, float32 or float64) over the ranks, in place; returns it."""
        if self._nccl is not None:
            import cupy
            nccl, communicator = self._nccl
            kind = {numpy.dtype(numpy.float32): nccl.NCCL_FLOAT32,
                    numpy.dtype(numpy.float64): nccl.NCCL_FLOAT64}[numpy.dtype(buf.dtype)]
            communicator.allReduce(buf.data.ptr, buf.data.ptr, buf.size, kind, nccl.NCCL_SUM,
                                   cupy.cuda.get_current_stream().ptr)
        else:
            self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)
        return buf

    def bcast_(self, buf):
        """Overwrite the (C-contiguous) backend array ``buf`` with rank 0's, in place."""
        if self._nccl is not None:
            import cupy
            nccl, communicator = self._nccl
            kind = {numpy.dtype(numpy.float32): nccl.NCCL_FLOAT32,
                    numpy.dtype(numpy.float64): nccl.NCCL_FLOAT64}[numpy.dtype(buf.dtype)]
            communicator.bcast(buf.data.ptr, buf.size, kind, 0, cupy.cuda.get_current_stream().ptr)
        else:
            self.comm.Bcast(buf, root=0)
        return buf

    # -- coordination (host objects, through MPI) ------------------------------------------
    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (Ctrl-C or SIGTERM on one of them)."""
        return bool(self.comm.allreduce(int(bool(flag)), op=self._MPI.MAX))

    def bcast_obj(self, obj):
        return self.comm.bcast(obj, root=0)

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (a failure on this rank only, which the others cannot know of)."""
        self.comm.Abort(code)

    def check_same(self, what: str, value) -> None:
        """Refuse (on every rank) when ``value`` differs between ranks; the message names the ranks."""
        values = self.comm.allgather(value)
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise DistributedMismatch(f"--distributed: rank(s) {differ} run with a different {what} than rank 0 "
                                      f"({_first_difference(values[0], values[differ[0]])}); every rank must "
                                      "run the same command")

    def root_only(self, action):
        """Run ``action()`` on rank 0 only (opening the run folder, writing files); every rank
        returns rank 0's result, or raises rank 0's exception (marked agreed)."""
        result, error = None, None
        if self.is_root:
            try:
                result = action()
            except Exception as err:   # noqa: BLE001 - re-raised on every rank just below
                error = err
        shared = self.bcast_obj(("error", _portable(error)) if error is not None else ("ok", result))
        if shared[0] == "error":
            raise agreed(error if error is not None else shared[1])
        return shared[1]

    def agree(self, action, root_first: bool = False):
        """Run ``action()`` on every rank; when it raised on any rank, every rank raises the
        lowest such rank's exception (marked agreed), so that none is left waiting in a collective.

        ``root_first``: rank 0 runs it before the others start (loading a data set that
        decodes into a shared cache: rank 0 writes it once, the others read it)."""
        result, error = None, None
        if root_first and not self.is_root:
            self.barrier()
        try:
            result = action()
        except Exception as err:   # noqa: BLE001 - re-raised on every rank just below
            error = err
        if root_first and self.is_root:
            self.barrier()
        errors = self.comm.allgather(None if error is None else _portable(error))
        first = next((r for r, e in enumerate(errors) if e is not None), None)
        if first is not None:
            raise agreed(error if first == self.rank else errors[first])
        return result

    # -- the start -------------------------------------------------------------------------
    def broadcast_params(self, params: dict) -> str:
        """Give every rank rank 0's parameters, then check them by checksum; returns the checksum."""
        self.check_same("parameter list", [(k, tuple(p.shape), str(p.dtype)) for k, p in params.items()])
        for p in params.values():
            self.bcast_(p)
        digest = params_checksum(params, self.backend)
        self.check_same("parameter checksum after the broadcast", digest)
        return digest


class DataParallel:
    """One rank's share of a data-parallel optimizer step (the counterpart of :func:`scratchvae.train.train_step`).

    Each rank computes the gradient of its rows of the global batch scaled by
    the global count, so that the sum over ranks is the true mean even for a
    short last batch; the gradients, the loss sums, the per-dimension KL and
    a non-finite count travel in one buffer through one all-reduce; free bits
    add one all-reduce of L values before the mask.
    """

    def __init__(self, comm: Communicator, model):
        self.comm = comm
        L = model.latent_dim
        # extras: recon, kl, the loss, a non-finite count, then the (L,) KL per dimension
        self.buffer = GradientBuffer(model.grads, 4 + L, model.xp, model.dtype)

    def step(self, model, opt, opt_state, xb, eps, *, beta, free_bits, lr, sync=True, x_in=None):
        """Train on this rank's rows of the global batch ``xb`` (B, D) with its noise ``eps`` (B, L).

        Returns ``(opt_state, loss, stats)`` for the whole batch, equal on every
        rank. With ``sync`` a non-finite loss raises ``NonFiniteLoss`` on every
        rank alike (marked agreed) before any update.
        """
        comm, xp, buf = self.comm, model.xp, self.buffer
        B = xb.shape[0]
        rows = comm.shard(B)
        model.zero_grad()
        reduce = (lambda kl_per_dim: comm.allreduce_(xp.array(kl_per_dim))) if free_bits > 0 else None
        _, local = model.loss_and_grad(xb[rows], eps=eps[rows], beta=beta, free_bits=free_bits, check_data=False,
                                       sync=False, x_in=None if x_in is None else x_in[rows], batch_total=B,
                                       reduce=reduce)
        nonfinite = ~(xp.isfinite(local["recon"]) & xp.isfinite(local["kl"]))
        # the model's loss is this shard's share of the batch's (the loss is written once, in the model)
        buf.pack(model.grads, (local["recon"], local["kl"], local["loss"], nonfinite, local["kl_per_dim"]))
        comm.allreduce_(buf.array)
        extras = buf.unpack(model.grads)                            # (4 + L,) the whole batch's sums
        recon, kl, loss, nonfinite_count = extras[:4].copy()        # copies: the next step reuses the buffer
        kl_per_dim = extras[4:].copy()                              # (L,)
        kl_term = local["kl_term"] if free_bits > 0 else kl         # with free bits: already the batch's
        if sync:
            recon, kl, kl_term, loss = float(recon), float(kl), float(kl_term), float(loss)
            if float(nonfinite_count) > 0 or not numpy.isfinite(loss):
                bad = [f"the {name} of the global batch is {value}" for name, value in
                       (("KL term", kl), ("reconstruction term (-log p(x|z))", recon)) if not numpy.isfinite(value)]
                raise agreed(NonFiniteLoss("; ".join(bad) or f"the loss of the global batch is {loss}"))
            kl_per_dim = model.backend.asnumpy(kl_per_dim).astype(numpy.float64)
        opt_state = opt.step(model.params, model.grads, opt_state, lr=lr)
        return opt_state, loss, {"loss": loss, "recon": recon, "kl": kl, "kl_term": kl_term, "kl_per_dim": kl_per_dim}


def agreed(err: BaseException) -> BaseException:
    """Mark ``err`` as raised on every rank alike (the command line then exits without aborting the job)."""
    err.agreed = True
    return err


def _portable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling (to be sent to the other ranks), else a RuntimeError with its message."""
    import pickle
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:   # noqa: BLE001 - any pickling failure: send the message instead
        return RuntimeError(f"{type(err).__name__}: {err}")


def params_checksum(params: dict, backend) -> str:
    """SHA-256 of every parameter's bytes, in order (bit-identical parameters give equal checksums)."""
    h = hashlib.sha256()
    for k, p in params.items():
        h.update(k.encode())
        h.update(numpy.ascontiguousarray(backend.asnumpy(p)).tobytes())
    return h.hexdigest()


class GradientBuffer:
    """One flat buffer holding every gradient (in the model's parameter order) and a few extra values.

    ``pack`` copies the gradients (in one copy when they are the model's
    ``flat_grads`` the buffer was made for) and the ``extras`` (0-d or 1-d
    arrays, one after the other) in, the communicator sums the buffer over
    the ranks, and
    ``unpack`` copies the sums back into the gradient arrays and returns the
    summed extras: a view (E,) of the buffer, in ``pack``'s order.
    """

    def __init__(self, grads: dict, n_extras: int, xp, dtype):
        self.keys = list(grads)
        self.sizes = [int(grads[k].size) for k in self.keys]
        self.offsets = numpy.concatenate([[0], numpy.cumsum(self.sizes)]).astype(int).tolist()
        self.n_grad = self.offsets[-1]
        self.array = xp.empty(self.n_grad + n_extras, dtype=dtype)   # (P + E,)
        self._arrays = [grads[k] for k in self.keys]
        self._flat = contiguous_run(self._arrays)                    # (P,) a model's flat_grads, or None

    def _as_flat(self, grads: dict):
        """``grads`` as one (P,) array when they are the flat arrays the buffer was made for, else None."""
        if self._flat is not None and all(grads[k] is a for k, a in zip(self.keys, self._arrays)):
            return self._flat
        return None

    def pack(self, grads: dict, extras) -> None:
        flat = self._as_flat(grads)
        if flat is not None:          # a model's flat_grads: one copy
            self.array[:self.n_grad] = flat
        else:
            for k, lo, hi in zip(self.keys, self.offsets, self.offsets[1:]):
                self.array[lo:hi] = grads[k].reshape(-1)
        at = self.n_grad
        for value in extras:
            n = int(getattr(value, "size", 1))
            self.array[at:at + n] = value
            at += n
        if at != self.array.size:
            raise ValueError(f"GradientBuffer.pack: the extras hold {at - self.n_grad} values, the buffer "
                             f"{self.array.size - self.n_grad}")

    def unpack(self, grads: dict):
        flat = self._as_flat(grads)
        if flat is not None:
            flat[...] = self.array[:self.n_grad]
        else:
            for k, lo, hi in zip(self.keys, self.offsets, self.offsets[1:]):
                grads[k][...] = self.array[lo:hi].reshape(grads[k].shape)
        return self.array[self.n_grad:]


def _first_difference(a, b) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return ", ".join(f"{k}: {a.get(k)!r} on rank 0, {b.get(k)!r} there" for k in keys[:3])
    return f"{str(a)[:60]!r} on rank 0, {str(b)[:60]!r} there"
