"""The training program: outputs, determinism, resume, Ctrl-C, NaN, bad files and data."""
import dataclasses
import json
import math
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from scratchvae import checkpoint, datasets
from scratchvae.cli import main
from scratchvae.train import TrainConfig, TrainingDiverged, train

REPO = pathlib.Path(__file__).resolve().parents[1]
FIGURES = ["samples.png", "reconstructions.png", "curves.png", "latent.png", "manifold.png", "interpolation.png"]
PNG = b"\x89PNG\r\n\x1a\n"


def small(out, **kw):
    """A tiny, fast run: 300 images, a 32-unit MLP."""
    base = dict(limit=300, test_limit=200, batch_size=64, hidden=(32,), latent_dim=3, epochs=2, figures=False,
                out=str(out))
    base.update(kw)
    return TrainConfig(**base)


def quiet(*args, **kw):
    pass


def params_of(run_dir):
    arrays, meta = checkpoint.load(pathlib.Path(run_dir) / "checkpoint.npz")
    return arrays, meta


def assert_same_params(a, b):
    """Every array of ``a`` (from checkpoint.load) is in ``b``, bit-identical."""
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def strip_times(history):
    return [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s", "run_id")} for h in history]


@pytest.mark.slow
@pytest.mark.parametrize("arch, extra", [("mlp", []), ("conv", ["--channels", "8,16", "--hidden", "64"])])
def test_cli_smoke_run_writes_everything_and_learns(tmp_path, arch, extra):
    out = tmp_path / arch
    cmd = [sys.executable, str(REPO / "examples" / "train_mnist.py"), "--arch", arch, "--limit", "1000",
           "--test-limit", "500", "--epochs", "1", "--batch-size", "64", "--out", str(out), *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "epoch   1/1" in run.stdout
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == PNG, name
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    for key in ("epoch", "train_loss", "test_loss", "test_recon", "test_kl", "seconds", "images_per_s"):
        assert key in record
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["backend"] == "numpy" and summary["device"] == "cpu"
    assert summary["config"]["arch"] == arch
    assert summary["test_loss"] == record["test_loss"]
    assert record["test_loss"] < summary["initial_test"]["loss"] - 10, "the test loss did not fall"
    assert record["test_loss"] == pytest.approx(record["test_recon"] + record["test_kl"])
    checkpoint.load(out / "checkpoint.npz")


def test_help_explains_every_flag():
    run = subprocess.run([sys.executable, str(REPO / "examples" / "train_mnist.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    for flag in ("--backend", "--dataset", "--data-dir", "--arch", "--hidden", "--latent-dim", "--likelihood",
                 "--model", "--epochs", "--batch-size", "--lr", "--beta", "--kl-warmup", "--free-bits", "--seed",
                 "--dtype", "--limit", "--iwae-k", "--out", "--resume"):
        assert flag in run.stdout, flag


def test_same_seed_same_numbers_bit_for_bit(tmp_path):
    a = train(small(tmp_path / "a"), log=quiet)
    b = train(small(tmp_path / "b"), log=quiet)
    assert strip_times(a["history"]) == strip_times(b["history"])
    assert_same_params(params_of(tmp_path / "a")[0], params_of(tmp_path / "b")[0])


def test_resume_equals_uninterrupted(tmp_path):
    whole = train(small(tmp_path / "whole", epochs=3, kl_warmup=1.5), log=quiet)
    train(small(tmp_path / "part", epochs=1, kl_warmup=1.5), log=quiet)
    resumed = train(small(tmp_path / "part", epochs=3, kl_warmup=1.5), resume=tmp_path / "part", log=quiet)
    assert strip_times(resumed["history"]) == strip_times(whole["history"])
    pw, mw = params_of(tmp_path / "whole")
    pr, mr = params_of(tmp_path / "part")
    assert pw.keys() == pr.keys()
    assert_same_params(pw, pr)
    assert mw["step"] == mr["step"] and mw["adam_step"] == mr["adam_step"]
    assert len((tmp_path / "part" / "metrics.jsonl").read_text().splitlines()) == 3


def test_ctrl_c_saves_a_checkpoint_and_resume_is_bit_identical(tmp_path):
    whole = train(small(tmp_path / "whole"), log=quiet)

    def press_ctrl_c(step, stats):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)   # the real signal, caught by the trainer's handler

    lines = []
    summary = train(small(tmp_path / "cut"), log=lines.append, on_step=press_ctrl_c)
    assert summary["status"] == "interrupted"
    assert any("interrupted at epoch 1, step 2" in line for line in lines)
    _, meta = params_of(tmp_path / "cut")
    assert meta["epoch"] == 0 and meta["batch_in_epoch"] == 2
    resumed = train(small(tmp_path / "cut"), resume=tmp_path / "cut", log=quiet)
    assert strip_times(resumed["history"]) == strip_times(whole["history"])
    assert_same_params(params_of(tmp_path / "whole")[0], params_of(tmp_path / "cut")[0])


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = small(tmp_path / "run", epochs=1)
    train(cfg, log=quiet)
    ckpt = tmp_path / "run" / "checkpoint.npz"
    good = ckpt.read_bytes()

    def poison(step, stats):
        if step == 7:   # the second step of epoch 2 (5 steps per epoch)
            poison.model_params["decoder.0.W"][0, 0] = np.nan

    import scratchvae.train as train_mod
    real_build = train_mod.build_model

    def build_and_remember(*args, **kw):
        model = real_build(*args, **kw)
        poison.model_params = model.params
        return model

    train_mod.build_model = build_and_remember
    try:
        with pytest.raises(TrainingDiverged) as info:
            train(dataclasses.replace(cfg, epochs=2), resume=tmp_path / "run", log=quiet, on_step=poison)
    finally:
        train_mod.build_model = real_build
    msg = str(info.value)
    assert "epoch 2, step 8" in msg and "reconstruction term" in msg and "untouched" in msg
    assert ckpt.read_bytes() == good
    # the finished run's summary is left as it was: the error says what failed
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "finished"


def test_corrupted_truncated_and_mismatched_checkpoints_are_clear_errors(tmp_path, capsys):
    train(small(tmp_path / "run", epochs=1), log=quiet)
    ckpt = tmp_path / "run" / "checkpoint.npz"
    data = ckpt.read_bytes()

    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "checkpoint.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match=r"trunc/checkpoint.npz is corrupted or truncated"):
        checkpoint.load(tmp_path / "trunc" / "checkpoint.npz")

    # an array changed behind the checksum's back (the zip itself stays valid)
    with np.load(ckpt) as z:
        stored = {k: z[k] for k in z.files}
    stored["param/encoder.0.W"] = stored["param/encoder.0.W"] + 1.0
    bad = tmp_path / "flip.npz"
    np.savez(bad, **stored)
    with pytest.raises(checkpoint.CheckpointError, match=r"flip.npz: checksum mismatch in array 'param/encoder.0.W'"):
        checkpoint.load(bad)

    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nothing.npz")

    # the same file resumed into a different model: shapes named
    with pytest.raises(checkpoint.CheckpointError, match="does not fit the model"):
        train(small(tmp_path / "run", latent_dim=4, epochs=2), resume=tmp_path / "run", log=quiet)

    # through the command line: exit code 1 and the file named
    assert main(["--resume", str(tmp_path / "trunc"), "--no-figures"]) == 1
    assert "trunc/checkpoint.npz" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "run"), "--latent-dim", "5"]) == 1
    assert "latent_dim=3" in capsys.readouterr().err


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.npz"
    checkpoint.save(path, {"a": np.arange(3.0)}, {"epoch": 1})
    good = path.read_bytes()

    def explode(*args, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", explode)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"a": np.arange(4.0)}, {"epoch": 2})
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]   # no temp file left


@pytest.mark.parametrize("problem, match", [("nan", "NaN"), ("range", "outside"), ("shape", "shape")])
def test_bad_data_is_refused_before_training(tmp_path, monkeypatch, problem, match):
    x = (np.random.default_rng(0).random((50, 784)) < 0.5).astype(np.float32)
    if problem == "nan":
        x[3, 5] = np.nan
    elif problem == "range":
        x[0, 0] = 2.0
    test = x[:20].copy()
    if problem == "shape":
        x = x[:, :700]

    def fake_load(*args, **kw):
        return datasets.Dataset(name="fake", train=x, valid=None, test=test, image_shape=(1, 28, 28)) \
            if problem != "shape" else _Bad(x, test)

    class _Bad:
        def __init__(self, train, test):
            self.train, self.test, self.test_labels = train, test, None
            self.image_shape, self.dynamic_binarization = (1, 28, 28), False
            self.levels, self.attributes = None, None   # the rest of the Dataset interface prepare_data reads

    monkeypatch.setattr(datasets, "load", fake_load)
    with pytest.raises(ValueError, match=match):
        train(small(tmp_path / "bad"), log=quiet)
    assert not (tmp_path / "bad" / "checkpoint.npz").exists()


def test_autoencoder_and_gaussian_runs(tmp_path):
    s = train(small(tmp_path / "ae", model="ae", epochs=1, figures=True), log=quiet)
    assert s["status"] == "finished" and s["test_kl"] == 0.0
    for name in FIGURES:
        assert (tmp_path / "ae" / name).exists(), name
    g = train(small(tmp_path / "g", likelihood="gaussian", epochs=1), log=quiet)
    assert np.isfinite(g["test_loss"])


def test_iwae_figure_in_summary(tmp_path):
    s = train(small(tmp_path / "iw", epochs=1, test_limit=50, iwae_k=20), log=quiet)
    assert s["iwae_k"] == 20
    assert s["test_nll_iwae"] <= s["test_loss"] + 1.0   # the bound is at least about as tight as the ELBO


# -- learning-rate decay, model selection on the validation split, early stopping ----------

def test_geometric_lr_schedule_and_adam_lr_override():
    from scratchvae.optim import Adam, geometric_lr
    lrs = [geometric_lr(1e-3, 1e-5, t, 100) for t in range(101)]
    assert lrs[0] == 1e-3 and lrs[-1] == pytest.approx(1e-5, rel=1e-12)
    ratios = np.array(lrs[1:]) / np.array(lrs[:-1])
    np.testing.assert_allclose(ratios, 0.01 ** (1 / 100), rtol=1e-12)
    assert geometric_lr(1e-3, None, 50, 100) == 1e-3
    with pytest.raises(ValueError, match="lr_final > 0"):
        geometric_lr(1e-3, 0.0, 1, 10)
    rng = np.random.default_rng(0)
    p1 = {"w": rng.standard_normal(5)}
    p2 = {"w": p1["w"].copy()}
    g = {"w": rng.standard_normal(5)}
    Adam(lr=0.3, fused=False).step(p1, g, Adam().init(p1))
    Adam(lr=1e-3, fused=False).step(p2, g, Adam().init(p2), lr=0.3)
    np.testing.assert_array_equal(p1["w"], p2["w"])
    with pytest.raises(ValueError, match="lr must be > 0"):
        Adam().step(p1, g, Adam().init(p1), lr=-1.0)


def test_lr_final_decays_per_step_and_resumes_exactly(tmp_path):
    from scratchvae.optim import geometric_lr
    whole = train(small(tmp_path / "whole", epochs=3, lr=3e-3, lr_final=3e-4), log=quiet)
    steps = whole["steps"]
    assert [h["lr"] for h in whole["history"]] == [geometric_lr(3e-3, 3e-4, h["step"] - 1, steps)
                                                   for h in whole["history"]]
    assert whole["history"][-1]["lr"] == pytest.approx(3e-3 * 0.1 ** ((steps - 1) / steps), rel=1e-12)
    const = train(small(tmp_path / "const", epochs=3, lr=3e-3), log=quiet)
    assert strip_times(const["history"]) != strip_times(whole["history"])   # the schedule is really applied

    def press_ctrl_c(step, stats):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)
    part = train(small(tmp_path / "part", epochs=3, lr=3e-3, lr_final=3e-4), log=quiet, on_step=press_ctrl_c)
    assert part["status"] == "interrupted"
    with pytest.raises(ValueError, match="would change the schedule"):
        train(small(tmp_path / "part", epochs=4, lr=3e-3, lr_final=3e-4), resume=tmp_path / "part", log=quiet)
    resumed = train(small(tmp_path / "part", epochs=3, lr=3e-3, lr_final=3e-4), resume=tmp_path / "part", log=quiet)
    assert strip_times(resumed["history"]) == strip_times(whole["history"])
    assert_same_params(params_of(tmp_path / "whole")[0], params_of(tmp_path / "part")[0])


def script_validation(monkeypatch, losses):
    """Models built by train() report the validation losses ``losses``, one per evaluation of the
    validation split (the test split's figures stay real)."""
    import scratchvae.train as train_mod
    scripted = iter(losses)
    build = train_mod.build_model

    def build_with_scripted_validation(*args, **kw):
        model = build(*args, **kw)
        evaluate = model.evaluate

        def scripted_evaluate(x, rng, **ekw):
            real = evaluate(x, rng, **ekw)
            if x.shape[0] == datasets.load("binarized-mnist").valid.shape[0]:   # the validation split
                real = dict(real, loss=next(scripted))
            return real
        model.evaluate = scripted_evaluate
        return model
    monkeypatch.setattr(train_mod, "build_model", build_with_scripted_validation)


def test_keep_best_selects_the_best_validation_epoch_and_patience_stops(tmp_path, monkeypatch):
    """Validation losses are scripted (5, 3, 4, 6, ...): epoch 2 is the best and patience 2 stops after epoch 4;
    the final figures are the test figures of epoch 2, computed with epoch 2's parameters."""
    script_validation(monkeypatch, [5.0, 3.0, 4.0, 6.0, 7.0, 8.0])
    s = train(small(tmp_path / "kb", epochs=6, keep_best=True, patience=2), log=quiet)
    assert [h["valid_loss"] for h in s["history"]] == [5.0, 3.0, 4.0, 6.0]
    assert s["best_epoch"] == 2 and s["best_valid_loss"] == 3.0 and s["stopped_early"] and s["epochs"] == 4
    assert s["test_loss"] == s["history"][1]["test_loss"] != s["history"][-1]["test_loss"]
    monkeypatch.undo()
    train(small(tmp_path / "two", epochs=2), log=quiet)      # the same run, stopped after epoch 2
    best, meta = checkpoint.load(tmp_path / "kb" / "best.npz")
    assert meta["epoch"] == 2
    assert_same_params(best, params_of(tmp_path / "two")[0])


def test_a_run_cut_off_after_its_early_stop_only_finishes_on_resume(tmp_path, monkeypatch):
    """Interrupted during the final IWAE bound after an early stop, a resumed run trains no further epoch."""
    import scratchvae.train as train_mod

    def cut_off(*args, **kw):
        raise KeyboardInterrupt
    script_validation(monkeypatch, [5.0, 3.0, 4.0, 6.0, 7.0, 8.0])
    monkeypatch.setattr(train_mod, "iwae_test_nll", cut_off)
    cfg = small(tmp_path / "kb", epochs=6, keep_best=True, patience=2, iwae_k=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=quiet)
    assert not (tmp_path / "kb" / "summary.json").exists()
    monkeypatch.undo()
    s = train(cfg, resume=tmp_path / "kb", log=quiet)
    assert s["epochs"] == 4 and s["stopped_early"] and s["best_epoch"] == 2 and len(s["history"]) == 4
    assert math.isfinite(s["test_nll_iwae"])


def test_one_ctrl_c_ends_the_final_evaluation(tmp_path, monkeypatch):
    """The final IWAE bound has no step to stop after: the first SIGINT ends it (it used to set a flag that
    nothing read, and the hour-long evaluation went on); --resume then finishes the run."""
    import signal

    import scratchvae.train as train_mod

    def interrupted_once(*args, **kw):
        signal.raise_signal(signal.SIGINT)      # the handler runs here, as on a real Ctrl-C
        return 1.0
    monkeypatch.setattr(train_mod, "iwae_test_nll", interrupted_once)
    cfg = small(tmp_path / "run", epochs=2, iwae_k=2)
    with pytest.raises(KeyboardInterrupt) as stopped:
        train(cfg, log=quiet)
    assert not (tmp_path / "run" / "summary.json").exists()
    # the error line says training is done and how to finish (not "the last good checkpoint", as of a failure)
    assert stopped.value.kept == (f"training had ended at epoch 2 and its checkpoint {tmp_path / 'run' / 'checkpoint.npz'}"
                                  f" is untouched; --resume {tmp_path / 'run'} runs the final stage (the test evaluation)")
    monkeypatch.undo()
    s = train(cfg, resume=tmp_path / "run", log=quiet)
    assert s["epochs"] == 2 and len(s["history"]) == 2 and math.isfinite(s["test_nll_iwae"])


def test_patience_needs_keep_best():
    with pytest.raises(ValueError, match=r"patience \(--patience\) needs keep_best"):
        TrainConfig(patience=3)
    with pytest.raises(ValueError, match=r"lr_final \(--lr-final\) must be a finite number > 0"):
        TrainConfig(lr_final=0.0)


def test_evaluate_run_script_reads_best_and_last(tmp_path):
    out = tmp_path / "run"
    train(small(out, epochs=2, keep_best=True), log=quiet)
    script = REPO / "examples" / "evaluate_run.py"
    for which in ("best", "last"):
        res = subprocess.run([sys.executable, str(script), str(out), "--params", which, "--iwae-k", "3"],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        result = json.loads((out / f"evaluation-{which}.json").read_text())
        assert result["iwae_k"] == 3 and result["epoch"] in (1, 2)
        assert 0 < result["test_nll_iwae"] < result["test_neg_elbo"] + 5   # a bound near (k=3) the ELBO
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "missing")], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 1 and "does not exist" in res.stderr


def test_the_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """Run on NumPy with the backend's transfer and sync functions counted: between the checks
    every CHECK_EVERY steps (and at an epoch's end), a step calls none of them, and the trainer
    itself copies nothing from the host during an epoch."""
    import sys as _sys

    import scratchvae.train as train_mod
    from scratchvae import backend as backend_mod

    calls = []

    class Counting(backend_mod.Backend):
        def asnumpy(self, a):
            calls.append("asnumpy")
            return super().asnumpy(a)

        def synchronize(self):
            calls.append("synchronize")
            return super().synchronize()

        def asarray(self, a, dtype=None):
            if _sys._getframe(1).f_globals.get("__name__") == "scratchvae.train":
                calls.append("asarray from the trainer")
            return super().asarray(a, dtype=dtype)

    counting = Counting(name="numpy", xp=np, device="cpu")
    monkeypatch.setattr(backend_mod, "get", lambda name="numpy": counting)
    monkeypatch.setattr(train_mod, "CHECK_EVERY", 4)
    per_step = {}

    def count(step, stats):
        per_step[step] = len(calls)
        assert not isinstance(stats["recon"], float)      # device values, not host floats

    train(small(tmp_path / "run", epochs=1, limit=640, batch_size=32, test_limit=50), log=quiet, on_step=count)
    steps = sorted(per_step)                                # 20 steps: checks after steps 4, 8, ..., 20
    moved = [s for s in steps[1:] if per_step[s] != per_step[s - 1]]
    assert moved == [5, 9, 13, 17], moved                  # only the steps right after a check saw a transfer


def test_dynamic_binarization_resumes_bit_identically(tmp_path, monkeypatch):
    x = np.random.default_rng(0).random((200, 784)).astype(np.float32)
    fake = datasets.Dataset(name="fake", train=x, valid=None, test=x[:40], image_shape=(1, 28, 28),
                            dynamic_binarization=True)
    monkeypatch.setattr(datasets, "load", lambda *a, **k: fake)
    whole = train(small(tmp_path / "whole", epochs=2, limit=None, batch_size=32), log=quiet)

    def press_ctrl_c(step, stats):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
    assert train(small(tmp_path / "cut", epochs=2, limit=None, batch_size=32), log=quiet,
                 on_step=press_ctrl_c)["status"] == "interrupted"
    resumed = train(small(tmp_path / "cut", epochs=2, limit=None, batch_size=32), resume=tmp_path / "cut", log=quiet)
    assert strip_times(resumed["history"]) == strip_times(whole["history"])
    assert_same_params(params_of(tmp_path / "whole")[0], params_of(tmp_path / "cut")[0])


def test_a_denoising_run_corrupts_the_encoder_input_and_draws_the_figure(tmp_path):
    from scratchvae import datasets as ds
    x = (np.random.default_rng(0).random((64, 784)) < 0.3).astype(np.float32)
    noisy = ds.corrupt(x, 0.2, np.random.default_rng(1), binary=True)
    changed = float((noisy != x).mean())
    assert 0.07 < changed < 0.13                       # a share 0.2 replaced by a coin: half of them change
    assert set(np.unique(noisy)) <= {0.0, 1.0}
    g = ds.corrupt(np.full((4, 10), 0.5, np.float32), 0.1, np.random.default_rng(2), binary=False)
    assert g.min() >= 0 and g.max() <= 1 and 0.03 < float(np.std(g)) < 0.2
    s = train(small(tmp_path / "dn", epochs=1, input_noise=0.2, figures=True), log=quiet)
    assert s["status"] == "finished"
    assert s["figures"]["denoising"]["mse_noisy"] > 0
    assert (tmp_path / "dn" / "denoising.png").read_bytes()[:8] == PNG
    clean = train(small(tmp_path / "clean", epochs=1), log=quiet)
    assert strip_times(clean["history"]) != strip_times(s["history"])   # the noise changed what was learned
    with pytest.raises(ValueError, match=r"input_noise \(--input-noise\) must be below 1"):
        TrainConfig(input_noise=1.0)
    assert main(["--input-noise", "nan", "--out", str(tmp_path / "bad")]) == 1


def test_conv_vae_with_max_pooling_trains_from_the_command_line(tmp_path, capsys):
    assert main(["--arch", "conv", "--downsample", "pool", "--channels", "4,8", "--hidden", "16", "--limit", "256",
                 "--test-limit", "64", "--batch-size", "64", "--epochs", "1", "--latent-dim", "3", "--no-figures",
                 "--out", str(tmp_path / "pool")]) == 0
    _, meta = params_of(tmp_path / "pool")
    assert meta["config"]["downsample"] == "pool"
    assert main(["--downsample", "pool", "--out", str(tmp_path / "mlp")]) == 1
    assert "--downsample" in capsys.readouterr().err
