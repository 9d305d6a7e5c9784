"""Checks that need several MPI ranks; run by tests/test_distributed.py as

    mpiexec -n 2 python -m mpi4py tests/mpi_worker.py SCENARIO [ARGS]

Each scenario prints ``OK <scenario>`` on rank 0 when its checks pass (an
assertion error on any rank aborts the job, which the test sees).
"""
import sys

import numpy as np

from scratchvae import distributed
from scratchvae.backend import get as get_backend
from scratchvae.models import mlp_vae
from scratchvae.optim import Adam


def _model(seed=3):
    return mlp_vae(input_dim=12, hidden=(9,), latent_dim=4, dtype="float64", seed=seed, fused=False)


def _data(B, rng):
    x = (rng.random((B, 12)) < 0.4).astype(np.float64)
    eps = rng.standard_normal((B, 4))
    return x, eps


def gradient(comm):
    """The data-parallel gradient equals the full-batch gradient (float64, relative 1e-13), with unequal
    shards (7 rows over 2 ranks: 3 and 4), with and without free bits; the loss is the full batch's."""
    for free_bits in (0.0, 0.3):
        rng = np.random.default_rng(0)
        x, eps = _data(7, rng)
        full = _model()
        full.zero_grad()
        loss_full, _ = full.loss_and_grad(x, eps=eps, free_bits=free_bits)
        model = _model(seed=3 if comm.is_root else 99)   # other weights off rank 0: the broadcast must fix them
        comm.broadcast_params(model.params)
        dp = distributed.DataParallel(comm, model)
        captured = {}

        class NoStep:                                 # capture the reduced gradient, apply nothing
            def step(self, params, grads, state, lr=None):
                captured.update({k: g.copy() for k, g in grads.items()})
                return state

        _, loss, stats = dp.step(model, NoStep(), None, x, eps, beta=1.0, free_bits=free_bits, lr=1e-3)
        assert abs(loss - loss_full) <= 1e-13 * abs(loss_full), (loss, loss_full)
        for k, g in full.grads.items():
            err = np.abs(captured[k] - g).max() / max(np.abs(g).max(), 1e-300)
            assert err <= 1e-13, (k, free_bits, err)
    if comm.is_root:
        print("OK gradient", flush=True)


def steps(comm):
    """30 Adam steps on different batches leave the parameters bit-identical on every rank."""
    model, opt = _model(), Adam(lr=1e-2, fused=False)
    comm.broadcast_params(model.params)
    dp, state = distributed.DataParallel(comm, model), opt.init(model.params)
    rng = np.random.default_rng(5)                    # the same stream on every rank: the global batch
    for _ in range(30):
        x, eps = _data(int(rng.integers(2, 9)), rng)
        state, loss, _ = dp.step(model, opt, state, x, eps, beta=1.0, free_bits=0.0, lr=1e-2)
    digest = distributed.params_checksum(model.params, get_backend("numpy"))
    comm.check_same("parameters after 30 steps", digest)
    if comm.is_root:
        print(f"OK steps {digest[:12]}", flush=True)


def cli_fault(comm, kind, *argv):
    """The command line with a fault on rank 1 only, from step 6 on: ``error`` raises a ValueError
    there (the job must abort, naming the rank); ``nan`` puts a NaN in its shard (every rank must agree
    that the loss is not finite and stop with one error line naming step 6)."""
    from scratchvae import cli

    if comm.rank == 1:
        real_step = distributed.DataParallel.step

        def faulty(self, model, opt, opt_state, xb, eps, **kw):
            if opt_state.step >= 5:                   # steps 6 on, also when the trainer replays them
                if kind == "error":
                    raise ValueError("bad data on this rank (injected by the test)")
                xb = xb.copy()
                xb[comm.shard(xb.shape[0])][0, 0] = np.nan
            return real_step(self, model, opt, opt_state, xb, eps, **kw)

        distributed.DataParallel.step = faulty
    sys.exit(cli.main(list(argv)))


if __name__ == "__main__":
    world = distributed.init()
    world.use_backend(get_backend("numpy"))
    scenario, args = sys.argv[1], sys.argv[2:]
    {"gradient": gradient, "steps": steps, "cli_fault": cli_fault}[scenario](world, *args)
