"""Fingerprints of the one-level models' loss, gradients and bounds, recorded to hold the model to them.

``python tests/reference/one_level.py > tests/reference/one_level.json`` writes them; the file in the
repository was written by the one-level VAE as it stood before the model became a stack of stochastic
levels, and ``tests/test_vae.py`` checks that the stack's one-level case still computes the same numbers
(float64 to 1e-10, float32 to its rounding). A gradient array is fingerprinted by its sum and its dot
product with a fixed standard-normal vector, which any change of the array moves.
"""
from __future__ import annotations

import json
import sys

import numpy as np

from scratchvae import datasets, models

# name: (builder, keywords, loss_and_grad keywords)
CONFIGS = {
    "mlp-elbo": ("mlp_vae", dict(hidden=(32,), latent_dim=5), dict(beta=0.7)),
    "mlp-elbo-free-bits": ("mlp_vae", dict(hidden=(32,), latent_dim=5), dict(beta=1.0, free_bits=0.03)),
    "mlp-denoising": ("mlp_vae", dict(hidden=(32,), latent_dim=5), dict(beta=1.0, denoise=True)),
    "gated-vampprior": ("gated_vae", dict(hidden=(24, 16), latent_dim=4, prior="vampprior", pseudo_inputs=7),
                        dict(beta=0.5)),
    "gated-iwae": ("gated_vae", dict(hidden=(24, 16), latent_dim=4, objective="iwae", samples=3), dict(beta=1.0)),
    "mlp-gaussian-vampprior-iwae": ("mlp_vae", dict(hidden=(32,), latent_dim=5, likelihood="gaussian",
                                                    prior="vampprior", pseudo_inputs=5, objective="iwae", samples=2),
                                    dict(beta=0.8)),
    "mlp-gaussian-elbo": ("mlp_vae", dict(hidden=(32,), latent_dim=5, likelihood="gaussian"), dict(beta=1.0)),
    "conv-elbo": ("conv_vae", dict(channels=(4, 8), hidden=16, latent_dim=3), dict(beta=0.9)),
}


def batch(B=12):
    return datasets.load("binarized-mnist").train[:B].astype(np.float64)


def fingerprint(array):
    a = np.asarray(array, dtype=np.float64).ravel()
    probe = np.random.default_rng(a.size).standard_normal(a.size)
    return [float(a.sum()), float(a @ probe)]


def record(name, dtype):
    builder, kw, call = CONFIGS[name]
    model = getattr(models, builder)(dtype=dtype, seed=5, **kw)
    x = batch()
    if model.likelihood == "gaussian":
        x = 0.8 * x + 0.1 * np.random.default_rng(1).random(x.shape)
    call = dict(call)
    if call.pop("denoise", False):
        call["x_in"] = x * (np.random.default_rng(2).random(x.shape) > 0.25)
    eps = np.random.default_rng(3).standard_normal(model.noise_shape(x.shape[0]))
    model.zero_grad()
    loss, stats = model.loss_and_grad(x, eps=eps, **call)
    out = {"loss": loss, "recon": stats["recon"], "kl": stats["kl"], "kl_term": stats["kl_term"],
           "kl_per_dim": [float(v) for v in stats["kl_per_dim"]],
           "grads": {k: fingerprint(g) for k, g in model.grads.items()}}
    b = model.backend
    out["iwae_bound_7"] = [float(v) for v in model.iwae_bound(x[:5], 7, b.rng(11))]
    ev = model.evaluate(x, b.rng(12))
    out["evaluate"] = {k: ev[k] for k in ("loss", "recon", "kl", "active_units")}
    out["evaluate"]["activity"] = fingerprint(ev["activity"])
    return out


def main():
    result = {dtype: {name: record(name, dtype) for name in CONFIGS} for dtype in ("float64", "float32")}
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
