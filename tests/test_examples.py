"""The bare loop of examples/one_step.py runs as a reader would run it, and its loss falls."""
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_one_step_example_runs_and_its_loss_falls():
    script = REPO / "examples" / "one_step.py"
    assert len(script.read_text().splitlines()) <= 40
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    steps = [float(m) for m in re.findall(r"loss +([\d.]+)", run.stdout)]
    before, after = (float(m) for m in re.findall(r"test negative ELBO .* ([\d.]+) nats", run.stdout))
    assert len(steps) == 8 and steps[-1] < steps[0] - 100, run.stdout
    assert after < before - 300, run.stdout
