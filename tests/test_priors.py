"""The VampPrior and the importance-weighted objective: densities, hand-derived gradients in float64
against central finite differences, the whole loss of every combination, and the command line."""
import json
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from scratchvae import gradcheck
from scratchvae.cli import main
from scratchvae.models import gated_vae, mlp_vae
from scratchvae.objectives import ELBO, IWAE
from scratchvae.priors import StandardNormal, VampPrior

TOL = 1e-6


def brute_log_prob(z, mu_k, log_sigma_k):
    """log (1/K) sum_k N(z; mu_k, diag exp(2 log_sigma_k)) with an (N, K, L) array, in float64."""
    d = (z[:, None, :] - mu_k[None]) / np.exp(log_sigma_k)[None]
    log_n = (-0.5 * d * d - log_sigma_k[None] - 0.5 * math.log(2 * math.pi)).sum(axis=2)
    m = log_n.max(axis=1)
    return m + np.log(np.exp(log_n - m[:, None]).sum(axis=1)) - math.log(mu_k.shape[0])


def vamp(K, D=6, seed=0):
    return VampPrior(K, D, dtype="float64", rng=seed)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(1, 5), l=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_vampprior_density_and_its_gradients(n, k, l, seed):
    rng = np.random.default_rng(seed)
    z, mu_k, log_sigma_k = rng.standard_normal((n, l)), rng.standard_normal((k, l)), 0.5 * rng.standard_normal((k, l))
    prior = vamp(k, seed=seed)
    np.testing.assert_allclose(prior.log_prob(z, (mu_k, log_sigma_k)), brute_log_prob(z, mu_k, log_sigma_k),
                               rtol=1e-12, atol=1e-12)
    a = rng.standard_normal(n)                                    # a random upstream gradient
    dz, (dmu, dls) = prior.log_prob_backward(z, (mu_k, log_sigma_k), a)
    arrays = {"z": z, "mu_k": mu_k, "log_sigma_k": log_sigma_k}
    report = gradcheck.check_scalar(lambda: a * prior.log_prob(z, (mu_k, log_sigma_k)), arrays,   # the terms
                                    {"z": dz, "mu_k": dmu, "log_sigma_k": dls})
    assert report.max_error <= TOL, str(report)


def test_vampprior_far_from_every_component_is_exact():
    """z 40 units from three identical components of sigma e^-3: every exp(log N_k) underflows to 0, yet the
    mixture is one Gaussian, whose density and gradients are known in closed form (each component takes a
    third of the component gradients)."""
    prior = vamp(3)
    z = np.full((2, 2), 40.0)
    comps = (np.zeros((3, 2)), np.full((3, 2), -3.0))
    iv = math.exp(6.0)                                           # 1 / sigma^2
    log_n = 2 * (-0.5 * 40.0 ** 2 * iv + 3.0 - 0.5 * math.log(2 * math.pi))   # about -4.8e6 nats
    np.testing.assert_allclose(prior.log_prob(z, comps), [log_n, log_n], rtol=1e-14)
    a = np.array([1.0, -0.5])
    dz, (dmu, dls) = prior.log_prob_backward(z, comps, a)
    np.testing.assert_allclose(dz, a[:, None] * (0.0 - 40.0) * iv * np.ones((2, 2)), rtol=1e-14)
    np.testing.assert_allclose(dmu, np.full((3, 2), a.sum() / 3 * 40.0 * iv), rtol=1e-14)
    np.testing.assert_allclose(dls, np.full((3, 2), a.sum() / 3 * (40.0 ** 2 * iv - 1)), rtol=1e-14)


def test_one_pseudo_input_mapped_to_zero_and_one_is_the_standard_normal():
    model = mlp_vae(input_dim=6, hidden=(5,), latent_dim=3, dtype="float64", fused=False, prior="vampprior",
                    pseudo_inputs=1)
    for head in ("mu", "log_sigma"):                              # the encoder maps u_1 to mu = 0, log_sigma = 0
        for name in ("W", "b"):
            model.params[f"{head}.{name}"][...] = 0
    z = np.random.default_rng(1).standard_normal((7, 3))
    np.testing.assert_allclose(model.prior.log_prob(z, model.prior_components()),
                               StandardNormal().log_prob(z), rtol=1e-14, atol=0)


def test_pseudo_inputs_stay_in_zero_one_and_get_no_gradient_outside():
    prior = vamp(2, D=3)
    prior.params["pseudo"][...] = [[-0.5, 0.3, 1.5], [0.2, 0.9, 0.4]]
    np.testing.assert_array_equal(prior.pseudo_inputs(), [[0.0, 0.3, 1.0], [0.2, 0.9, 0.4]])
    prior.encoder_inputs_backward(np.ones((2, 3)))
    np.testing.assert_array_equal(prior.grads["pseudo"], [[0, 1, 0], [1, 1, 1]])


def test_prior_component_usage_counts_what_the_responsibilities_say():
    from scratchvae import analysis
    model = mlp_vae(input_dim=6, hidden=(5,), latent_dim=3, dtype="float64", fused=False, prior="vampprior",
                    pseudo_inputs=4, seed=3)
    x = (np.random.default_rng(2).random((9, 6)) < 0.5).astype(np.float64)
    model.prior.params["pseudo"][0, :2] = [-0.2, 1.3]               # two pixels clamped: one at 0, one at 1
    usage = analysis.prior_component_usage(model, x, np.random.default_rng(5), batch=4)   # three batches
    # the reference: the same draws, each component's Gaussian density written out, normalized over k
    mu, log_sigma = model.encode(x)
    z = mu + np.exp(log_sigma) * np.concatenate([g.standard_normal((len(b), 3)) for g in [np.random.default_rng(5)]
                                                 for b in np.array_split(np.arange(9), [4, 8])])
    mu_k, log_sigma_k = model.encode(model.prior.pseudo_inputs())
    dens = np.exp(-0.5 * (((z[:, None, :] - mu_k) / np.exp(log_sigma_k)) ** 2).sum(2) - log_sigma_k.sum(1))
    r = dens / dens.sum(1, keepdims=True)                               # (N, K)
    share = r.sum(0) / 9
    assert usage["components"] == 4 and usage["images"] == 9
    assert usage["effective_components"] == pytest.approx(np.exp(-(share * np.log(share)).sum()), rel=1e-12)
    assert usage["components_explaining_one_image_or_more"] == int((r.sum(0) >= 1).sum())
    assert usage["components_most_responsible_for_some_image"] == len(set(r.argmax(1)))
    assert usage["mean_largest_responsibility"] == pytest.approx(r.max(1).mean(), rel=1e-12)
    assert usage["pseudo_pixels_at_0"] == pytest.approx(1 / 24) and usage["pseudo_pixels_at_1"] == pytest.approx(1 / 24)
    # identical pseudo-inputs: identical components, every image split evenly over the K
    model.prior.params["pseudo"][...] = 0.5
    even = analysis.prior_component_usage(model, x, np.random.default_rng(5))
    assert even["effective_components"] == pytest.approx(4, rel=1e-12)
    assert even["mean_largest_responsibility"] == pytest.approx(0.25, rel=1e-12)
    assert analysis.prior_component_usage(mlp_vae(input_dim=6, hidden=(5,), latent_dim=3), x, None) is None


# -- the objectives ------------------------------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 4), s=st.integers(2, 6), seed=st.integers(0, 2**16))
@example(b=3, s=6, seed=496).via("a draw whose weighted sum cancels to 1e-2 of its terms")
@example(b=4, s=3, seed=55496).via("a draw whose weighted sum cancels to 1e-2 of its terms")
def test_iwae_reduce_gradient_is_the_softmax_weights(b, s, seed):
    rng = np.random.default_rng(seed)
    c, r = 50 * rng.standard_normal((b, s)), rng.standard_normal(b)
    loss, v = IWAE(s).reduce(c, np)
    np.testing.assert_allclose(loss, -np.log(np.exp(-(c - c.min(axis=1, keepdims=True))).mean(axis=1))
                               + c.min(axis=1), rtol=1e-12)
    report = gradcheck.check_scalar(lambda: r * IWAE(s).reduce(c, np)[0], {"c": c},   # the terms of the sum
                                    {"c": r[:, None] * v})
    assert report.max_error <= TOL and np.allclose(v.sum(axis=1), 1.0)


def test_the_iwae_formula_with_one_sample_is_the_elbo_bit_for_bit():
    c = np.random.default_rng(0).standard_normal((5, 1)) * 100
    one = IWAE.__new__(IWAE)
    one.samples = 1                                             # refused by the constructor, allowed here
    assert np.array_equal(one.reduce(c, np)[0], ELBO().reduce(c, np)[0])
    for prior in ("standard", "vampprior"):                     # and the whole loss, through the model
        kw = dict(input_dim=7, hidden=(6,), latent_dim=3, dtype="float64", seed=3, fused=False, prior=prior,
                  pseudo_inputs=4)
        iwae1 = mlp_vae(**kw)
        iwae1.objective = one
        x = (np.random.default_rng(1).random((5, 7)) < 0.4).astype(np.float64)
        eps = np.random.default_rng(2).standard_normal((5, 3))
        # the ELBO written out from the model's parts: -log p(x|z) + KL, the KL analytic for the standard
        # prior, else log q(z|x) - log p(z) at z = mu + sigma eps (log p by brute force)
        mu, log_sigma = iwae1.encode(x)
        z = mu + np.exp(log_sigma) * eps
        p = 1 / (1 + np.exp(-iwae1.decoder.forward(z)))
        nll = -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(axis=1)
        if prior == "standard":
            kl = (0.5 * (mu ** 2 + np.exp(2 * log_sigma) - 1) - log_sigma).sum(axis=1)
        else:
            log_q = (-0.5 * eps ** 2 - log_sigma - 0.5 * math.log(2 * math.pi)).sum(axis=1)
            kl = log_q - brute_log_prob(z, *iwae1.prior_components())
        assert iwae1.loss_and_grad(x, eps=eps)[0] == pytest.approx((nll + kl).mean(), rel=1e-12)
    with pytest.raises(ValueError, match="samples >= 2"):
        IWAE(1)


# -- the whole loss of every combination ---------------------------------------------------------------

def whole_loss_report(model, x, eps, beta):
    model.zero_grad()
    model.loss_and_grad(x, eps=eps, beta=beta)
    analytic = {k: g.copy() for k, g in model.grads.items()}
    return gradcheck.check_scalar(lambda: model.loss_and_grad(x, eps=eps, beta=beta)[0], model.params, analytic)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("prior, objective, samples", [("vampprior", "elbo", 1), ("standard", "iwae", 3),
                                                       ("vampprior", "iwae", 4)])
@pytest.mark.parametrize("arch", ["mlp", "gated"])
def test_whole_loss_gradcheck(arch, prior, objective, samples, likelihood, fused):
    build = mlp_vae if arch == "mlp" else gated_vae
    extra = {"activation": "tanh"} if arch == "mlp" else {}
    model = build(input_dim=7, hidden=(6, 5), latent_dim=3, likelihood=likelihood, dtype="float64", seed=3,
                  fused=fused, prior=prior, pseudo_inputs=4, objective=objective, samples=samples, **extra)
    if prior == "vampprior":   # pseudo-inputs inside (0, 1), away from the clamp's kinks
        model.params["prior.pseudo"][...] = 0.1 + 0.8 * np.random.default_rng(9).random((4, 7))
    x = (np.random.default_rng(0).random((5, 7)) < 0.4).astype(np.float64)
    if likelihood == "gaussian":
        x = 0.8 * x + 0.1 * np.random.default_rng(1).random(x.shape)
    eps = np.random.default_rng(2).standard_normal((5, 3) if samples == 1 else (5, samples, 3))
    report = whole_loss_report(model, x, eps, beta=0.6)       # beta < 1: a KL warm-up
    assert set(report.errors) == set(model.params)
    assert report.max_error <= TOL, str(report)


# -- the command line --------------------------------------------------------------------------------

TINY = ["--arch", "gated", "--hidden", "16,12", "--latent-dim", "3", "--limit", "200", "--test-limit", "40",
        "--batch-size", "50", "--iwae-k", "2"]


@pytest.mark.parametrize("option", [["--prior", "vampprior", "--pseudo-inputs", "10"],
                                    ["--objective", "iwae", "--samples", "5"]], ids=["vampprior", "iwae"])
def test_new_options_run_write_every_figure_and_resume_bit_identically(tmp_path, capsys, option):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main([*TINY, *option, "--epochs", "2", "--out", str(whole)]) == 0
    assert main([*TINY, *option, "--epochs", "1", "--no-figures", "--out", str(split)]) == 0
    assert main(["--resume", str(split), "--epochs", "2"]) == 0
    runs = [[json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()] for f in (whole, split)]
    keep = ("train_loss", "test_loss", "test_recon", "test_kl")
    assert [{k: h[k] for k in keep} for h in runs[0]] == [{k: h[k] for k in keep} for h in runs[1]]
    summary = json.loads((whole / "summary.json").read_text())
    key = option[0][2:]                                            # "prior" or "objective"
    assert math.isfinite(summary["test_nll_iwae"]) and summary["config"][key] == option[1]
    figures = {p.name for p in whole.glob("*.png")}
    assert {"samples.png", "reconstructions.png", "latent.png", "manifold.png", "interpolation.png",
            "curves.png"} <= figures
    assert ("pseudo_inputs.png" in figures) == (option[1] == "vampprior")
    capsys.readouterr()
    other = {"prior": "standard", "objective": "elbo"}[key]
    assert main(["--resume", str(whole), "--epochs", "3", f"--{key}", other]) == 1
    assert f"the run was trained with {key}={option[1]!r}" in capsys.readouterr().err


def test_normalize_grads_trains_resumes_bit_identically_and_stays_with_its_run(tmp_path, capsys):
    """--normalize-grads (the VampPrior code's AdamNormGrad) changes the training, is recorded, and a
    resume keeps it: a run trained without it refuses to continue with it."""
    vamp = [*TINY, "--prior", "vampprior", "--pseudo-inputs", "10", "--no-figures"]
    whole, split, plain = tmp_path / "whole", tmp_path / "split", tmp_path / "plain"
    assert main([*vamp, "--normalize-grads", "--epochs", "2", "--out", str(whole)]) == 0
    assert main([*vamp, "--normalize-grads", "--epochs", "1", "--out", str(split)]) == 0
    assert main(["--resume", str(split), "--epochs", "2"]) == 0
    assert main([*vamp, "--epochs", "2", "--out", str(plain)]) == 0
    runs = [[json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()] for f in (whole, split, plain)]
    keep = ("train_loss", "test_loss")
    assert [{k: h[k] for k in keep} for h in runs[0]] == [{k: h[k] for k in keep} for h in runs[1]]
    assert runs[0][-1]["train_loss"] != runs[2][-1]["train_loss"]
    assert json.loads((whole / "summary.json").read_text())["config"]["normalize_grads"] is True
    capsys.readouterr()
    assert main(["--resume", str(plain), "--epochs", "3", "--normalize-grads"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "normalize_grads=False" in err, err


@pytest.mark.parametrize("argv, needle", [
    (["--samples", "0"], "samples (--samples) must be a finite number >= 1"),
    (["--objective", "iwae", "--samples", "1"], "needs --samples S >= 2"),
    (["--samples", "3"], "the ELBO draws one latent per image"),
    (["--prior", "vampprior", "--pseudo-inputs", "0"], "pseudo_inputs (--pseudo-inputs) must be a finite number >= 1"),
    (["--pseudo-inputs", "10"], "add --prior vampprior"),
    (["--prior", "vampprior", "--model", "ae"], "a plain autoencoder"),
    (["--objective", "iwae", "--samples", "5", "--free-bits", "0.5"], "Drop --free-bits"),
    (["--prior", "vampprior", "--free-bits", "0.5"], "Drop --free-bits"),
    (["--prior", "vampprior", "--arch", "conv"], "built for --arch mlp and --arch gated"),
])
def test_bad_combinations_are_one_error_line(tmp_path, capsys, argv, needle):
    assert main([*argv, "--epochs", "1", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "run").exists()


def test_an_iwae_run_keeps_the_best_epoch_by_its_own_bound(tmp_path):
    """Early stopping follows the training objective: an IWAE run's validation loss is its S-sample bound."""
    from scratchvae.evaluation import iwae_test_nll
    from scratchvae.reload import load_trained

    run = tmp_path / "run"
    assert main([*TINY, "--objective", "iwae", "--samples", "5", "--keep-best", "--epochs", "1", "--no-figures",
                 "--out", str(run)]) == 0
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    model, data, cfg, meta, _ = load_trained(run, "best")
    assert meta["params_epoch"] == 1
    seed = cfg.seed * 1_000_003 + 500_000 + 1                      # the trainer's validation stream for epoch 1
    expected = iwae_test_nll(model, data.valid_dev, 5, model.backend.rng(seed), progress=False)
    assert record["valid_loss"] == expected
    assert record["valid_loss"] != model.evaluate(data.valid_dev, model.backend.rng(seed))["loss"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_negligible_sample_weights_and_responsibilities_are_exact_zeros(dtype):
    """A weight under eps**2 of the dtype becomes 0 (no subnormal numbers in the backward pass); the
    others are the softmax's, and a row still sums to 1 to rounding."""
    eps2 = np.finfo(dtype).eps ** 2
    c = np.array([[10.0, 10.5, 50.0], [3.0, 3.0, 3.0]], dtype=dtype)     # the third sample of row 0: e^-40
    loss, v = IWAE(3).reduce(c, np)
    expected = np.exp(-c[0] + c[0].min()) / np.exp(-c[0] + c[0].min()).sum()
    assert (v[0, 2] == 0) == (expected[2] < eps2) and (dtype == "float32") == (v[0, 2] == 0)
    np.testing.assert_allclose(v[0, :2], expected[:2], rtol=10 * np.finfo(dtype).eps)
    np.testing.assert_allclose(v.sum(axis=1), 1, rtol=10 * np.finfo(dtype).eps)
    prior = VampPrior(2, 4, dtype=dtype, rng=0)
    comps = (np.array([[0.0, 0.0], [12.0, 12.0]], dtype=dtype), np.zeros((2, 2), dtype=dtype))
    z = np.array([[0.1, -0.2]], dtype=dtype)                   # 144 nats closer to component 0
    _, (dmu, dlog_sigma) = prior.log_prob_backward(z, comps, np.ones(1, dtype=dtype))
    assert np.all(dmu[1] == 0) and np.all(dlog_sigma[1] == 0) and np.all(dmu[0] != 0)


def test_an_iwae_run_names_each_loss_column_for_the_bound_it_is(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--objective", "iwae", "--samples", "3", "--kl-warmup", "2", "--epochs", "1",
                 "--out", str(out)]) == 0
    console = capsys.readouterr().out
    assert "train -IWAE3 " in console and "test -ELBO " in console
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    labels = record["labels"]
    assert labels["train_loss"].startswith("negative IWAE bound (S=3") and "beta" in labels["train_loss"]
    assert labels["test_loss"].startswith("negative ELBO") and "not the IWAE loss" in labels["recon_kl"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"]["train_loss"] == labels["train_loss"]
    assert summary["figures"]["curves"]["labels"] == {"train_loss": labels["train_loss"],
                                                      "test_loss": labels["test_loss"]}
