"""The hierarchical VAE: every gradient of the whole loss in float64 against central finite differences (any
depth, gated and MLP, both priors, both objectives, beta < 1, fused and plain), the loss written once, the
conditional prior's density, top-down sampling, the IWAE bound, and the command line."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchvae import gradcheck
from scratchvae.cli import main
from scratchvae.models import gated_vae, hierarchical_vae

TOL = 1e-6


def small(levels=2, arch="gated", prior="standard", objective="elbo", samples=1, likelihood="bernoulli", fused=False,
          hidden=(6, 5), latent_dim=3, input_dim=7, seed=3):
    model = hierarchical_vae(input_dim=input_dim, hidden=hidden, latent_dim=latent_dim, levels=levels, arch=arch,
                             prior=prior, pseudo_inputs=4, objective=objective, samples=samples, likelihood=likelihood,
                             dtype="float64", seed=seed, fused=fused, activation="tanh")
    if prior == "vampprior":   # pseudo-inputs inside (0, 1), away from the clamp's kinks
        model.params["prior.pseudo"][...] = 0.1 + 0.8 * np.random.default_rng(9).random((4, input_dim))
    return model


def data(model, B, seed=0):
    x = (np.random.default_rng(seed).random((B, model.input_dim)) < 0.4).astype(np.float64)
    if model.likelihood == "gaussian":
        x = 0.8 * x + 0.1 * np.random.default_rng(seed + 1).random(x.shape)
    eps = np.random.default_rng(seed + 2).standard_normal(model.noise_shape(B))
    return x, eps


def whole_loss_report(model, x, eps, beta):
    model.zero_grad()
    model.loss_and_grad(x, eps=eps, beta=beta)
    analytic = {k: g.copy() for k, g in model.grads.items()}
    return gradcheck.check_scalar(lambda: model.loss_and_grad(x, eps=eps, beta=beta)[0], model.params, analytic)


# every prior and objective with both architectures; the likelihoods and the fused kernels alternate over them
COMBINATIONS = [(arch, prior, objective, samples, likelihood, fused)
                for i, (arch, (prior, objective, samples)) in enumerate(
                    (a, c) for a in ("gated", "mlp") for c in (("standard", "elbo", 1), ("vampprior", "elbo", 1),
                                                               ("standard", "iwae", 3), ("vampprior", "iwae", 2)))
                for likelihood, fused in [(("bernoulli", "gaussian")[i % 2], (False, True)[(i // 2) % 2])]]


@pytest.mark.parametrize("arch, prior, objective, samples, likelihood, fused", COMBINATIONS)
def test_whole_loss_gradcheck_of_two_levels(arch, prior, objective, samples, likelihood, fused):
    model = small(arch=arch, prior=prior, objective=objective, samples=samples, likelihood=likelihood, fused=fused,
                  hidden=(5, 4), input_dim=6)
    x, eps = data(model, 3)
    report = whole_loss_report(model, x, eps, beta=0.6)       # beta < 1: a KL warm-up
    assert set(report.errors) == set(model.params)
    assert report.max_error <= TOL, str(report)


@settings(max_examples=6, deadline=None)
@given(levels=st.integers(1, 3), B=st.integers(1, 3), samples=st.integers(1, 3), latent=st.integers(1, 3),
       widths=st.lists(st.integers(2, 4), min_size=1, max_size=2), vamp=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_whole_loss_gradcheck_of_drawn_shapes(levels, B, samples, latent, widths, vamp, seed):
    model = small(levels=levels, prior="vampprior" if vamp else "standard", samples=samples,
                  objective="iwae" if samples > 1 else "elbo", hidden=tuple(widths), latent_dim=latent, input_dim=4,
                  seed=seed)
    x, eps = data(model, B, seed)
    report = whole_loss_report(model, x, eps, beta=0.8)
    assert report.max_error <= TOL, str(report)


def test_a_denoising_hierarchy_gradchecks_and_trains(tmp_path, capsys):
    """x_in (the corrupted image every inference network reads) at two levels: the whole loss in float64."""
    model = small(prior="vampprior", objective="iwae", samples=2)
    x, eps = data(model, 3)
    x_in = x * (np.random.default_rng(4).random(x.shape) > 0.3)
    model.zero_grad()
    model.loss_and_grad(x, eps=eps, beta=0.7, x_in=x_in)
    analytic = {k: g.copy() for k, g in model.grads.items()}
    report = gradcheck.check_scalar(lambda: model.loss_and_grad(x, eps=eps, beta=0.7, x_in=x_in)[0], model.params,
                                    analytic)
    assert report.max_error <= TOL, str(report)
    clean = model.loss_and_grad(x, eps=eps, beta=0.7)[0]
    assert model.loss_and_grad(x, eps=eps, beta=0.7, x_in=x_in)[0] != clean   # the encoders do read x_in
    assert main(["--arch", "gated", "--hidden", "8", "--latent-dim", "2", "--levels", "2", "--input-noise", "0.2",
                 "--limit", "100", "--test-limit", "20", "--epochs", "1", "--no-figures",
                 "--out", str(tmp_path / "dn")]) == 0


def test_the_check_fails_on_a_wrong_conditional_prior_gradient(monkeypatch):
    """Break the gradient into z_2 from p(z_1 | z_2) on purpose: the whole-loss check goes red."""
    from scratchvae.vae import VAE
    model = small()
    x, eps = data(model, 4)
    real = VAE._p_backward
    monkeypatch.setattr(VAE, "_p_backward", lambda self, l, dm, dls: 1.01 * real(self, l, dm, dls))
    assert whole_loss_report(model, x, eps, beta=1.0).max_error > 1e-4


def test_the_loss_is_its_definition_written_out():
    """Two levels, the standard prior, one sample: the loss is -log p(x|z1,z2) + log q(z2|x) + log q(z1|x,z2)
    - log p(z2) - log p(z1|z2), computed here from the parts with plain formulas."""
    model = small()
    x, eps = data(model, 4)
    P = model.parts

    def normal(z, m, ls):
        return (-0.5 * ((z - m) / np.exp(ls)) ** 2 - ls - 0.5 * math.log(2 * math.pi)).sum(axis=1)

    mu2, ls2 = P["mu"].forward(P["encoder"].forward(x)), P["log_sigma"].forward(P["encoder"].forward(x))
    z2 = mu2 + np.exp(ls2) * eps[:, 0, 1]
    h1 = P["q1.joint"].forward(np.concatenate([P["q1.x"].forward(x), P["q1.z"].forward(z2)], axis=1))
    mu1, ls1 = P["q1.mu"].forward(h1), P["q1.log_sigma"].forward(h1)
    z1 = mu1 + np.exp(ls1) * eps[:, 0, 0]
    g = P["p1.net"].forward(z2)
    m1, s1 = P["p1.mu"].forward(g), P["p1.log_sigma"].forward(g)
    logits = P["decoder"].forward(np.concatenate([P["decoder.z1"].forward(z1), P["decoder.z2"].forward(z2)], axis=1))
    p = 1 / (1 + np.exp(-logits))
    nll = -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(axis=1)
    kl = normal(z2, mu2, ls2) + normal(z1, mu1, ls1) - normal(z2, 0, np.zeros_like(z2)) - normal(z1, m1, s1)
    assert model.loss_and_grad(x, eps=eps)[0] == pytest.approx((nll + kl).mean(), rel=1e-12)
    np.testing.assert_allclose(model.elbo(x, eps=eps), -(nll + kl), rtol=1e-12)


def test_every_log_sigma_is_clamped_and_gets_no_gradient_outside():
    model = small()
    for name in ("q1.log_sigma", "log_sigma", "p1.log_sigma"):
        model.params[f"{name}.0.b"][...] = 40.0          # far above the clamp's upper end, log sigma = 1
    x, eps = data(model, 3)
    model.zero_grad()
    model.loss_and_grad(x, eps=eps)
    for name in ("q1.log_sigma", "log_sigma", "p1.log_sigma"):
        assert np.all(model.grads[f"{name}.0.W"] == 0) and np.all(model.grads[f"{name}.0.b"] == 0), name
    assert model.evaluate(x, np.random.default_rng(0))["loss"] < 1e6


def test_equal_generators_give_equal_losses_and_the_model_draws_its_own_noise():
    model = hierarchical_vae(input_dim=7, hidden=(6,), latent_dim=3, levels=3, dtype="float64")
    x, _ = data(model, 5)
    a = model.loss_and_grad(x, rng=np.random.default_rng(4))[0]
    b = model.loss_and_grad(x, rng=np.random.default_rng(4))[0]
    c = model.loss_and_grad(x, rng=np.random.default_rng(5))[0]
    assert a == b != c and model.noise_shape(5) == (5, 1, 3, 3)


def test_the_gradient_accumulates():
    model = small(prior="vampprior", objective="iwae", samples=2, likelihood="gaussian")
    x, eps = data(model, 3)
    model.zero_grad()
    model.loss_and_grad(x, eps=eps)
    once = {k: g.copy() for k, g in model.grads.items()}
    model.loss_and_grad(x, eps=eps)
    for k, g in model.grads.items():
        np.testing.assert_allclose(g, 2 * once[k], rtol=1e-13, atol=0, err_msg=k)


def test_the_iwae_bound_with_one_sample_is_the_elbo_and_grows_with_k():
    model = small(prior="vampprior", latent_dim=2)
    x, _ = data(model, 3)
    eps = np.random.default_rng(3).standard_normal((3, 1, 2, 2))

    class Replay:            # hands iwae_bound the noise elbo gets
        def standard_normal(self, shape, dtype):
            return eps.transpose(1, 0, 2, 3).reshape(shape)
    np.testing.assert_allclose(model.iwae_bound(x, 1, Replay()), model.elbo(x, eps=eps), rtol=1e-12)
    rng = np.random.default_rng(0)
    elbo = np.mean([model.iwae_bound(x, 1, rng).mean() for _ in range(200)])   # E[one-sample bound] = the ELBO
    assert elbo < model.iwae_bound(x, 10, rng).mean() < model.iwae_bound(x, 2000, rng).mean()
    chunked = model.iwae_bound(x, 50, np.random.default_rng(7), max_elements=3 * model.input_dim * 7)
    np.testing.assert_allclose(chunked, model.iwae_bound(x, 50, np.random.default_rng(7)), rtol=1e-12)


@pytest.mark.parametrize("levels", [2, 3])
def test_evaluate_records_each_levels_activity_of_the_means_top_down(levels):
    """Per level, over several evaluation chunks: Var_x of the posterior means that encode_levels gives
    (the top level's from q(z_T | x), each level below from q(z_l | x, z_{l+1}) at the mean above)."""
    model = small(levels=levels, prior="vampprior")
    x, _ = data(model, 40)
    out = model.evaluate(x, np.random.default_rng(0), batch_size=16)
    want = [mu.var(axis=0) for mu in model.encode_levels(x)]
    assert len(out["activity"]) == len(out["active_units"]) == levels
    for got, ref in zip(out["activity"], want):
        np.testing.assert_allclose(got, ref, rtol=1e-12)
    assert out["active_units"] == [int((a > 0.01).sum()) for a in want]


def test_sampling_is_top_down_and_one_level_is_the_gated_vae():
    model = small(levels=2)
    assert model.sample(6, np.random.default_rng(0)).shape == (6, 7)
    assert model.reconstruct(data(model, 2)[0]).shape == (2, 7)

    # one level is the one-level gated VampPrior VAE, written as a stack: with its weights, the same loss
    kw = dict(input_dim=7, hidden=(6, 5), latent_dim=3, dtype="float64", prior="vampprior", pseudo_inputs=4)
    one, flat = hierarchical_vae(levels=1, seed=2, **kw), gated_vae(seed=5, **kw)
    assert one.num_params() == flat.num_params()

    def flat_name(name):
        head, _, rest = name.partition(".")
        if name.startswith("decoder.z1.0."):
            return "decoder.0." + name[len("decoder.z1.0."):]
        if head == "decoder" and rest[0].isdigit():
            return f"decoder.{int(rest[0]) + 1}{rest[1:]}"
        return name
    for name, p in one.params.items():
        p[...] = flat.params[flat_name(name)]
    x, eps = data(one, 4)
    loss_one = one.loss_and_grad(x, eps=eps)[0]
    assert loss_one == pytest.approx(flat.loss_and_grad(x, eps=eps)[0], rel=1e-13)


@pytest.mark.parametrize("argv, needle", [
    (["--levels", "0"], "levels (--levels) must be a finite number >= 1"),
    (["--levels", "2", "--arch", "conv"], "the hierarchy is built for --arch gated and --arch mlp"),
    (["--levels", "2", "--model", "ae"], "a plain autoencoder (--model ae) has no stochastic levels"),
    (["--levels", "2", "--free-bits", "0.5"], "free_bits (--free-bits) is for one-level models"),
    (["--valid-k", "5"], "add it, or drop --valid-k"),
])
def test_bad_levels_are_one_error_line(tmp_path, capsys, argv, needle):
    assert main([*argv, "--epochs", "1", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


def test_two_levels_train_resume_bit_identically_and_record_their_levels(tmp_path, capsys):
    tiny = ["--arch", "gated", "--hidden", "12,10", "--latent-dim", "3", "--levels", "2", "--prior", "vampprior",
            "--pseudo-inputs", "6", "--limit", "200", "--test-limit", "40", "--batch-size", "50", "--keep-best",
            "--valid-k", "2", "--iwae-k", "2"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main([*tiny, "--epochs", "2", "--out", str(whole)]) == 0
    assert main([*tiny, "--epochs", "1", "--no-figures", "--out", str(split)]) == 0
    assert main(["--resume", str(split), "--epochs", "2"]) == 0
    runs = [[json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()] for f in (whole, split)]
    keep = ("train_loss", "valid_loss", "test_loss", "active_units", "latent_activity")
    assert [{k: h[k] for k in keep} for h in runs[0]] == [{k: h[k] for k in keep} for h in runs[1]]
    assert isinstance(runs[0][-1]["active_units"], list) and len(runs[0][-1]["active_units"]) == 2
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["config"]["levels"] == 2 and len(summary["active_units"]) == 2
    assert math.isfinite(summary["test_nll_iwae"])
    out = capsys.readouterr().out
    assert "per level" in out
    assert main(["--resume", str(whole), "--epochs", "3", "--levels", "1"]) == 1
    assert "the run was trained with levels=2" in capsys.readouterr().err


def test_the_figures_of_a_hierarchy_show_every_level(tmp_path):
    from scratchvae import figures
    model = small(levels=2, latent_dim=3, input_dim=16)
    x = (np.random.default_rng(0).random((20, 16)) < 0.4).astype(np.float64)
    history = [{"epoch": e, "train_loss": 9.0 - e, "test_loss": 10.0 - e, "test_recon": 8.0, "test_kl": 2.0,
                "kl_per_dim": None, "active_units": [3, e], "latent_activity": [[0.5, 0.2, 0.1], [0.3, 1e-4, 1e-5]]}
               for e in (1, 2)]
    out = figures.save_all(model, tmp_path, x.reshape(20, 1, 4, 4), np.random.default_rng(1), history=history)
    assert out["posterior"]["active_units"] == [3, 1] and out["posterior"]["collapsed"] == [[], [1, 2]]
    for name in ("samples", "posterior", "reconstructions", "latent", "manifold", "interpolation"):
        assert (tmp_path / f"{name}.png").exists(), name


def test_draw_figures_of_a_run_trained_without_them(tmp_path, capsys):
    from test_runs import load_script
    run = tmp_path / "run"
    assert main(["--arch", "gated", "--hidden", "12,10", "--latent-dim", "3", "--levels", "2", "--prior", "vampprior",
                 "--pseudo-inputs", "6", "--limit", "200", "--test-limit", "40", "--batch-size", "50", "--epochs", "1",
                 "--no-figures", "--out", str(run)]) == 0
    before = sorted(p.name for p in run.iterdir())
    assert load_script("draw_figures").main([str(run)]) == 0
    assert sorted(p.name for p in run.iterdir()) == sorted([*before, "figures"])     # the run's files untouched
    drawn = {p.name for p in (run / "figures").iterdir()}
    assert {"samples.png", "posterior.png", "pseudo_inputs.png", "curves.png", "figures.json"} <= drawn
    summary = json.loads((run / "figures" / "figures.json").read_text())
    assert len(summary["figures"]["posterior"]["active_units"]) == 2
    usage = summary["prior_component_usage"]        # how the test split uses the VampPrior's 6 components
    assert usage["components"] == 6 and usage["images"] == 40 and 1 <= usage["effective_components"] <= 6


def test_he_init_is_a_run_defining_flag_of_the_mlp_shaped_models(tmp_path, capsys):
    tiny = ["--arch", "gated", "--hidden", "8", "--latent-dim", "2", "--levels", "2", "--limit", "100",
            "--test-limit", "20", "--no-figures"]
    assert main([*tiny, "--init", "he", "--epochs", "1", "--out", str(tmp_path / "he")]) == 0
    summary = json.loads((tmp_path / "he" / "summary.json").read_text())
    assert summary["config"]["init"] == "he"
    capsys.readouterr()
    assert main([*tiny, "--init", "uniform", "--epochs", "2", "--resume", str(tmp_path / "he")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "init" in err, err
    assert main(["--arch", "conv", "--init", "he", "--epochs", "1", "--out", str(tmp_path / "conv")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "init (--init) 'he' is for the Dense and GatedDense layers" in err, err
    he = hierarchical_vae(init="he", seed=1)
    assert abs(float(he.params["q1.joint.0.W"].std()) / math.sqrt(2 / 600) - 1) < 0.02


def test_a_checkpoint_with_the_first_top_level_names_loads():
    """A hierarchy's top level was first saved as q{T}.x, q{T}.mu, q{T}.log_sigma; such files still load."""
    from scratchvae import checkpoint
    from scratchvae.optim import Adam
    model, fresh = small(levels=3, seed=1), small(levels=3, seed=2)
    be = model.backend
    state = Adam().init(model.params)
    arrays = checkpoint.run_arrays(model, state, be)
    old = {}
    for key, a in arrays.items():
        prefix, name = key.split("/", 1)
        for now, was in (("encoder.", "q3.x."), ("mu.", "q3.mu."), ("log_sigma.", "q3.log_sigma.")):
            if name.startswith(now):
                name = was + name[len(now):]
        old[f"{prefix}/{name}"] = a
    assert "param/q3.x.0.W" in old and "param/encoder.0.W" not in old
    fresh_state = Adam().init(fresh.params)
    checkpoint.restore("old.npz", old, fresh, fresh_state, be)
    for name in model.params:
        np.testing.assert_array_equal(fresh.params[name], model.params[name])
    x, eps = data(model, 2)
    assert fresh.loss_and_grad(x, eps=eps)[0] == model.loss_and_grad(x, eps=eps)[0]
