"""The whole VAE: every parameter gradient-checked in float64 with fixed
noise, the IWAE bound against numerical integration, and the model's errors."""
import math

import numpy as np
import pytest

from scratchvae import gradcheck
from scratchvae.layers.base import walk
from scratchvae.model_base import NonFiniteLoss
from scratchvae.models import conv_autoencoder, conv_vae, mlp_autoencoder, mlp_vae

TOL = 1e-6
FUSED = [pytest.param(False, id="plain"), pytest.param(True, id="fused")]


def binary_batch(n, d, seed):
    return (np.random.default_rng(seed).random((n, d)) < 0.4).astype(np.float64)


def check_model(model, x, eps, beta=1.0, free_bits=0.0):
    """Gradient check of loss_and_grad for every parameter; returns the report."""
    model.zero_grad()
    model.loss_and_grad(x, eps=eps, beta=beta, free_bits=free_bits)
    analytic = {k: g.copy() for k, g in model.grads.items()}

    def loss():
        return model.loss_and_grad(x, eps=eps, beta=beta, free_bits=free_bits)[0]

    return gradcheck.check_scalar(loss, model.params, analytic)


def small_mlp(likelihood="bernoulli", activation="tanh", fused=False, **kw):
    return mlp_vae(input_dim=7, hidden=(6, 5), latent_dim=3, activation=activation, likelihood=likelihood,
                   dtype="float64", seed=3, fused=fused, **kw)


def small_conv(likelihood="bernoulli", fused=False):
    return conv_vae(input_shape=(1, 7, 6), channels=(2, 3), latent_dim=2, hidden=4, likelihood=likelihood,
                    activation="tanh", dtype="float64", seed=4, fused=fused)


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("beta", [1.0, 0.37])
def test_mlp_vae_gradcheck(likelihood, beta, fused):
    model = small_mlp(likelihood, fused=fused)
    x = binary_batch(5, 7, 0)
    if likelihood == "gaussian":
        x = x * 0.8 + 0.1 * np.random.default_rng(1).random(x.shape)
    eps = np.random.default_rng(2).standard_normal((5, 3))
    report = check_model(model, x, eps, beta=beta)
    assert set(report.errors) == set(model.params)
    assert report.max_error <= TOL, str(report)


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_conv_vae_gradcheck(likelihood, fused):
    model = small_conv(likelihood, fused=fused)
    x = binary_batch(3, 42, 5)
    eps = np.random.default_rng(6).standard_normal((3, 2))
    report = check_model(model, x, eps, beta=1.3)
    assert report.max_error <= TOL, str(report)


@pytest.mark.parametrize("fused", FUSED)
def test_no_transposing_copy_between_the_dense_layers_and_the_conv_stacks(fused):
    """FromCHWB hands the encoder's Dense a view, the decoder's last Dense writes batch-fastest so
    that ToCHWB reshapes without a copy, and the gradients come back through views the same way."""
    from scratchvae.layers import FromCHWB, ToCHWB
    from scratchvae.models import conv_vae
    model = conv_vae((1, 12, 12), channels=(3, 4), latent_dim=2, hidden=8, seed=0, fused=fused)
    rng = np.random.default_rng(0)
    for part, entry in ((model.encoder, FromCHWB), (model.decoder, ToCHWB)):
        x = (rng.random((5, 144)) < 0.5).astype(np.float32) if part is model.encoder else \
            rng.standard_normal((5, 2)).astype(np.float32)
        outputs = [x]
        for layer in part.layers:
            outputs.append(layer.forward(outputs[-1]))
        i = next(i for i, layer in enumerate(part.layers) if isinstance(layer, entry))
        assert np.shares_memory(outputs[i + 1], outputs[i]), (part.layers[i - 1], part.layers[i])
        grads = [rng.standard_normal(outputs[-1].shape).astype(np.float32)]
        for layer in reversed(part.layers[i:]):
            grads.append(layer.backward(grads[-1]))
        dy_out = grads[-1]                       # the gradient ToCHWB / FromCHWB hands back
        dy_in = grads[-2]
        assert np.shares_memory(dy_out, dy_in), part.layers[i]


def test_whole_model_check_catches_a_slightly_wrong_gradient():
    model = small_mlp()
    x, eps = binary_batch(5, 7, 0), np.random.default_rng(2).standard_normal((5, 3))
    model.zero_grad()
    model.loss_and_grad(x, eps=eps)
    analytic = {k: g.copy() for k, g in model.grads.items()}
    analytic["log_sigma.b"][1] *= 1 + 1e-4       # a 0.01% error in one entry

    def loss():
        return model.loss_and_grad(x, eps=eps)[0]

    report = gradcheck.check_scalar(loss, model.params, analytic)
    assert report.errors["log_sigma.b"] > 1e-6 and report.errors["mu.b"] <= TOL


def kink_sides(model):
    """Which side of its kink every ReLU input and every max-pooling window is on, after a forward pass:
    a tuple of boolean arrays (the ReLU's x > 0; the inputs each pooling window picked)."""
    from scratchvae.layers import MaxPool2d, ReLU
    from scratchvae.layers.base import walk
    from scratchvae.layers.pooling import maxpool2d_backward
    sides = []
    for part in model.parts.values():
        for layer in walk(part):
            if isinstance(layer, ReLU):
                sides.append(np.asarray(layer._cache[0]) > 0)
            elif isinstance(layer, MaxPool2d):
                picked = maxpool2d_backward(np.ones(layer._out_shape if layer.layout == "NCHW" else
                                                    np.array(layer._out_shape)[[3, 0, 1, 2]]), layer._cache)
                sides.append(picked > 0)
    return sides


def check_model_away_from_kinks(model, x, eps):
    """check_model, asserting that no finite-difference evaluation crosses a kink: every ReLU input and
    every pooling window's choice stays on the side it has at the point (else the quotient measures a
    jump, and the check passes or fails by luck)."""
    model.loss_and_grad(x, eps=eps)
    at_point, crossed = kink_sides(model), []
    assert at_point, "the model has no kink to guard"
    real = model.loss_and_grad

    def watched(*a, **kw):
        out = real(*a, **kw)
        crossed.append(any(not np.array_equal(s, p) for s, p in zip(kink_sides(model), at_point)))
        return out

    model.loss_and_grad = watched
    report = check_model(model, x, eps)
    assert len(crossed) > 1 and not any(crossed), f"{sum(crossed)} of {len(crossed)} evaluations crossed a kink"
    return report


def test_relu_mlp_vae_gradcheck():
    """The default ReLU model, at a point where no evaluation of the finite differences crosses the kink."""
    model = small_mlp(activation="relu")
    x, eps = binary_batch(4, 7, 7), np.random.default_rng(8).standard_normal((4, 3))
    assert check_model_away_from_kinks(model, x, eps).max_error <= TOL


def test_fixed_gaussian_sigma_gradcheck():
    model = small_mlp("gaussian", gaussian_log_sigma=-0.5)
    assert "decoder.out_log_sigma" not in model.params
    x, eps = np.random.default_rng(9).random((4, 7)), np.random.default_rng(10).standard_normal((4, 3))
    assert check_model(model, x, eps).max_error <= TOL


@pytest.mark.parametrize("fused", FUSED)
def test_free_bits_gradcheck(fused):
    model = small_mlp(fused=fused)
    x, eps = binary_batch(6, 7, 11), np.random.default_rng(12).standard_normal((6, 3))
    kl_per_dim = np.sort(model.loss_and_grad(x, eps=eps)[1]["kl_per_dim"])
    floor = 0.5 * (kl_per_dim[0] + kl_per_dim[1])  # one dimension under the floor, two above, away from the kink
    _, stats = model.loss_and_grad(x, eps=eps, free_bits=floor)
    assert stats["kl_term"] == pytest.approx(floor + kl_per_dim[1:].sum(), rel=1e-12)
    report = check_model(model, x, eps, beta=0.8, free_bits=floor)
    assert report.max_error <= TOL, str(report)


def test_free_bits_zero_gradient_below_floor():
    model = small_mlp()
    x, eps = binary_batch(6, 7, 11), np.random.default_rng(12).standard_normal((6, 3))
    high = 100.0  # every dimension under the floor: the KL contributes no gradient at all
    model.zero_grad()
    loss_fb, _ = model.loss_and_grad(x, eps=eps, free_bits=high)
    g_fb = {k: v.copy() for k, v in model.grads.items()}
    model.zero_grad()
    loss_ae, _ = model.loss_and_grad(x, eps=eps, beta=0.0)
    for k in g_fb:
        np.testing.assert_allclose(g_fb[k], model.grads[k], rtol=1e-12, atol=1e-15)
    assert loss_fb == pytest.approx(loss_ae + 3 * high)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("build", [mlp_autoencoder, conv_autoencoder], ids=["mlp", "conv"])
def test_autoencoder_gradcheck(build, likelihood):
    if build is mlp_autoencoder:
        model = build(input_dim=7, hidden=(5,), latent_dim=2, activation="tanh", dtype="float64", seed=1,
                      likelihood=likelihood)
        x = binary_batch(4, 7, 2)
    else:
        model = build(input_shape=(1, 6, 6), channels=(2, 2), latent_dim=2, hidden=3, activation="tanh",
                      dtype="float64", seed=1, likelihood=likelihood)
        x = binary_batch(2, 36, 2)
    if likelihood == "gaussian":   # the learned per-pixel log sigma is a parameter, and checked with the rest
        x = 0.8 * x + 0.1 * np.random.default_rng(3).random(x.shape)
        assert "decoder.out_log_sigma" in model.params
    assert {k.split(".")[0] for k in model.params} == {"encoder", "code", "decoder"}
    report = check_model(model, x, None)
    assert set(report.errors) == set(model.params) and report.max_error <= TOL, str(report)


def _every_model():
    """One small float64 model of every kind the builders make, with its noise shape."""
    from scratchvae.models import gated_vae
    small = dict(input_dim=7, hidden=(6, 5), latent_dim=3, dtype="float64", seed=3)
    return {
        "mlp": (small_mlp(), (5, 3)),
        "mlp-gaussian": (small_mlp("gaussian"), (5, 3)),
        "mlp-fused": (small_mlp(fused=True), (5, 3)),
        "gated": (gated_vae(**small), (5, 3)),
        "vampprior": (mlp_vae(**small, activation="tanh", prior="vampprior", pseudo_inputs=4), (5, 3)),
        "gated-vampprior-iwae": (gated_vae(**small, prior="vampprior", pseudo_inputs=4, objective="iwae",
                                           samples=3, likelihood="gaussian"), (5, 3, 3)),
        "conv": (conv_vae(input_shape=(1, 6, 6), channels=(2, 2), latent_dim=3, hidden=4, activation="tanh",
                          dtype="float64", seed=4), (5, 3)),
        "ae-gaussian": (mlp_autoencoder(input_dim=7, hidden=(5,), latent_dim=2, likelihood="gaussian",
                                        dtype="float64", seed=1), None),
    }


@pytest.mark.parametrize("name", ["mlp", "mlp-gaussian", "mlp-fused", "gated", "vampprior", "gated-vampprior-iwae",
                                  "conv", "ae-gaussian"])
def test_loss_and_grad_adds_into_the_gradients(name):
    """Two calls without zero_grad give twice one call's gradient, in every array (an optimizer and a
    data-parallel all-reduce hold the arrays: a backward that assigns instead of adding loses terms)."""
    model, eps_shape = _every_model()[name]
    x = 0.8 * binary_batch(5, model.input_dim, 0) + 0.1
    eps = None if eps_shape is None else np.random.default_rng(2).standard_normal(eps_shape)
    if "vampprior" in name:
        model.params["prior.pseudo"][...] = 0.1 + 0.8 * np.random.default_rng(9).random((4, 7))
    model.zero_grad()
    model.loss_and_grad(x, eps=eps, beta=0.7)
    once = {k: g.copy() for k, g in model.grads.items()}
    model.loss_and_grad(x, eps=eps, beta=0.7)
    assert all(np.any(g != 0) for g in once.values()), [k for k, g in once.items() if not np.any(g != 0)]
    for k, g in model.grads.items():
        np.testing.assert_allclose(g, 2 * once[k], rtol=1e-13, atol=0, err_msg=k)


def test_param_names_and_shapes():
    model = mlp_vae()
    assert list(model.params) == ["encoder.0.W", "encoder.0.b", "mu.W", "mu.b", "log_sigma.W", "log_sigma.b",
                                  "decoder.0.W", "decoder.0.b", "decoder.2.W", "decoder.2.b"]
    assert model.params["encoder.0.W"].shape == (784, 400) and model.params["decoder.2.W"].shape == (400, 784)
    assert model.params["mu.W"].dtype == np.float32
    assert model.num_params() == 784 * 400 + 400 + 2 * (400 * 20 + 20) + 20 * 400 + 400 + 400 * 784 + 784
    conv = conv_vae()
    assert {k.split(".")[0] for k in conv.params} == {"encoder", "mu", "log_sigma", "decoder"}
    x = np.zeros((2, 1, 28, 28), dtype=np.float32)
    assert conv.decode(conv.encode(x)[0]).shape == (2, 784)


def test_loss_matches_its_definition():
    """loss = mean(recon) + beta * mean(sum KL), each term computed independently here."""
    model = small_mlp()
    x, eps = binary_batch(5, 7, 13), np.random.default_rng(14).standard_normal((5, 3))
    loss, stats = model.loss_and_grad(x, eps=eps, beta=0.5)
    mu, log_sigma = model.encode(x)
    z = mu + np.exp(log_sigma) * eps
    logits = model.decoder.forward(z)
    p = 1 / (1 + np.exp(-logits))
    recon = -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(1).mean()
    kl = (0.5 * (mu ** 2 + np.exp(2 * log_sigma) - 1) - log_sigma).sum(1).mean()
    assert stats["recon"] == pytest.approx(recon, rel=1e-12)
    assert stats["kl"] == pytest.approx(kl, rel=1e-12)
    assert loss == pytest.approx(recon + 0.5 * kl, rel=1e-12)


def test_gaussian_nll_is_exact_nats():
    model = small_mlp("gaussian", gaussian_log_sigma=0.3)
    x, eps = np.random.default_rng(15).random((4, 7)), np.random.default_rng(16).standard_normal((4, 3))
    _, stats = model.loss_and_grad(x, eps=eps)
    mu, log_sigma = model.encode(x)
    mean = model.decoder.forward(mu + np.exp(log_sigma) * eps)
    sigma = math.exp(0.3)
    log_pdf = -0.5 * ((x - mean) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    assert stats["recon"] == pytest.approx(-log_pdf.sum(1).mean(), rel=1e-12)


def test_iwae_converges_to_log_px_by_integration():
    """1-D latent: log p(x) = log integral p(x|z) N(z; 0, 1) dz on a fine grid."""
    model = mlp_vae(input_dim=5, hidden=(4,), latent_dim=1, activation="tanh", dtype="float64", seed=21)
    x = binary_batch(3, 5, 22)
    grid = np.linspace(-12, 12, 24001)[:, None]                        # (G, 1)
    dz = grid[1, 0] - grid[0, 0]
    logits = model.decoder.forward(grid)                               # (G, 5)
    log_prior = -0.5 * grid[:, 0] ** 2 - 0.5 * math.log(2 * math.pi)
    log_px = []
    for row in x:
        log_lik = (row * logits - np.logaddexp(0, logits)).sum(1)      # (G,)
        a = log_lik + log_prior
        log_px.append(a.max() + math.log(np.exp(a - a.max()).sum() * dz))
    # an untrained encoder is a poor proposal, so "large k" has to be large
    bound = model.iwae_bound(x, 500_000, np.random.default_rng(23))
    np.testing.assert_allclose(bound, log_px, atol=0.01)
    assert np.all(bound <= np.array(log_px) + 0.01)


def test_iwae_bound_grows_with_k_and_k1_is_the_elbo():
    model = mlp_vae(input_dim=8, hidden=(6,), latent_dim=2, dtype="float64", seed=24)
    x = np.repeat(binary_batch(4, 8, 25), 50, axis=0)                    # (200, 8)
    means = [model.iwae_bound(x, k, np.random.default_rng(26)).mean() for k in (1, 10, 100, 1000)]
    assert all(a < b for a, b in zip(means, means[1:])), means
    elbo = model.elbo(x, np.random.default_rng(27)).mean()
    assert means[0] == pytest.approx(elbo, abs=0.2)


def test_iwae_chunks_do_not_change_the_result():
    model = mlp_vae(input_dim=8, hidden=(6,), latent_dim=2, dtype="float64", seed=24)
    x = binary_batch(5, 8, 28)
    whole = model.iwae_bound(x, 64, np.random.default_rng(0))
    chunked = model.iwae_bound(x, 64, np.random.default_rng(0), max_elements=5 * 8 * 3)   # chunks of 3 samples
    np.testing.assert_allclose(whole, chunked, rtol=1e-12)


def test_loss_needs_rng_or_eps_and_checks_eps_shape():
    model = small_mlp()
    x = binary_batch(2, 7, 0)
    with pytest.raises(ValueError, match="rng"):
        model.loss_and_grad(x)
    with pytest.raises(ValueError, match=r"eps has shape \(2, 2\), expected \(2, 3\)"):
        model.loss_and_grad(x, eps=np.zeros((2, 2)))
    loss_a, _ = model.loss_and_grad(x, rng=np.random.default_rng(1))
    loss_b, _ = model.loss_and_grad(x, rng=np.random.default_rng(1))
    assert loss_a == loss_b


def test_bad_data_is_refused():
    model = small_mlp()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.loss_and_grad(np.full((2, 7), 1.5), eps=np.zeros((2, 3)))
    x = binary_batch(2, 7, 0)
    x[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.loss_and_grad(x, eps=np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"expected \(B, 7\)"):
        model.loss_and_grad(np.zeros((2, 6)), eps=np.zeros((2, 3)))


@pytest.mark.parametrize("fused", FUSED)
def test_nonfinite_loss_names_the_term(fused):
    model = small_mlp(fused=fused)
    x, eps = binary_batch(2, 7, 0), np.ones((2, 3))
    model.params["log_sigma.b"][...] = 800.0      # exp(2 * 800) overflows: the KL goes to inf
    with pytest.raises(NonFiniteLoss, match="KL term is inf"):
        model.loss_and_grad(x, eps=eps)
    model = small_mlp(fused=fused)
    model.params["decoder.4.b"][0] = np.nan
    with pytest.raises(NonFiniteLoss, match="reconstruction term") as info:
        model.loss_and_grad(x, eps=eps)
    assert "KL" not in str(info.value)


def test_decode_sample_reconstruct_shapes():
    model = mlp_vae(input_dim=12, hidden=(5,), latent_dim=2, input_shape=(1, 3, 4))
    x = binary_batch(3, 12, 0).astype(np.float32)
    mu, log_sigma = model.encode(x)
    assert mu.shape == log_sigma.shape == (3, 2)
    probs = model.reconstruct(x)
    assert probs.shape == (3, 12) and probs.min() >= 0 and probs.max() <= 1
    assert model.sample(4, np.random.default_rng(0)).shape == (4, 12)
    assert model.reconstruct(x.reshape(3, 1, 3, 4)).shape == (3, 12)


# -- every entry point checks what it is given ------------------------------------------------

@pytest.mark.parametrize("beta, free_bits, name", [(-1.0, 0.0, "beta"), (float("nan"), 0.0, "beta"),
                                                   (1.0, -0.1, "free_bits"), (1.0, float("nan"), "free_bits")])
def test_loss_and_grad_refuses_bad_weights(beta, free_bits, name):
    model = small_mlp()
    x = binary_batch(4, 7, 0)
    with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0"):
        model.loss_and_grad(x, eps=np.zeros((4, 3)), beta=beta, free_bits=free_bits)


@pytest.mark.parametrize("call", ["evaluate", "iwae_bound", "reconstruct", "elbo"])
@pytest.mark.parametrize("problem, match", [("nan", "NaN or Inf"), ("range", r"\[0, 1\]"), ("shape", "shape")])
def test_evaluation_entry_points_check_their_input(call, problem, match):
    model = small_mlp()
    x = binary_batch(4, 7, 1)
    if problem == "nan":
        x[1, 2] = np.nan
    elif problem == "range":
        x[0, 0] = 3.0
    else:
        x = x[:, :5]
    rng = np.random.default_rng(0)
    args = {"evaluate": (x, rng), "iwae_bound": (x, 3, rng), "reconstruct": (x,), "elbo": (x, rng)}[call]
    with pytest.raises(ValueError, match=match):
        getattr(model, call)(*args)


def test_decode_checks_its_codes():
    model = small_mlp()
    with pytest.raises(ValueError, match=r"expected \(B, 3\)"):
        model.decode(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.decode(np.full((2, 3), np.inf))
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        model.iwae_bound(binary_batch(2, 7, 0), 0, np.random.default_rng(0))


def test_latent_activity_finds_the_collapsed_dimensions():
    """A model whose mu head ignores the input in dimension 1 and whose log_sigma is 0 there has
    that dimension inactive with zero KL; the others carry information and count as active."""
    model = small_mlp()
    x = binary_batch(200, 7, 5)
    model.mu_head.params["W"][:, 1] = 0.0
    model.mu_head.params["b"][1] = 0.0
    model.log_sigma_head.params["W"][:, 1] = 0.0
    model.log_sigma_head.params["b"][1] = 0.0
    model.mu_head.params["W"][:, [0, 2]] *= 20.0          # make the others clearly active
    out = model.evaluate(x, np.random.default_rng(0), batch_size=64)   # several batches
    assert out["active_units"] == 2
    assert out["activity"][1] == 0.0 and out["kl_per_dim"][1] == 0.0
    assert np.all(out["activity"][[0, 2]] > 0.01) and np.all(out["kl_per_dim"][[0, 2]] > 0)
    mu, log_sigma = model.encode(x)
    kl = 0.5 * mu ** 2 + 0.5 * (np.exp(2 * log_sigma) - 1) - log_sigma
    np.testing.assert_allclose(out["kl_per_dim"], kl.mean(axis=0), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(out["activity"], mu.var(axis=0), rtol=1e-12)


@pytest.mark.parametrize("make", [small_mlp, lambda **kw: mlp_autoencoder(input_dim=7, hidden=(6, 5), latent_dim=3,
                                                                          activation="tanh", dtype="float64", seed=3)],
                         ids=["vae", "ae"])
def test_denoising_gradient_with_a_separate_encoder_input(make):
    """x_in feeds the encoder, the clean x is the target: the whole loss is still gradient-checked."""
    model = make()
    x = binary_batch(5, 7, 8)
    x_in = binary_batch(5, 7, 9)
    eps = np.random.default_rng(2).standard_normal((5, 3))
    model.zero_grad()
    model.loss_and_grad(x, eps=eps, x_in=x_in)
    analytic = {k: g.copy() for k, g in model.grads.items()}
    report = gradcheck.check_scalar(lambda: model.loss_and_grad(x, eps=eps, x_in=x_in)[0], model.params, analytic)
    assert report.passed(TOL), str(report)
    clean = model.loss_and_grad(x, eps=eps)[0]
    assert model.loss_and_grad(x, eps=eps, x_in=x_in)[0] != clean         # the encoder really saw x_in
    with pytest.raises(ValueError, match="x_in has shape"):
        model.loss_and_grad(x, eps=eps, x_in=x_in[:, :5].copy())


def test_pooling_conv_vae_gradcheck_and_shapes():
    """conv_vae(downsample="pool"): 3x3 convolutions and 2x2 max-pooling down, nearest up-sampling
    and 3x3 convolutions up; the whole negative ELBO gradient-checked in float64."""
    model = conv_vae(input_shape=(1, 8, 4), channels=(2, 3), latent_dim=2, hidden=4, activation="tanh",
                     dtype="float64", seed=4, fused=False, downsample="pool")
    rng = np.random.default_rng(6)
    x = binary_batch(3, 32, 7)
    # inputs well away from max-pooling ties: a tiny jitter of the data keeps every window's argmax fixed
    x = x + 0.01 * rng.random(x.shape)
    x = np.clip(x, 0, 1)
    eps = rng.standard_normal((3, 2))
    report = check_model_away_from_kinks(model, x, eps)
    assert report.passed(TOL), str(report)
    assert model.decode(np.zeros((2, 2))).shape == (2, 32)
    names = [type(layer).__name__ for layer in model.encoder.layers]
    assert names.count("MaxPool2d") == 2 and "Upsample2d" in [type(layer).__name__ for layer in model.decoder.layers]
    with pytest.raises(ValueError, match="divisible by 2\\*\\*2"):
        conv_vae(input_shape=(1, 6, 6), channels=(2, 3), downsample="pool")
    with pytest.raises(ValueError, match="downsample must be one of"):
        conv_vae(downsample="avg")


@pytest.mark.parametrize("build", ["mlp", "conv", "gaussian-learned"])
def test_parameters_and_gradients_live_in_one_flat_buffer_each(build):
    """Every dict that holds a parameter (layer, container, model) holds a view of flat_params, back to
    back in the model's order; gradients likewise in flat_grads, which zero_grad fills in one pass."""
    from scratchvae.backend import contiguous_run
    from scratchvae.layers.base import walk
    from scratchvae.models import conv_vae, mlp_vae
    if build == "conv":
        model = conv_vae((1, 12, 12), channels=(3, 4), latent_dim=2, hidden=8, seed=0)
    else:
        model = mlp_vae(20, hidden=(6,), latent_dim=2, seed=0,
                        likelihood="gaussian" if build == "gaussian-learned" else "bernoulli",
                        gaussian_log_sigma="learned")
    for flat, arrays in ((model.flat_params, model.params), (model.flat_grads, model.grads)):
        run = contiguous_run(arrays.values())
        assert run is not None and run.size == flat.size == model.num_params() and np.shares_memory(run, flat)
    held = {id(a) for a in list(model.params.values()) + list(model.grads.values())}
    for part in model.parts.values():
        for layer in walk(part):
            assert all(id(a) in held for a in list(layer.params.values()) + list(layer.grads.values())), layer
    if build == "gaussian-learned":
        assert np.shares_memory(model.out_log_sigma, model.flat_params)
    x = (np.random.default_rng(0).random((4, model.input_dim)) < 0.5).astype(np.float32)
    model.zero_grad()
    model.loss_and_grad(x, eps=np.zeros((4, 2), np.float32))
    assert np.abs(model.flat_grads).sum() > 0
    model.zero_grad()
    assert not model.flat_grads.any()
    before = model.encode(x)[0].copy()
    model.flat_params[:] *= 2                                  # the layers read the flat buffer
    assert not np.allclose(model.encode(x)[0], before)


def test_contiguous_run_finds_only_arrays_that_tile_one_buffer_in_order():
    from scratchvae.backend import contiguous_run
    from scratchvae.optim import Adam
    flat = np.arange(10.0)
    a, b, c = flat[:4].reshape(2, 2), flat[4:7], flat[7:]
    np.testing.assert_array_equal(contiguous_run([a, b, c]), flat)
    np.testing.assert_array_equal(contiguous_run([b, c]), flat[4:])
    assert contiguous_run([b, a]) is None                       # out of order
    assert contiguous_run([a, c]) is None                       # a gap
    assert contiguous_run([np.zeros(3), np.zeros(3)]) is None   # two buffers
    assert contiguous_run([flat.reshape(2, 5).T]) is None        # not a C-contiguous view of a 1-D buffer
    assert contiguous_run([]) is None
    state = Adam().init({"a": a, "b": b})
    assert contiguous_run(state.m.values()) is not None and contiguous_run(state.v.values()) is not None
    mixed = Adam().init({"a": a, "b": b.astype(np.float32)})   # two dtypes: one array each
    assert mixed.m["b"].dtype == np.float32 and contiguous_run(mixed.m.values()) is None




def test_the_one_level_model_computes_what_it_did_before_the_level_stack():
    """The one-level models are the level stack's one-level case and compute what the one-level VAE computed
    before it (tests/reference/one_level.json): the loss, every gradient, the IWAE bound and the evaluation,
    in float64 to 1e-10 and in float32 to its rounding."""
    import json
    import sys
    from pathlib import Path
    here = Path(__file__).parent / "reference"
    sys.path.insert(0, str(here))
    try:
        import one_level
    finally:
        sys.path.remove(str(here))
    recorded = json.loads((here / "one_level.json").read_text())
    for dtype, rtol in (("float64", 1e-10), ("float32", 2e-4)):
        for name in one_level.CONFIGS:
            now, then = one_level.record(name, dtype), recorded[dtype][name]
            assert now["evaluate"].pop("active_units") == then["evaluate"].pop("active_units"), (dtype, name)
            assert set(now["grads"]) == set(then["grads"]), (dtype, name)
            for key in ("loss", "recon", "kl", "kl_term", "kl_per_dim", "iwae_bound_7", "evaluate", "grads"):
                a, b = now[key], then[key]
                if isinstance(a, dict):
                    a, b = [np.hstack([a[k] for k in sorted(a)])], [np.hstack([b[k] for k in sorted(b)])]
                a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
                scale = np.abs(b).max() if b.size else 1.0   # a fingerprint near 0 is judged by its peers' size
                np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(scale, 1e-12), err_msg=f"{dtype} {name} {key}")


@pytest.mark.parametrize("name,chunk", [("mlp", 1000), ("conv", 100), ("conv-ae", 100)])
def test_evaluation_passes_are_sized_by_the_model_and_do_not_change_the_figures(name, chunk):
    """On a CPU a model with convolutions evaluates 100 images a pass (its unfolded columns are 16x an
    activation and its layers keep the largest buffers they used), others 1000; the figures are those
    of any other chunking."""
    model = (conv_autoencoder(input_shape=(1, 6, 6), channels=(2, 2), latent_dim=2, hidden=3, dtype="float64",
                              seed=1) if name == "conv-ae" else _every_model()[name][0])
    assert model.eval_chunk() == chunk
    x = binary_batch(250, model.input_dim, 6)
    default = model.evaluate(x, np.random.default_rng(0))
    other = model.evaluate(x, np.random.default_rng(0), batch_size=7)
    for key in ("loss", "recon", "kl"):
        assert default[key] == pytest.approx(other[key], rel=1e-12)
    if name == "conv":
        stores = [layer._workspace._stores for part in model.parts.values() for layer in walk(part)
                  if hasattr(layer, "_workspace")]
        assert stores
        biggest = max(buf.size for s in stores for buf in s.values())
        model.evaluate(x, np.random.default_rng(0), batch_size=250)        # one pass of all 250
        assert max(buf.size for s in stores for buf in s.values()) > biggest
