#!/usr/bin/env python
"""The bare training loop: a VAE on binarized MNIST in a few seconds, the public API only.

    python examples/one_step.py

Every line of a step is here: zero the gradients, the loss and its hand-derived
gradient (scratchvae/vae.py), one Adam update (scratchvae/optim.py).
"""
import numpy as np

from scratchvae import datasets
from scratchvae.models import mlp_vae
from scratchvae.optim import Adam

data = datasets.load("binarized-mnist")                   # shipped with the package, no download
x_train = data.train[:20_000]                             # (N, 784) pixels in {0, 1}
model = mlp_vae(input_dim=784, hidden=(200,), latent_dim=10, seed=0)
adam = Adam(lr=1e-3)
state = adam.init(model.params)                           # m, v and the step count
rng = np.random.default_rng(0)
B, losses = 100, []
print(f"test negative ELBO before training {model.evaluate(data.test[:2000], rng)['loss']:.2f} nats")

for step in range(400):
    xb = x_train[rng.integers(0, len(x_train), B)]        # (B, 784)
    eps = rng.standard_normal((B, 10), dtype=np.float32)  # (B, L): z = mu + exp(log_sigma) * eps
    model.zero_grad()
    loss, stats = model.loss_and_grad(xb, eps=eps)        # negative ELBO (nats per image), grads filled
    state = adam.step(model.params, model.grads, state)   # the parameters move in place
    losses.append(loss)
    if (step + 1) % 50 == 0:
        print(f"step {step + 1:3d}  loss {np.mean(losses[-50:]):7.2f}  "
              f"(recon {stats['recon']:6.2f}, KL {stats['kl']:5.2f})")

print(f"test negative ELBO after {step + 1} steps {model.evaluate(data.test[:2000], rng)['loss']:.2f} nats")
