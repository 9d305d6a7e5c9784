"""The model a :class:`~scratchvae.config.TrainConfig` asks for, and what each of its loss columns is."""
from __future__ import annotations

import math

from .config import TrainConfig
from .models import conv_autoencoder, conv_vae, gated_vae, hierarchical_vae, mlp_autoencoder, mlp_vae

__all__ = ["build_model", "loss_labels"]


def build_model(cfg: TrainConfig, image_shape, be):
    """The model ``cfg`` asks for, on backend ``be``."""
    common = dict(latent_dim=cfg.latent_dim, likelihood=cfg.likelihood, backend=be, dtype=cfg.dtype,
                  seed=cfg.seed, activation=cfg.activation, fused=cfg.fused)
    probabilistic = dict(prior=cfg.prior, pseudo_inputs=cfg.pseudo_inputs, objective=cfg.objective, samples=cfg.samples)
    dense = dict(common, init=cfg.init)   # the MLP-shaped models: their weights' initialization
    if cfg.levels > 1:
        return hierarchical_vae(input_dim=math.prod(image_shape), hidden=cfg.hidden, input_shape=tuple(image_shape),
                                levels=cfg.levels, arch=cfg.arch, **dense, **probabilistic)
    if cfg.arch == "mlp" and cfg.model == "vae":
        return mlp_vae(input_dim=math.prod(image_shape), hidden=cfg.hidden, input_shape=tuple(image_shape), **dense,
                       **probabilistic)
    if cfg.arch == "mlp":
        return mlp_autoencoder(input_dim=math.prod(image_shape), hidden=cfg.hidden, input_shape=tuple(image_shape),
                               **dense)
    if cfg.arch == "gated":
        dense.pop("activation")
        return gated_vae(input_dim=math.prod(image_shape), hidden=cfg.hidden, input_shape=tuple(image_shape),
                         **dense, **probabilistic)
    build = conv_vae if cfg.model == "vae" else conv_autoencoder
    return build(input_shape=tuple(image_shape), channels=cfg.channels, hidden=cfg.hidden[0] if cfg.hidden else None,
                 downsample=cfg.downsample, **common)


def loss_labels(cfg: TrainConfig) -> dict:
    """What each loss column of a run is: ``train_loss``, ``test_loss``, ``valid_loss``, ``recon_kl`` (long
    names, for metrics.jsonl, summary.json and curves.png) and ``train_short``, ``test_short`` (the console's)."""
    if cfg.model == "ae":
        name = "reconstruction NLL (no KL term)"
        return {"train_loss": name, "test_loss": name, "valid_loss": name, "recon_kl": "reconstruction NLL; no KL",
                "train_short": "recon", "test_short": "recon", "valid_short": "recon"}
    elbo = "negative ELBO (one sample per image)"
    bound = elbo if cfg.objective == "elbo" else f"negative IWAE bound (S={cfg.samples} samples per image)"
    weighted = [what for what, on in (("the KL weighted by beta", cfg.kl_warmup > 0 or cfg.beta != 1),
                                      ("free bits", cfg.free_bits > 0)) if on]
    return {"train_loss": bound + (f", as trained: {' and '.join(weighted)}" if weighted else ""),
            "test_loss": elbo, "valid_loss": (f"negative IWAE bound (k={cfg.valid_k} samples per image)"
                                               if cfg.valid_k > 0 else bound.replace(" per image", " per image, beta = 1")),
            "recon_kl": "per-sample means of -log p(x|z) and log q(z|x) - log p(z) (the analytic KL for the "
                        "standard prior with the ELBO); recon + kl is the negative ELBO"
                        + ("" if cfg.objective == "elbo" else ", not the IWAE loss"),
            "train_short": "-ELBO" if cfg.objective == "elbo" else f"-IWAE{cfg.samples}", "test_short": "-ELBO",
            "valid_short": f"-IWAE{cfg.valid_k}" if cfg.valid_k > 0 else
            ("-ELBO" if cfg.objective == "elbo" else f"-IWAE{cfg.samples}")}
