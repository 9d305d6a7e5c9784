"""The bare loop of examples/one_step.py runs as a reader would run it, and its loss falls."""
import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_one_step_example_runs_and_its_loss_falls():
    script = REPO / "examples" / "one_step.py"
    assert len(script.read_text().splitlines()) <= 40
    # One BLAS thread: the example's products are small, and a 2-thread OpenBLAS process on a busy 2-core
    # machine stalls at every product waiting for its second thread (92 s against 33 s, niced beside a
    # 2-thread training run), which would time this test out for a reason that is not the example's.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env=env)
    assert run.returncode == 0, run.stderr
    steps = [float(m) for m in re.findall(r"loss +([\d.]+)", run.stdout)]
    before, after = (float(m) for m in re.findall(r"test negative ELBO .* ([\d.]+) nats", run.stdout))
    assert len(steps) == 8 and steps[-1] < steps[0] - 100, run.stdout
    assert after < before - 300, run.stdout
