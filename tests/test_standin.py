"""The ``--backend cupy`` path, run on the CPU through a strict stand-in for CuPy (tests/standin/cupy).

The stand-in refuses what CuPy refuses (implicit conversion to NumPy, NumPy
operands, arrays of another device) and records every device-to-host sync
with its call stack, so these tests run the real command line with
``--backend cupy`` and check that a training step never waits for the
device. The fused kernels run under Numba's CUDA simulator in a separate
process; the data-parallel path runs under mpiexec with two fake GPUs, and
with one.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from scratchvae.cli import main

REPO = pathlib.Path(__file__).resolve().parents[1]
STANDIN = REPO / "tests" / "standin"
TINY = ["--limit", "256", "--test-limit", "64", "--batch-size", "64", "--hidden", "16", "--latent-dim", "2",
        "--epochs", "2"]
CONV = ["--arch", "conv", "--channels", "4,8", "--hidden", "16", "--limit", "128", "--test-limit", "32",
        "--batch-size", "32", "--latent-dim", "2", "--epochs", "1"]
# the functions of one optimizer step: no sync may happen inside them
STEP_FUNCTIONS = {"_step", "train_step", "loss_and_grad"}


@pytest.fixture
def cupy():
    """The stand-in imported as ``cupy`` for this test (the real CuPy, if any, restored after)."""
    saved = {k: m for k, m in sys.modules.items() if k == "cupy" or k.startswith("cupy.")}
    for k in saved:
        del sys.modules[k]
    spec = importlib.util.spec_from_file_location("cupy", STANDIN / "cupy" / "__init__.py",
                                                  submodule_search_locations=[str(STANDIN / "cupy")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["cupy"] = module
    spec.loader.exec_module(module)
    yield module
    for k in [k for k in sys.modules if k == "cupy" or k.startswith("cupy.")]:
        del sys.modules[k]
    sys.modules.update(saved)


def step_syncs(cupy):
    return [s for s in cupy.SYNCS if STEP_FUNCTIONS & set(s["functions"])]


def history(folder):
    return [json.loads(line) for line in (pathlib.Path(folder) / "metrics.jsonl").read_text().splitlines()]


def numbers(folder):
    return [(h["train_loss"], h["test_loss"], h["test_kl"]) for h in history(folder)]


# -- the stand-in itself ----------------------------------------------------------------------------

def test_the_stand_in_refuses_what_cupy_refuses(cupy):
    a = cupy.asarray(np.arange(6.0).reshape(2, 3))
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(a)
    with pytest.raises(TypeError, match="Unsupported type"):
        a + np.ones((2, 3))
    with pytest.raises(TypeError, match="Unsupported type"):
        cupy.maximum(a, np.zeros(3))
    total, first = a.sum(), a[0, 0]
    assert isinstance(total, cupy.ndarray) and total.shape == () and isinstance(first, cupy.ndarray)
    assert isinstance(np.exp(a), cupy.ndarray)              # NumPy's functions dispatch to the device, as in CuPy
    cupy.reset()
    assert float(total) == 15.0
    (sync,) = cupy.SYNCS
    assert sync["what"] == "float" and sync["site"].startswith(__file__)


def test_the_stand_in_keeps_arrays_on_their_device(cupy, monkeypatch):
    monkeypatch.setattr(cupy.runtime, "getDeviceCount", lambda: 2)
    monkeypatch.setattr(cupy, "_DEVICES", 2)
    cupy.reset()
    on_zero = cupy.zeros(3)
    cupy.cuda.Device(1).use()
    try:
        with pytest.raises(ValueError, match=r"resides \(0\) is different from the current device \(1\)"):
            on_zero + 1
        cupy.ones(2)
        assert dict(cupy.ALLOCATIONS) == {0: 1, 1: 1}
    finally:
        cupy.cuda.Device(0).use()


# -- the command line on --backend cupy ---------------------------------------------------------------

def test_cupy_mlp_run_equals_numpy_and_its_steps_never_sync(cupy, tmp_path, capsys):
    cupy.reset()
    assert main([*TINY, "--backend", "cupy", "--no-fused", "--iwae-k", "2", "--out", str(tmp_path / "gpu")]) == 0
    assert step_syncs(cupy) == []
    assert {s["what"] for s in cupy.SYNCS} <= {"get", "float", "item"}
    assert main([*TINY, "--no-fused", "--iwae-k", "2", "--no-figures", "--out", str(tmp_path / "cpu")]) == 0
    assert numbers(tmp_path / "gpu") == numbers(tmp_path / "cpu")          # the same arithmetic, bit for bit
    gpu, cpu = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("gpu", "cpu"))
    assert gpu["test_nll_iwae"] == cpu["test_nll_iwae"] and gpu["backend"] == "cupy"
    assert {"samples", "latent", "manifold", "interpolation"} <= set(gpu["figures"])


def test_a_float_of_the_loss_inside_the_step_is_caught(cupy, tmp_path, monkeypatch):
    from scratchvae import train as train_mod
    real = train_mod.train_step

    def step_that_reads_the_loss(*args, **kwargs):
        opt_state, loss, stats = real(*args, **kwargs)
        float(loss)                                            # the kind of line this test exists to catch
        return opt_state, loss, stats
    monkeypatch.setattr(train_mod, "train_step", step_that_reads_the_loss)
    cupy.reset()
    assert main([*TINY, "--backend", "cupy", "--no-fused", "--no-figures", "--out", str(tmp_path / "run")]) == 0
    caught = step_syncs(cupy)
    assert len(caught) == 8 and all(s["what"] == "float" and s["site"].startswith(__file__) for s in caught)


def test_cupy_conv_run_and_resume_are_bit_identical_to_an_uninterrupted_run(cupy, tmp_path):
    cupy.reset()
    conv = [*CONV, "--backend", "cupy", "--no-fused", "--no-figures"]
    assert main([*conv, "--epochs", "2", "--out", str(tmp_path / "whole")]) == 0
    assert main([*conv, "--epochs", "1", "--out", str(tmp_path / "split")]) == 0
    assert main(["--resume", str(tmp_path / "split"), "--epochs", "2"]) == 0
    assert len(history(tmp_path / "whole")) == 2
    assert numbers(tmp_path / "split") == numbers(tmp_path / "whole")
    assert step_syncs(cupy) == []


def test_evaluate_run_on_a_cupy_run(cupy, tmp_path, capsys):
    from test_runs import load_script
    out = tmp_path / "run"
    assert main([*TINY, "--backend", "cupy", "--no-fused", "--no-figures", "--out", str(out)]) == 0
    assert load_script("evaluate_run").main([str(out), "--iwae-k", "3"]) == 0, capsys.readouterr().err
    assert json.loads((out / "evaluation-last.json").read_text())["iwae_k"] == 3


# -- other processes: the fused kernels under the CUDA simulator, and data-parallel ranks --------------

def _env(tmp_path, **extra):
    log = tmp_path / "standin-log"
    log.mkdir(exist_ok=True)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(STANDIN), os.environ.get("PYTHONPATH", "")]),
                STANDIN_LOG=str(log), OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def _logs(tmp_path):
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "standin-log").glob("*.json"))]


@pytest.mark.slow
def test_cupy_fused_kernels_under_the_cuda_simulator(tmp_path):
    """The fused loss, reparameterization and Adam kernels on stand-in arrays (a tiny model: the
    simulator runs every GPU thread as a Python thread)."""
    tiny = ["--limit", "16", "--test-limit", "4", "--batch-size", "8", "--hidden", "4", "--latent-dim", "2",
            "--epochs", "1", "--dtype", "float64", "--no-figures"]
    script = str(REPO / "examples" / "train_mnist.py")
    proc = subprocess.run([sys.executable, script, *tiny, "--backend", "cupy", "--out", str(tmp_path / "gpu")],
                          capture_output=True, text=True, timeout=300,
                          env=_env(tmp_path, NUMBA_ENABLE_CUDASIM="1"))
    assert proc.returncode == 0, proc.stderr
    assert main([*tiny, "--out", str(tmp_path / "cpu")]) == 0             # fused on the CPU (Numba)
    np.testing.assert_allclose(numbers(tmp_path / "gpu"), numbers(tmp_path / "cpu"), rtol=1e-12)
    (log,) = _logs(tmp_path)
    assert not [s for s in log["syncs"] if STEP_FUNCTIONS & set(s["functions"])]


def _mpiexec():
    from test_distributed import MPIEXEC
    if MPIEXEC is None:
        pytest.skip("needs mpi4py and mpiexec: pip install -e '.[mpi]'")
    return MPIEXEC


@pytest.mark.slow
def test_cupy_data_parallel_on_two_fake_gpus_equals_one_process(tmp_path):
    mpiexec = _mpiexec()
    small = ["--limit", "256", "--test-limit", "64", "--batch-size", "64", "--hidden", "16", "--latent-dim", "2",
             "--epochs", "1", "--dtype", "float64", "--no-figures", "--no-fused", "--backend", "cupy"]
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "mpi4py", str(REPO / "examples" / "train_mnist.py"),
                           "--distributed", *small, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300, env=_env(tmp_path, STANDIN_GPUS="2"))
    assert proc.returncode == 0, proc.stderr
    allocations = [log["allocations"] for log in _logs(tmp_path)]
    assert sorted(tuple(a) for a in allocations) == [("0",), ("1",)]   # each rank on its own GPU only
    assert all(not [s for s in log["syncs"] if STEP_FUNCTIONS & set(s["functions"])] for log in _logs(tmp_path))
    assert main([*small[:-1], "numpy", "--out", str(tmp_path / "one")]) == 0
    np.testing.assert_allclose(numbers(tmp_path / "two"), numbers(tmp_path / "one"), rtol=1e-12)


@pytest.mark.slow
def test_cupy_data_parallel_with_more_ranks_than_gpus_is_one_error_line(tmp_path):
    mpiexec = _mpiexec()
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "mpi4py", str(REPO / "examples" / "train_mnist.py"),
                           "--distributed", *TINY, "--backend", "cupy", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, env=_env(tmp_path, STANDIN_GPUS="1"))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2 processes run on this machine and it has 1 GPU(s)" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "NcclError" not in proc.stderr
    allocations = [log["allocations"] for log in _logs(tmp_path)]
    assert all(a == {} for a in allocations), allocations     # refused before anything was allocated


@pytest.mark.parametrize("option", [["--arch", "gated", "--hidden", "16,12", "--prior", "vampprior",
                                     "--pseudo-inputs", "10"],
                                    ["--objective", "iwae", "--samples", "3"],
                                    ["--arch", "gated", "--hidden", "16,12", "--levels", "2", "--prior", "vampprior",
                                     "--pseudo-inputs", "10", "--objective", "iwae", "--samples", "2",
                                     "--normalize-grads"]],
                         ids=["vampprior", "iwae", "levels"])
def test_cupy_runs_the_new_prior_and_objective_like_numpy(cupy, tmp_path, option):
    cupy.reset()
    run = [*TINY, *option, "--iwae-k", "2"]
    assert main([*run, "--backend", "cupy", "--no-fused", "--out", str(tmp_path / "gpu")]) == 0
    assert step_syncs(cupy) == []
    assert main([*run, "--no-fused", "--no-figures", "--out", str(tmp_path / "cpu")]) == 0
    assert numbers(tmp_path / "gpu") == numbers(tmp_path / "cpu")
    if "vampprior" in option:
        assert (tmp_path / "gpu" / "pseudo_inputs.png").exists()
