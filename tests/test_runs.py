"""A run folder belongs to one run, and every failure is one clear ``error:`` line.

The command line is driven in-process (``scratchvae.cli.main``) where a fault
is injected, and as a real process where the OS must see two of them.
"""
import errno
import importlib.util
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from scratchvae import checkpoint, datasets
from scratchvae.atomic import remove_stale_temporaries
from scratchvae.cli import main
from scratchvae.runfolder import RunFolder, RunFolderError

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--limit", "300", "--test-limit", "200", "--batch-size", "64", "--hidden", "32", "--latent-dim", "3",
        "--epochs", "1", "--no-figures"]


def run_cli(capsys, *argv):
    """main(argv) -> (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_error_line(err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- one run per folder ------------------------------------------------------------------

def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, *TINY, "--out", out)[0] == 0
    first = (out / "checkpoint.npz").read_bytes()
    (out / "evaluation-last.json").write_text("{}")

    code, _, err = run_cli(capsys, *TINY, "--out", out)
    assert code == 1
    assert_one_error_line(err, "already holds a run", "--resume", "--overwrite")
    assert (out / "checkpoint.npz").read_bytes() == first

    code, _, err = run_cli(capsys, *TINY, "--out", out, "--overwrite")
    assert code == 0, err
    assert (out / "checkpoint.npz").read_bytes() != first          # a new run (a new identity)
    assert not (out / "evaluation-last.json").exists()            # the old run's files went first

    code, _, err = run_cli(capsys, "--resume", out, "--overwrite")
    assert code == 1 and "contradict" in err


HOLD = """
import sys, time
from scratchvae.runfolder import RunFolder
folder = RunFolder(sys.argv[1]).__enter__()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_process_on_the_folder_stops_at_once_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_cli(capsys, *TINY, "--out", out)
        assert code == 1
        assert_one_error_line(err, f"in use by another process (PID {holder.pid})", str(out))
        assert not (out / "checkpoint.npz").exists()
        holder.send_signal(signal.SIGKILL)       # the kernel drops the lock with the process
        holder.wait(timeout=30)
        code, _, err = run_cli(capsys, *TINY, "--out", out)
        assert code == 0, err
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_every_file_of_a_run_records_its_identity(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [a for a in TINY if a != "--no-figures"] + ["--keep-best", "--out", out]
    assert run_cli(capsys, *argv)[0] == 0
    _, meta = checkpoint.load(out / "checkpoint.npz")
    run_id = meta["run_id"]
    assert isinstance(run_id, str) and len(run_id) == 32
    assert checkpoint.load(out / "best.npz")[1]["run_id"] == run_id
    assert all(json.loads(line)["run_id"] == run_id for line in (out / "metrics.jsonl").read_text().splitlines())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run_id"] == run_id
    assert 0 <= summary["active_units"] <= 3 and len(summary["kl_per_dim"]) == 3   # posterior collapse, per epoch too
    assert all(len(json.loads(line)["kl_per_dim"]) == 3 for line in (out / "metrics.jsonl").read_text().splitlines())
    for png in ("samples", "reconstructions", "curves", "posterior", "latent", "manifold", "interpolation"):
        with Image.open(out / f"{png}.png") as im:
            assert im.text["scratchvae-run-id"] == run_id, png


def test_readers_refuse_a_best_npz_from_another_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert run_cli(capsys, *TINY, "--keep-best", "--out", out)[0] == 0
    (a / "best.npz").write_bytes((b / "best.npz").read_bytes())     # b's best lands in a's folder
    code, _, err = run_cli(capsys, "--resume", a, "--epochs", "2")
    assert code == 1
    assert_one_error_line(err, "best.npz", "another run")
    evaluate_run = load_script("evaluate_run")
    assert evaluate_run.main([str(a), "--params", "best", "--iwae-k", "2"]) == 1
    assert_one_error_line(capsys.readouterr().err, "best.npz", "another run")


def test_stale_temporaries_of_an_interrupted_write_are_removed(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, *TINY, "--out", out)[0] == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = out / f".checkpoint.npz.{dead.stdout.strip()}.0123abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    keep = out / "notes.tmp"     # not of the atomic-write pattern: left alone
    keep.write_text("mine")
    code, stdout, err = run_cli(capsys, "--resume", out, "--epochs", "2")
    assert code == 0, err
    assert not stale.exists() and keep.exists()
    assert "removed 1 temporary file" in stdout
    alive = out / f".summary.json.{os.getpid() + 0}.0123abcd.tmp"
    alive.write_text("x")
    assert remove_stale_temporaries(out) == [alive.name]   # our own pid: not writing it now


# -- OS errors and bad paths ---------------------------------------------------------------

def test_disk_full_while_writing_a_checkpoint_keeps_the_last_good_one(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_savez = np.savez
    calls = []

    def savez_until_the_disk_fills(f, *args, **kw):
        calls.append(1)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_savez(f, *args, **kw)

    monkeypatch.setattr(np, "savez", savez_until_the_disk_fills)
    code, _, err = run_cli(capsys, *[a if a != "1" else "3" for a in TINY], "--out", out)
    assert code == 1
    assert_one_error_line(err, "disk full", "checkpoint.npz", "(epoch 1) is untouched")
    _, meta = checkpoint.load(out / "checkpoint.npz")
    assert meta["epoch"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "disk full" in summary["error"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_read_only_folder_is_one_error_line(tmp_path, capsys, monkeypatch):
    import scratchvae.runfolder as runfolder
    real_open = os.open

    def read_only(path, *args, **kw):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr(runfolder.os, "open", read_only)
    code, _, err = run_cli(capsys, *TINY, "--out", tmp_path / "ro")
    assert code == 1
    assert_one_error_line(err, "cannot write into the run folder", "Read-only file system")
    assert not (tmp_path / "ro").exists()       # nothing left behind


def test_evaluate_run_on_a_read_only_folder_still_reports_its_figures(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run_cli(capsys, *TINY, "--out", out)[0] == 0
    evaluate_run = load_script("evaluate_run")

    def read_only(path, obj):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(evaluate_run, "write_json", read_only)
    assert evaluate_run.main([str(out), "--iwae-k", "2"]) == 1
    captured = capsys.readouterr()
    assert "test NLL (IWAE, k=2)" in captured.out           # the work is printed, not lost
    assert_one_error_line(captured.err, "Read-only file system", "evaluation-last.json")


def test_out_must_be_a_usable_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(capsys, *TINY, "--out", "afile")
    assert code == 1
    assert_one_error_line(err, "--out afile is a file")
    code, _, err = run_cli(capsys, *TINY, "--out", "")
    assert code == 1
    assert_one_error_line(err, "--out", "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]   # nothing written into the cwd
    with pytest.raises(RunFolderError, match="empty"):
        RunFolder("  ")


def test_a_failed_start_leaves_no_empty_folder(tmp_path, capsys, monkeypatch):
    def offline(*args, **kw):
        raise datasets.DatasetUnavailable("MNIST is unavailable (offline)")

    monkeypatch.setattr(datasets, "load", offline)
    code, _, err = run_cli(capsys, *TINY, "--out", tmp_path / "new" / "run")
    assert code == 1 and "offline" in err
    assert not (tmp_path / "new" / "run").exists()


def test_the_offline_mnist_message_speaks_command_line(tmp_path):
    with pytest.raises(datasets.DatasetUnavailable) as info:
        datasets.download_mnist(tmp_path / "offline", mirrors=[], timeout=5)
    assert "--data-dir" in str(info.value)


# -- checkpoints that lie ------------------------------------------------------------------

def _tiny_run(capsys, out):
    assert run_cli(capsys, *TINY, "--out", out)[0] == 0
    return checkpoint.load(out / "checkpoint.npz")


def test_a_crafted_array_header_is_refused_before_any_array_is_read(tmp_path, capsys):
    arrays, meta = _tiny_run(capsys, tmp_path / "run")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (100_000, 1_000_000)})   # 373 GiB
    crafted = tmp_path / "crafted" / "checkpoint.npz"
    crafted.parent.mkdir()
    with zipfile.ZipFile(tmp_path / "run" / "checkpoint.npz") as src, zipfile.ZipFile(crafted, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "param/encoder.0.W.npy":
                data = np.lib.format.magic(1, 0) + header.getvalue()[len(np.lib.format.magic(1, 0)):] + b"\0" * 64
            dst.writestr(info.filename, data)
    with pytest.raises(checkpoint.CheckpointError, match=r"claims \(100000, 1000000\) float32"):
        checkpoint.load(crafted)
    code, _, err = run_cli(capsys, "--resume", crafted.parent)
    assert code == 1
    assert_one_error_line(err, "crafted/checkpoint.npz")


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["config"].update(bogus=1), "unknown config keys ['bogus']"),
    (lambda m: m["config"].update(epochs="3"), "epochs (--epochs) must be an integer"),
    (lambda m: m["config"].update(beta=float("nan")), "beta (--beta) must be a finite number"),
    (lambda m: m.update(epoch=-1), "'epoch' is -1"),
    (lambda m: m.update(step="7"), "metadata 'step' is '7'"),
    (lambda m: m.update(extra=True), "unknown metadata keys ['extra']"),
])
def test_hand_edited_metadata_is_refused_naming_the_key(tmp_path, capsys, edit, needle):
    arrays, meta = _tiny_run(capsys, tmp_path / "run")
    for key in ("format_version", "sha256", "arrays"):
        meta.pop(key)
    edit(meta)
    checkpoint.save(tmp_path / "run" / "checkpoint.npz", arrays, meta)     # checksums recomputed: a valid file
    code, _, err = run_cli(capsys, "--resume", tmp_path / "run", "--epochs", "2")
    assert code == 1
    assert_one_error_line(err, needle)


def test_non_finite_parameters_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    arrays, meta = _tiny_run(capsys, out)
    for key in ("format_version", "sha256", "arrays"):
        meta.pop(key)
    arrays["param/decoder.0.b"] = arrays["param/decoder.0.b"].copy()
    arrays["param/decoder.0.b"][0] = np.nan
    checkpoint.save(out / "checkpoint.npz", arrays, meta)
    evaluate_run = load_script("evaluate_run")
    assert evaluate_run.main([str(out), "--iwae-k", "2"]) == 1
    assert_one_error_line(capsys.readouterr().err, "param/decoder.0.b holds NaN or Inf")


def test_a_format_1_checkpoint_still_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    arrays, meta = _tiny_run(capsys, out)
    for key in ("format_version", "sha256", "arrays", "run_id"):
        meta.pop(key)
    legacy = dict(meta, format_version=1, sha256={k: checkpoint._digest(v) for k, v in arrays.items()})
    with open(out / "checkpoint.npz", "wb") as f:
        np.savez(f, meta=np.array(json.dumps(legacy)), **arrays)
    code, _, err = run_cli(capsys, "--resume", out, "--epochs", "2")
    assert code == 0, err
    _, meta2 = checkpoint.load(out / "checkpoint.npz")
    assert meta2["format_version"] == checkpoint.FORMAT_VERSION and meta2["epoch"] == 2


# -- numbers and flags ---------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [("--beta", "nan"), ("--kl-warmup", "nan"), ("--free-bits", "nan"),
                                         ("--lr", "nan"), ("--lr", "0"), ("--beta", "-1"), ("--free-bits", "-0.5"),
                                         ("--epochs", "0"), ("--lr-final", "inf"), ("--batch-size", "-3")])
def test_bad_numbers_are_refused_naming_the_flag(tmp_path, capsys, flag, value):
    code, _, err = run_cli(capsys, *TINY, flag, value, "--out", tmp_path / "run")
    assert code == 1
    assert_one_error_line(err, flag)
    assert not (tmp_path / "run").exists()


def test_autoencoder_refuses_vae_only_flags_and_speaks_autoencoder(tmp_path, capsys):
    for flag, value in (("--beta", "2"), ("--free-bits", "0.5"), ("--kl-warmup", "3"), ("--iwae-k", "10")):
        code, _, err = run_cli(capsys, *TINY, "--model", "ae", flag, value, "--out", tmp_path / "x")
        assert code == 1
        assert_one_error_line(err, flag, "autoencoder")
    code, stdout, err = run_cli(capsys, *TINY, "--model", "ae", "--out", tmp_path / "ae")
    assert code == 0, err
    assert "reconstruction loss" in stdout and "ELBO" not in stdout


def test_evaluate_run_defaults_to_the_parameters_the_run_has(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, *TINY, "--out", out)[0] == 0          # no --keep-best: no best.npz
    evaluate_run = load_script("evaluate_run")
    assert evaluate_run.main([str(out), "--iwae-k", "2"]) == 0
    assert json.loads((out / "evaluation-last.json").read_text())["params"] == "last"
    assert evaluate_run.main([str(out), "--params", "best", "--iwae-k", "2"]) == 1
    assert_one_error_line(capsys.readouterr().err, "no best.npz", "--params last")


def test_each_run_without_out_gets_a_folder_of_its_own_and_latest_points_at_the_newest(tmp_path, capsys,
                                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out1, _ = run_cli(capsys, *TINY)
    code2, out2, _ = run_cli(capsys, *TINY, "--arch", "gated")       # the README's second command, after the first
    assert code == code2 == 0
    first, second = (line.split()[2] for out in (out1, out2) for line in out.splitlines()
                     if line.startswith("run folder: "))
    assert first != second and pathlib.Path(first).parent == pathlib.Path(second).parent == pathlib.Path("runs")
    for folder in (first, second):
        assert (tmp_path / folder / "checkpoint.npz").exists()
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and latest.resolve() == (tmp_path / second).resolve()
    assert run_cli(capsys, "--resume", "runs/latest", "--epochs", "2")[0] == 0   # --resume through the link
    assert json.loads((tmp_path / second / "summary.json").read_text())["epochs"] == 2
