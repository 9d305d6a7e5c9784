"""Smoke tests of the benchmark scripts in benchmarks/: tiniest configurations, no PyTorch needed.

They check that each script runs end to end and writes its JSON report with
the expected keys; they never assert timing figures.
"""
import json
import math
import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_kernels
        import bench_train
        import compare_torch
        import profile_step
        yield {"bench_train": bench_train, "bench_kernels": bench_kernels, "compare_torch": compare_torch,
               "profile_step": profile_step}
    finally:
        sys.path.remove(str(BENCH))


def quiet(*args, **kwargs):
    pass


def load(path):
    data = json.loads(pathlib.Path(path).read_text())
    for key in ("script", "machine", "versions", "threads", "load_average", "config"):
        assert key in data, key
    assert {"platform", "cpu_model", "cores"} <= set(data["machine"])
    assert {"numpy", "numba", "torch"} <= set(data["versions"])
    assert {"start", "end"} <= set(data["load_average"])
    return data


def test_bench_train_without_torch(scripts, tmp_path):
    out = tmp_path / "train.json"
    report = scripts["bench_train"].main(
        ["--quick", "--rounds", "1", "--warmup", "1", "--block-seconds", "0.005", "--no-torch", "--no-gpu",
         "--threads", "1", "--models", "mlp,conv", "--batches", "8", "--json", str(out)], log=quiet)
    data = load(out)
    assert data["torch"]["available"] is False and "--no-torch" in data["torch"]["reason"]
    assert data["cupy"]["available"] is False
    assert [(r["model"], r["batch"]) for r in data["results"]] == [("mlp", 8), ("conv", 8)]
    for r in data["results"]:
        assert {"scratchvae_s", "floor_s", "floor_needed_s", "floor_multiple", "scratchvae_images_per_s"} <= set(r["median"])
        assert len(r["per_round"]["scratchvae_s"]) == 1 and len(r["per_round"]["load"]) == 1
        assert "speedup_vs_torch" not in r["median"]
    # each side ran in a worker process of its own, warmed up by training; the scratchvae and NumPy-floor
    # workers never imported torch
    import os
    for r in data["results"]:
        ready = r["worker_ready"]
        pids = {w["pid"] for w in ready.values()}
        assert set(ready) == {"scratchvae", "floor"} and len(pids) == 2 and os.getpid() not in pids
        assert not any(w["torch_imported"] for w in ready.values())
        assert r["warmup_steps"] == 1
    # 5 Dense layers x 3 products for the MLP
    assert data["results"][0]["floor_products"] == 15
    assert report["json_path"] == str(out)


def test_matmul_floor_shapes_match_the_step(scripts):
    """The floor's product list has the FLOPs of the step's Dense layers."""
    from scratchvae.models import mlp_vae
    bt = scripts["bench_train"]
    products = bt.matmul_products(mlp_vae(), 4)
    flops = sum(2 * (a[1] if not ta else a[0]) * (a[0] if not ta else a[1]) * (b[1] if not tb else b[0])
                for a, b, ta, tb, *_ in products)
    dense = [(784, 400), (400, 20), (400, 20), (20, 400), (400, 784)]
    assert flops == sum(3 * 2 * 4 * i * o for i, o in dense)
    assert sum(1 for p in products if p[4] == "input_grad" and p[5]) == 1   # the first layer's unused dx


def test_matmul_floor_of_the_gated_models(scripts):
    """GatedDense has two products per Dense product; the encoder sees B + K rows under the VampPrior (and
    needs its first layer's input gradient, for the pseudo-inputs), the decoder B * S rows under the IWAE."""
    bt = scripts["bench_train"]

    def flops(products):
        return sum(2 * (a[1] if not ta else a[0]) * (a[0] if not ta else a[1]) * (b[1] if not tb else b[0])
                   for a, b, ta, tb, *_ in products)
    gated = [(784, 300), (300, 300)]
    heads = [(300, 40), (300, 40)]
    dec = [(40, 300), (300, 300)]
    out = (300, 784)
    B, K, S = 4, 500, 5
    per_rows = {"enc": 3 * 2 * sum(2 * i * o for i, o in gated) + 3 * 2 * sum(i * o for i, o in heads),
                "dec": 3 * 2 * sum(2 * i * o for i, o in dec) + 3 * 2 * out[0] * out[1]}
    vamp = bt.matmul_products(bt.build_model("vampprior", None, 0), B)
    iwae = bt.matmul_products(bt.build_model("iwae", None, 0), B)
    assert flops(vamp) == (B + K) * per_rows["enc"] + B * per_rows["dec"]
    assert flops(iwae) == B * per_rows["enc"] + B * S * per_rows["dec"]
    assert not any(p[5] for p in vamp) and sum(1 for p in iwae if p[4] == "input_grad" and p[5]) == 2
    # the two-level HVAE: q(z2|x) on B + K rows; q(z1|x, z2)'s x-branch on B rows (its data input needs no dx),
    # its z-branch, joint layer and heads, p(z1|z2) and the decoder on B rows
    hvae = bt.matmul_products(bt.build_model("hvae", None, 0), B)
    z_rows = (3 * 2 * (2 * 40 * 300) + 3 * 2 * (2 * 600 * 300) + 3 * 2 * sum(i * o for i, o in heads)   # q(z1|.)
              + 3 * 2 * sum(2 * i * o for i, o in dec) + 3 * 2 * sum(i * o for i, o in heads)           # p(z1|z2)
              + 3 * 2 * 2 * (2 * 40 * 300) + 3 * 2 * (2 * 600 * 300) + 3 * 2 * out[0] * out[1])         # p(x|z1,z2)
    assert flops(hvae) == (B + K) * per_rows["enc"] + B * 3 * 2 * (2 * 784 * 300) + B * z_rows
    assert sum(1 for p in hvae if p[4] == "input_grad" and p[5]) == 2     # the x-branch's two products


def test_bench_kernels(scripts, tmp_path):
    out = tmp_path / "kernels.json"
    scripts["bench_kernels"].main(["--quick", "--rounds", "1", "--block-seconds", "0.002", "--threads", "1",
                                   "--cases", "bce,reparameterize_kl (128,20),adam_update", "--json", str(out)],
                                  log=quiet)
    data = load(out)
    names = [r["case"] for r in data["results"]]
    assert any(n.startswith("bce_with_logits") for n in names) and "adam_update 784x400" in names
    for r in data["results"]:
        assert {"plain_s", "fused_s", "speedup"} <= set(r["median"])
        assert len(r["per_round"]["speedup"]) == 1


def test_compare_torch_without_torch(scripts, tmp_path):
    out = tmp_path / "compare.json"
    scripts["compare_torch"].main(["--epochs", "1", "--limit", "256", "--test-limit", "100", "--hidden", "32",
                                   "--no-torch", "--json", str(out)], log=quiet)
    data = load(out)
    assert [e["epoch"] for e in data["epochs"]] == [0, 1]
    assert data["epochs"][1]["scratchvae_test_nelbo"] < data["epochs"][0]["scratchvae_test_nelbo"]
    assert data["final"]["torch_test_nelbo"] is None


def test_profile_step(scripts, tmp_path):
    out = tmp_path / "profile.json"
    scripts["profile_step"].main(["--quick", "--rounds", "1", "--warmup", "1", "--block-seconds", "0.005",
                                  "--threads", "1", "--configs", "mlp:8,conv:4,vampprior:4,iwae:4", "--json", str(out)],
                                 log=quiet)
    data = load(out)
    assert [(r["model"], r["batch"]) for r in data["results"]] == [("mlp", 8), ("conv", 4), ("vampprior", 4),
                                                                    ("iwae", 4)]
    mlp, conv, vamp, iwae = data["results"]
    assert vamp["pseudo_inputs_pass"]["rows"] == {"batch": 4, "batch + pseudo-inputs": 504}
    assert {"encoder (B + K rows)", "decoder (B * S rows)", "prior density"} <= set(vamp["median"]["categories_s"])
    assert "pseudo_inputs_pass" not in iwae and "objective" in iwae["median"]["categories_s"]
    assert "matmul: Dense" in mlp["median"]["categories_s"]
    assert {"matmul: conv", "im2col", "col2im"} <= set(conv["median"]["categories_s"])
    assert "matrix products" in mlp["median"]["groups_percent"]
    # the wrappers are removed again
    import numpy

    from scratchvae.layers import dense
    assert not hasattr(numpy.matmul, "__wrapped__") and not hasattr(dense.affine_forward, "__wrapped__")


def test_torch_twin_is_the_same_model(scripts):
    """Optional (PyTorch installed): the twin reproduces scratchvae's loss and gradients in float64."""
    torch = pytest.importorskip("torch")
    import numpy as np
    bt = scripts["bench_train"]
    rng = np.random.default_rng(0)
    for kind in ("mlp", "conv", "vampprior", "iwae", "hvae"):
        model = bt.build_model(kind, None, 0)
        net = scripts["bench_train"].C.torch_twin(torch, model)
        shape = model.noise_shape(6)

        class Tiny:
            x = [(rng.random((6, 784)) < 0.5).astype(np.float32)]
            eps = [rng.standard_normal(shape, dtype=np.float32)]
        check = bt.check_equivalence(torch, kind, 0, model, net, Tiny)
        assert check["ok"], check
        assert kind != "vampprior" or check["float64"]["worst_param"] is not None


def test_authors_reference_is_the_authors_model():
    """Optional (PyTorch, and a clone of jmtomczak/vae_vampprior named by VAE_VAMPPRIOR_REPO): the authors'
    HVAE_2level module and scratchvae's hierarchical_vae give the same loss and gradients in float64."""
    import os
    pytest.importorskip("torch")
    repo = os.environ.get("VAE_VAMPPRIOR_REPO")
    if not repo:
        pytest.skip("VAE_VAMPPRIOR_REPO does not name a clone of jmtomczak/vae_vampprior")
    proc = subprocess.run([sys.executable, str(BENCH / "authors_reference.py"), "--authors-repo", repo, "--check"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "55 of 55 gradients" in proc.stdout


def test_authors_reference_without_the_clone_is_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "authors_reference.py"), "--authors-repo", str(tmp_path),
                           "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"error: --authors-repo {tmp_path}: no models/HVAE_2level.py there" in proc.stderr


def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    import shutil
    import subprocess
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi: gpu_check.sh would run the real check")
    run = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no NVIDIA GPU" in run.stdout
    assert "no NVIDIA GPU" in (tmp_path / "out" / "log.txt").read_text()


def _run_script(name, *args, tmp_path):
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


def test_bench_layers_smallest(tmp_path):
    data, stdout = _run_script("bench_layers", "--batch", "4", "--reps", "2", "--rounds", "1", "--settle", "0",
                               "--threads", "1", tmp_path=tmp_path)
    names = [row["layer"] for row in data["layers"]]
    assert names[0] == "enc.1 Conv2d 1->32" and names[-1] == "dec.7 ConvTranspose2d 32->1"
    assert all(row["scratchvae_ms"] > 0 for row in data["layers"])
    assert all((row["floor_ms"] is None) == ("ReLU" in row["layer"]) for row in data["layers"])
    assert "all layers" in stdout


def test_bench_run_smallest(tmp_path):
    data, stdout = _run_script("bench_run", "--epochs", "1", "--limit", "256", "--rounds", "1", "--settle", "0",
                               "--threads", "1", tmp_path=tmp_path)
    assert len(data["runs"]["scratchvae"]) == 1 and len(data["runs"]["scratchvae"][0]["seconds"]) == 1
    assert data["median_total_s"]["scratchvae"] > 0 and "whole run" in stdout
    assert data["median_process_s"]["scratchvae"] >= data["median_total_s"]["scratchvae"]


def test_bench_run_images_smallest(tmp_path):
    """The image run: a generated CelebA-layout folder, decoded, cached and trained on by the real command."""
    data, stdout = _run_script("bench_run", "--run", "celeba-conv", "--images", "20", "--epochs", "1", "--rounds", "1",
                               "--settle", "0", "--threads", "1", tmp_path=tmp_path)
    (run,) = data["runs"]["scratchvae"]
    assert data["run"] == "celeba-conv" and data["images"] == 20 and len(run["seconds"]) == 1
    assert run["process_s"] > run["seconds"][0] > 0 and math.isfinite(run["test_loss"])


@pytest.fixture()
def count_launches():
    sys.path.insert(0, str(BENCH))
    try:
        import count_launches
        count_launches.COUNTER.by_kind.clear()
        yield count_launches
    finally:
        sys.path.remove(str(BENCH))


def test_the_launch_counter_counts_what_cupy_would_launch(count_launches):
    xp, counter = count_launches.counting_module(), count_launches.COUNTER
    a = xp.zeros((4, 6), dtype="float32")                       # a fill: 1
    b = xp.empty((6, 3), dtype="float32")                       # allocation only: 0
    seen = []
    for op in (lambda: a @ b, lambda: a * 2 + 1, lambda: a.sum(axis=0), lambda: a.reshape(6, 4), lambda: a.T,
               lambda: a.T.reshape(-1), lambda: a[xp.asarray([0, 2])], lambda: a[1:3], lambda: a.astype("float64"),
               lambda: xp.copyto(a, 1.0), lambda: float(a.sum())):
        before = counter.total
        op()
        seen.append(counter.total - before)
    assert seen == [1, 2, 1, 0, 0, 1, 1, 0, 1, 1, 1]
    assert counter.by_kind["copy/fill"] == 1 + 3 and counter.by_kind["matmul"] == 1


def test_count_launches_of_a_training_step(count_launches):
    result = count_launches.count_step_launches(hidden=(16, 8), latent_dim=3, batch_size=16, test_limit=20)
    kinds, n_dense = result["by_kind"], 7                    # 784-16-8, two heads, 3-8-16-784
    assert sum(kinds.values()) == result["per_step"]
    assert kinds["matmul"] == 3 * n_dense - 1                 # forward, dW, dx (none for the data's layer)
    assert kinds["fused kernel"] == 3 + 1                     # loss, reparameterize + backward, one Adam
    assert kinds["gather"] == 1                               # the batch, gathered on the device
    steps = result["steps"]
    assert steps.count(result["per_step"]) == len(steps) - 1  # every step alike but the one after the check,
    # which copies params, m and v (one flat copy each), and checks them finite: isfinite and all of each
    # flat buffer and one all of the three flags (the divergence check, read with the loss sums)
    assert result["check_step"] == result["per_step"] + 3 + 2 + 7


def test_cpu_label_names_the_core_generation_and_vector_width():
    sys.path.insert(0, str(BENCH))
    import _common as C
    amd = {"vendor": "AuthenticAMD", "family": "25", "model": "1"}
    assert C.cpu_label("AMD EPYC", ["avx2", "fma"], amd) == "AMD EPYC Zen 3 (AVX2)"
    assert C.cpu_label("AMD EPYC", ["avx2", "avx512f"], amd) == "AMD EPYC Zen 4 (AVX-512)"
    assert C.cpu_label("AMD EPYC 9R14 Zen 4", ["avx512f"], amd) == "AMD EPYC 9R14 Zen 4 (AVX-512)"
    assert C.cpu_label("Intel(R) Xeon(R) Processor", ["avx2", "avx512f", "amx_tile"],
                       {"vendor": "GenuineIntel", "family": "6"}) == "Intel(R) Xeon(R) Processor (AVX-512, AMX)"
    info = C.machine_info()
    assert info["cpu"].endswith(")") and info["cpu_model"] in info["cpu"]
