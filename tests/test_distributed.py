"""Data-parallel training (scratchvae.distributed): the sharded gradient, then real 2-rank MPI jobs.

The sharded-gradient algebra is checked in-process; everything that needs
ranks runs ``mpiexec -n 2`` under a timeout (skipped, with the reason, when
mpi4py or mpiexec is missing; the ``test`` extra installs both).
"""
import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from scratchvae import checkpoint, distributed
from scratchvae.models import mlp_autoencoder, mlp_vae
from scratchvae.train import _check_shards

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "examples" / "train_mnist.py")
WORKER = str(REPO / "tests" / "mpi_worker.py")
SMALL = ["--limit", "1000", "--test-limit", "300", "--batch-size", "100", "--hidden", "64", "--latent-dim", "5",
         "--dtype", "float64", "--no-figures"]


def _mpiexec():
    try:
        import mpi4py  # noqa: F401 - only whether it is installed
    except ImportError:
        return None
    local = pathlib.Path(sys.executable).parent / "mpiexec"   # the mpich wheel's, beside this Python
    return str(local) if local.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="needs mpi4py and mpiexec: pip install -e '.[mpi]'")


def mpirun(*argv, n=2, timeout=120, check=True):
    """``mpiexec -n n python -m mpi4py ARGV`` -> CompletedProcess (1 BLAS thread per rank)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py", *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def python(*argv, timeout=120):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, timeout=timeout, env=env)


def history(folder):
    return [json.loads(line) for line in (pathlib.Path(folder) / "metrics.jsonl").read_text().splitlines()]


# -- the algebra, in one process ---------------------------------------------------------

def _sharded_grads(build, x, eps, bounds, free_bits=0.0, batch_kl=None):
    """Sum over shards of loss_and_grad(shard, batch_total=B); returns (grads, recon, kl)."""
    total, recon, kl = None, 0.0, 0.0
    for lo, hi in zip(bounds, bounds[1:]):
        model = build()
        model.zero_grad()
        reduce = None if batch_kl is None else (lambda _: batch_kl)   # the all-reduce, done in advance
        _, stats = model.loss_and_grad(x[lo:hi], eps=eps[lo:hi], free_bits=free_bits, batch_total=x.shape[0],
                                       reduce=reduce)
        recon, kl = recon + stats["recon"], kl + stats["kl"]
        total = {k: g.copy() for k, g in model.grads.items()} if total is None else \
            {k: total[k] + g for k, g in model.grads.items()}
    return total, recon, kl


@pytest.mark.parametrize("bounds", [(0, 3, 7), (0, 2, 4, 7), (0, 1, 7)])
@pytest.mark.parametrize("kind", ["vae", "ae"])
def test_shard_gradients_sum_to_the_full_batch_gradient(bounds, kind):
    build = (lambda: mlp_vae(input_dim=10, hidden=(8,), latent_dim=3, dtype="float64", seed=1, fused=False)) \
        if kind == "vae" else \
        (lambda: mlp_autoencoder(input_dim=10, hidden=(8,), latent_dim=3, dtype="float64", seed=1, fused=False))
    rng = np.random.default_rng(2)
    x, eps = (rng.random((7, 10)) < 0.5).astype(np.float64), rng.standard_normal((7, 3))
    full = build()
    full.zero_grad()
    _, stats = full.loss_and_grad(x, eps=eps)
    grads, recon, kl = _sharded_grads(build, x, eps, bounds)   # unequal shards
    for k, g in full.grads.items():
        assert np.abs(grads[k] - g).max() <= 1e-13 * np.abs(g).max(), k
    assert recon == pytest.approx(stats["recon"], rel=1e-13) and kl == pytest.approx(stats["kl"], rel=1e-13, abs=0)


def test_free_bits_decide_from_the_whole_batch_kl():
    def build():
        return mlp_vae(input_dim=10, hidden=(8,), latent_dim=4, dtype="float64", seed=4, fused=False)

    rng = np.random.default_rng(3)
    x, eps = (rng.random((8, 10)) < 0.5).astype(np.float64), rng.standard_normal((8, 4))
    full = build()
    full.zero_grad()
    batch_kl = full.loss_and_grad(x, eps=eps)[1]["kl_per_dim"]
    shard_kl = build().loss_and_grad(x[:4], eps=eps[:4])[1]["kl_per_dim"]
    j = int(np.argmax(np.abs(batch_kl - shard_kl)))
    free_bits = float((batch_kl[j] + shard_kl[j]) / 2)          # the shard and the batch disagree on dim j
    full.zero_grad()
    full.loss_and_grad(x, eps=eps, free_bits=free_bits)
    grads, _, _ = _sharded_grads(build, x, eps, (0, 4, 8), free_bits, batch_kl=batch_kl)
    for k, g in full.grads.items():
        assert np.abs(grads[k] - g).max() <= 1e-13 * np.abs(g).max(), k
    # what a shard deciding from its own KL would give (counts-weighted means of per-shard gradients): wrong
    alone = {k: 0.0 for k in full.grads}
    for lo, hi in ((0, 4), (4, 8)):
        model = build()
        model.zero_grad()
        model.loss_and_grad(x[lo:hi], eps=eps[lo:hi], free_bits=free_bits)
        alone = {k: alone[k] + g * (hi - lo) / 8 for k, g in model.grads.items()}
    assert max(np.abs(alone[k] - g).max() for k, g in full.grads.items()) > 1e-6


@pytest.mark.parametrize("layout", ["flat", "separate"])
def test_gradient_buffer_round_trip(layout):
    """The model's flat_grads go in and out in one copy each; separate arrays one by one."""
    model = mlp_vae(input_dim=6, hidden=(5,), latent_dim=2, dtype="float64", seed=0)
    rng = np.random.default_rng(0)
    grads = model.grads if layout == "flat" else {k: g.copy() for k, g in model.grads.items()}
    for g in grads.values():
        g[...] = rng.standard_normal(g.shape)
    expected = {k: g.copy() for k, g in grads.items()}
    buf = distributed.GradientBuffer(grads, 3, np, np.float64)
    buf.pack(grads, (np.float64(1.5), np.float64(-2.0), np.bool_(True)))
    assert buf.array.shape == (model.num_params() + 3,)
    np.testing.assert_array_equal(buf.array[:-3], np.concatenate([g.ravel() for g in expected.values()]))
    buf.array *= 2                                                   # what a 2-rank sum of equal values gives
    extras = buf.unpack(grads)
    assert [float(e) for e in extras] == [3.0, -4.0, 2.0]
    for k, g in grads.items():
        np.testing.assert_array_equal(g, 2 * expected[k])


def test_a_shard_without_rows_is_refused():
    _check_shards(1000, 100, 2)
    with pytest.raises(ValueError, match="leaves a batch of 1 image"):
        _check_shards(1001, 100, 2)
    with pytest.raises(ValueError, match="--batch-size 1 "):
        _check_shards(100, 1, 2)


def test_missing_mpi4py_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(distributed.DistributedUnavailable, match=r"pip install -e \"\.\[mpi\]\""):
        distributed.init()


@needs_mpi
def test_a_single_process_is_refused(tmp_path):
    proc = python(TRAIN, *SMALL, "--epochs", "1", "--out", tmp_path / "run", "--distributed")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: --distributed: this process is rank 0 of a world of 1"), proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


# -- real ranks ------------------------------------------------------------------------

@needs_mpi
@pytest.mark.parametrize("scenario", ["gradient", "steps"])
def test_two_ranks(scenario):
    proc = mpirun(WORKER, scenario)
    assert f"OK {scenario}" in proc.stdout, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """The same 2-epoch run in one process, and at 2 ranks (the latter also stopped after 1 epoch and resumed)."""
    if MPIEXEC is None:
        pytest.skip("needs mpi4py and mpiexec: pip install -e '.[mpi]'")
    root = tmp_path_factory.mktemp("dp")
    single = python(TRAIN, *SMALL, "--epochs", "2", "--free-bits", "0.05", "--out", root / "single")
    assert single.returncode == 0, single.stderr
    mpirun(TRAIN, *SMALL, "--epochs", "2", "--free-bits", "0.05", "--out", root / "two", "--distributed")
    mpirun(TRAIN, *SMALL, "--epochs", "1", "--free-bits", "0.05", "--out", root / "resumed", "--distributed")
    mpirun(TRAIN, "--resume", root / "resumed", "--epochs", "2", "--distributed")
    return root


@needs_mpi
def test_two_ranks_train_like_one_process(reference_runs):
    one, two = history(reference_runs / "single"), history(reference_runs / "two")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):   # float64: only the order of the sums differs
        for key in ("train_loss", "train_recon", "train_kl", "test_loss", "active_units"):
            assert b[key] == pytest.approx(a[key], rel=1e-9), key
    summary = json.loads((reference_runs / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2
    _, meta = checkpoint.load(reference_runs / "two" / "checkpoint.npz")
    assert meta["world_size"] == 2


@needs_mpi
def test_resume_at_two_ranks_is_bit_identical(reference_runs):
    whole, resumed = reference_runs / "two", reference_runs / "resumed"
    strip = ("seconds", "images_per_s", "run_id")
    assert [{k: v for k, v in h.items() if k not in strip} for h in history(whole)] == \
           [{k: v for k, v in h.items() if k not in strip} for h in history(resumed)]
    a, _ = checkpoint.load(whole / "checkpoint.npz")
    b, _ = checkpoint.load(resumed / "checkpoint.npz")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@needs_mpi
def test_a_world_size_mismatch_on_resume_is_refused(reference_runs, tmp_path):
    shutil.copytree(reference_runs / "two", tmp_path / "run")
    proc = python(TRAIN, "--resume", tmp_path / "run", "--epochs", "3")
    assert proc.returncode == 1 and proc.stderr.count("error:") == 1, proc.stderr
    assert "trained on 2 process(es) and this is 1" in proc.stderr and "mpiexec -n 2" in proc.stderr


@needs_mpi
def test_an_error_on_one_rank_aborts_every_rank(tmp_path):
    proc = mpirun(WORKER, "cli_fault", "error", *SMALL, "--epochs", "1", "--out", tmp_path / "run", "--distributed",
                  check=False, timeout=60)   # every rank ends (the job would hang if rank 0 waited on rank 1)
    assert proc.returncode != 0
    assert "error: (rank 1 of 2) bad data on this rank (injected by the test); stopping every rank" in proc.stderr
    assert "Traceback" not in proc.stderr


@needs_mpi
def test_a_non_finite_loss_on_one_rank_stops_every_rank_alike(tmp_path):
    proc = mpirun(WORKER, "cli_fault", "nan", *SMALL, "--epochs", "1", "--out", tmp_path / "run", "--distributed",
                  check=False, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite loss at epoch 1, step 6" in errors[0], proc.stderr
    assert "reconstruction term" in errors[0] and "Traceback" not in proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged"


def _rank_pids(marker: str) -> dict:
    """{rank: pid} of the running ranks whose command line contains ``marker`` (from /proc)."""
    ranks = {}
    for proc in pathlib.Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace") \
                    and "mpiexec" not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                env = dict(e.split("=", 1) for e in (proc / "environ").read_bytes().decode(errors="replace")
                           .split("\0") if "=" in e)
                if "PMI_RANK" in env:
                    ranks[int(env["PMI_RANK"])] = int(proc.name)
        except OSError:
            continue
    return ranks


def _start_long_run(out):
    # PYTHONFAULTHANDLER: a rank sent SIGABRT prints every thread's Python stack (see _wait_for_job)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    argv = [MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", TRAIN, *SMALL, "--limit", "3000", "--batch-size", "20",
            "--epochs", "30", "--out", str(out), "--distributed"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not (out / "checkpoint.npz").exists():     # the first epoch's checkpoint: something to keep
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    ranks = _rank_pids(str(out))
    assert sorted(ranks) == [0, 1], ranks
    return proc, ranks


def _wait_for_job(proc, ranks, timeout=60):
    """(stdout, stderr) of the ended job; a job still running after ``timeout`` seconds fails the test
    with every rank's Python stack (a hang says where it hangs)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in ranks.values():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"the job still ran {timeout} s after the signal; its ranks' stacks:\n{out}\n{err}")


@needs_mpi
@pytest.mark.slow
def test_kill_9_of_one_rank_ends_the_job_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc, ranks = _start_long_run(out)
    os.kill(ranks[1], signal.SIGKILL)
    _wait_for_job(proc, ranks)                             # the job ends: no rank waits forever on the dead one
    assert proc.returncode != 0
    assert not _rank_pids(str(out))                        # rank 0 is gone too
    arrays, meta = checkpoint.load(out / "checkpoint.npz")   # intact: loads with every check
    assert meta["epoch"] >= 1 and meta["world_size"] == 2


@needs_mpi
@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    out = tmp_path / "run"
    proc, ranks = _start_long_run(out)
    os.kill(ranks[1], signal.SIGTERM)
    _, err = _wait_for_job(proc, ranks)
    assert proc.returncode == 130, err
    _, meta = checkpoint.load(out / "checkpoint.npz")
    assert meta["epoch"] < 30 and json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    resumed = mpirun(TRAIN, "--resume", out, "--epochs", str(meta["epoch"] + 1), "--distributed")
    assert "resumed from" in resumed.stdout


def test_the_nccl_calls_match_cupys_api():
    """The GPU path's calls (distributed.Communicator.allreduce_ / bcast_) against CuPy's real NCCL binding."""
    cupy = pytest.importorskip("cupy", reason="needs CuPy (the test extra)")
    from cupy.cuda import nccl
    if not getattr(nccl, "available", False):
        pytest.skip("CuPy finds no NCCL library (pip install 'nvidia-nccl-cu12>=2.18.1,<3')")
    assert cupy is not None
    for name in ("get_unique_id", "NcclCommunicator", "NCCL_FLOAT32", "NCCL_FLOAT64", "NCCL_SUM"):
        assert hasattr(nccl, name), name

    def parameters(method):   # from the Cython signature line: "allReduce(self, intptr_t sendbuf, ...)"
        line = getattr(nccl.NcclCommunicator, method).__doc__.splitlines()[0]
        return [p.split()[-1] for p in line[line.index("(") + 1:line.rindex(")")].split(",")][1:]

    assert parameters("allReduce") == ["sendbuf", "recvbuf", "count", "datatype", "op", "stream"]
    assert parameters("bcast") == ["buff", "count", "datatype", "root", "stream"]


class _OneRank:
    """A stand-in for an mpi4py communicator of one rank (the collectives are identities)."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Split_type(self, kind):
        return self

    def Free(self):
        pass

    def allgather(self, value):
        return [value]

    def bcast(self, value, root=0):
        return value


@needs_mpi
def test_the_nccl_set_up_runs_in_agreed_steps(monkeypatch):
    import types
    comm = distributed.Communicator(_OneRank())
    fake = types.SimpleNamespace(get_unique_id=lambda: b"uid",
                                 NcclCommunicator=lambda n, uid, rank: ("communicator", n, uid, rank))
    monkeypatch.setattr(distributed.Communicator, "_nccl_library", lambda self: fake)
    comm.use_backend(types.SimpleNamespace(name="cupy"))
    assert comm._nccl == (fake, ("communicator", 1, b"uid", 0))

    def missing(self):
        raise distributed.DistributedUnavailable("no NCCL library")
    monkeypatch.setattr(distributed.Communicator, "_nccl_library", missing)
    fresh = distributed.Communicator(_OneRank())
    with pytest.raises(distributed.DistributedUnavailable, match="no NCCL") as err:
        fresh.use_backend(types.SimpleNamespace(name="cupy"))
    assert getattr(err.value, "agreed", False)          # every rank raises it: none waits in the broadcast


@needs_mpi
def test_unset_blas_threads_are_noted(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", TRAIN, *SMALL, "--limit", "200",
                           "--epochs", "1", "--out", str(tmp_path / "run"), "--distributed"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("OPENBLAS_NUM_THREADS is not set") == 1     # rank 0 only
    assert "mpiexec -genv OPENBLAS_NUM_THREADS 1" in proc.stdout


@needs_mpi
@pytest.mark.parametrize("second", [["-m", "mpi4py"], []])
def test_a_rank_started_without_distributed_stops_every_rank_at_once(tmp_path, second):
    """One rank without --distributed (started under mpi4py or not) joins the agreement on the mode and
    every rank stops with one error line, instead of rank 0 waiting for it forever."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    script = str(REPO / "examples" / "train_mnist.py")
    common = [*SMALL, "--epochs", "1", "--out", str(tmp_path / "run")]
    proc = subprocess.run([MPIEXEC, "-n", "1", sys.executable, "-m", "mpi4py", script, "--distributed", *common,
                           ":", "-n", "1", sys.executable, *second, script, *common],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rank(s) [1] were started without --distributed" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


@needs_mpi
@pytest.mark.slow
@pytest.mark.parametrize("option", [["--arch", "gated", "--hidden", "24,16", "--prior", "vampprior",
                                     "--pseudo-inputs", "12"],
                                    ["--objective", "iwae", "--samples", "3"],
                                    ["--arch", "gated", "--hidden", "24,16", "--levels", "2", "--prior", "vampprior",
                                     "--pseudo-inputs", "12"]], ids=["vampprior", "iwae", "levels"])
def test_two_ranks_train_like_one_process_with_the_new_prior_and_objective(tmp_path, option):
    """The VampPrior (its pseudo-inputs' pass and gradient on every rank) and the IWAE objective (its
    per-image weights within a shard) give the one-process run at 2 ranks, up to the order of float sums."""
    args = [*SMALL, *option, "--epochs", "2", "--kl-warmup", "1"]
    single, two = tmp_path / "single", tmp_path / "two"
    proc = python(TRAIN, *args, "--out", single)
    assert proc.returncode == 0, proc.stderr
    mpirun(TRAIN, *args, "--out", two, "--distributed")
    for a, b in zip(history(single), history(two), strict=True):
        for key in ("train_loss", "train_recon", "train_kl", "test_loss", "active_units"):
            assert b[key] == pytest.approx(a[key], rel=1e-9), key
