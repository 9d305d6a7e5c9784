#!/usr/bin/env python
"""What data parallelism costs: the communication share of a data-parallel step.

Run under MPI, one BLAS thread per rank (without it every rank starts a BLAS
thread per core and the step is several times slower)::

    mpiexec -n 2 -genv OPENBLAS_NUM_THREADS 1 python -m mpi4py benchmarks/bench_distributed.py
    mpiexec -n 1 -genv OPENBLAS_NUM_THREADS 1 python -m mpi4py benchmarks/bench_distributed.py   # 1 process

The model is the default recipe's (784-400-20 MLP VAE, float32, fused
kernels), on real binarized-MNIST batches of ``--batch-size`` (the global
batch), after ``--warmup`` steps that bring the weights and Adam moments to a
real run's steady state. Then ``--rounds`` rounds, each of:

* ``--steps`` data-parallel steps (:class:`scratchvae.distributed.DataParallel`:
  the shard's gradient, the one all-reduce, Adam), timing the all-reduce
  inside them as well (it includes waiting for the slower rank);
* the same number of bare ``Allreduce`` calls on the step's flat buffer (the
  transfer alone).

With one process the step is :func:`scratchvae.train.train_step` on the whole
batch and there is nothing to reduce. The report is the median over rounds;
rank 0 prints a table and writes the JSON.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

try:
    from . import _common as C
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import _common as C

import numpy as np
from mpi4py import MPI

from scratchvae import distributed
from scratchvae.backend import get as get_backend
from scratchvae.models import mlp_vae
from scratchvae.optim import Adam
from scratchvae.train import train_step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1500)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    world = MPI.COMM_WORLD
    comm = distributed.Communicator(world)
    be = get_backend("numpy")
    comm.use_backend(be)
    model = mlp_vae(input_dim=784, hidden=(400,), latent_dim=20, seed=0)
    opt = Adam(lr=1e-3)
    state = opt.init(model.params)
    parallel = distributed.DataParallel(comm, model) if comm.size > 1 else None
    x_train = np.ascontiguousarray(C.mnist("train"), dtype=np.float32)
    rng = np.random.default_rng(0)   # the same batches on every rank: the global batch
    B = args.batch_size

    comm_seconds = [0.0]
    reduce = comm.allreduce_

    def timed_reduce(buf):
        t0 = time.perf_counter()
        out = reduce(buf)
        comm_seconds[0] += time.perf_counter() - t0
        return out

    comm.allreduce_ = timed_reduce

    def step():
        nonlocal state
        idx = rng.integers(0, x_train.shape[0], B)
        xb, eps = x_train[idx], rng.standard_normal((B, 20), dtype=np.float32)
        if parallel is None:
            state, _, _ = train_step(model, opt, state, xb, eps, beta=1.0, free_bits=0.0, lr=1e-3, sync=False)
        else:
            state, _, _ = parallel.step(model, opt, state, xb, eps, beta=1.0, free_bits=0.0, lr=1e-3, sync=False)

    for _ in range(args.warmup):
        step()
    buffer = parallel.buffer.array.copy() if parallel is not None else np.zeros(model.num_params() + 23, np.float32)
    rounds = []
    for _ in range(args.rounds):
        world.Barrier()
        comm_seconds[0] = 0.0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        step_s = (time.perf_counter() - t0) / args.steps
        in_step = comm_seconds[0] / args.steps
        world.Barrier()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            world.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        bare = (time.perf_counter() - t0) / args.steps
        rounds.append({"step_ms": step_s * 1e3, "allreduce_in_step_ms": in_step * 1e3, "allreduce_bare_ms": bare * 1e3})
    rounds = world.gather(rounds, root=0)
    if comm.rank != 0:
        return 0
    per_round = [{k: max(r[i][k] for r in rounds) for k in rounds[0][i]} for i in range(args.rounds)]   # slowest rank
    med = {k: C.median([r[k] for r in per_round]) for k in per_round[0]}
    bytes_per_step = buffer.nbytes
    report = {
        "benchmark": "bench_distributed", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "world_size": comm.size, "batch_size": B, "warmup_steps": args.warmup,
        "steps_per_round": args.steps, "rounds": args.rounds, "mpi": MPI.Get_library_version().split("\n")[0].strip(),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"), "machine": C.machine_info(),
        "versions": C.versions(), "parameters": model.num_params(), "bytes_per_step": bytes_per_step,
        "per_round_slowest_rank": per_round, "median": med,
        "communication_share": (med["allreduce_in_step_ms"] / med["step_ms"]) if comm.size > 1 else 0.0,
    }
    print(C.fmt_table(["ranks", "batch", "step ms", "all-reduce in step ms", "bare Allreduce ms", "share", "MB/step"],
                      [[comm.size, B, f"{med['step_ms']:.2f}", f"{med['allreduce_in_step_ms']:.3f}",
                        f"{med['allreduce_bare_ms']:.3f}", f"{report['communication_share']:.0%}",
                        f"{bytes_per_step / 1e6:.2f}"]]))
    path = args.json or C.RESULTS_DIR / f"bench_distributed-{comm.size}ranks.json"
    print("wrote", C.write_json(path, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
