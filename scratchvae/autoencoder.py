"""A plain (deterministic) autoencoder from the VAE's parts: the classic contrast to the VAE."""
from __future__ import annotations

import math

import numpy

from .model_base import ModelBase, NonFiniteLoss, batch_total_of

__all__ = ["Autoencoder"]


class Autoencoder(ModelBase):
    """A plain (deterministic) autoencoder built from the same parts.

    ``code = code_head(encoder(x))``, ``out = decoder(code)``, loss = the
    reconstruction NLL only (no KL, no noise).  ``encode`` returns
    ``(code, None)``; ``sample`` decodes N(0, I) draws, which an autoencoder
    was never trained to decode: that contrast is the point of the classic
    autoencoder-versus-VAE comparison.
    """

    def __init__(self, encoder, code_head, decoder, *, likelihood="bernoulli", input_shape=(784,),
                 gaussian_log_sigma="learned", fused=True):
        super().__init__({"encoder": encoder, "code": code_head, "decoder": decoder},
                         likelihood=likelihood, input_shape=input_shape, latent_dim=code_head.out_features,
                         gaussian_log_sigma=gaussian_log_sigma, fused=fused)
        self.encoder, self.code_head, self.decoder = encoder, code_head, decoder

    def encode(self, x):
        """x (B, D) -> (code (B, L), None)."""
        return self.code_head.forward(self.encoder.forward(self._as_input(x))), None

    def noise_shape(self, B: int) -> tuple:
        """The shape of the eps the trainer draws for every model; an autoencoder ignores it: (B, L)."""
        return (int(B), self.latent_dim)

    def evaluate(self, x, rng=None, batch_size: int | None = None) -> dict:
        """The reconstruction NLL, per-example mean over ``x`` (``loss`` = ``recon``; ``kl`` 0); ``rng`` unused."""
        x = self._checked_input(x)
        if batch_size is None:
            batch_size = self.eval_chunk()
        total = sum(float(-self._log_px(self.decoder.forward(self.encode(x[i:i + batch_size])[0]),
                                        x[i:i + batch_size]).sum()) for i in range(0, x.shape[0], batch_size))
        recon = total / x.shape[0]
        return {"loss": recon, "recon": recon, "kl": 0.0}

    def decode(self, z):
        """Mean image of p(x | code): (B, L) -> (B, D)."""
        return self._mean_image(self.decoder.forward(self._checked_code(z)))

    def sample(self, n: int, rng):
        """Decode ``n`` draws from N(0, I), which the autoencoder was never trained to decode: (n, D)."""
        return self.decode(rng.standard_normal((int(n), self.latent_dim), dtype=self.dtype))

    def reconstruct(self, x):
        """Decode the code of ``x``: (B, D) -> (B, D) mean images."""
        return self.decode(self.encode(self._checked_input(x))[0])

    def loss_and_grad(self, x, rng=None, eps=None, beta=1.0, free_bits=0.0, check_data=True, sync=True,
                      x_in=None, batch_total=None, reduce=None):
        """Reconstruction NLL per example (nats); accumulates its gradient.

        ``rng``, ``eps``, ``beta``, ``free_bits`` and ``reduce`` are accepted
        for interface parity with :class:`VAE` and ignored; ``sync``, ``x_in``
        (the encoder's input, for a denoising autoencoder) and
        ``batch_total`` (``x`` is one shard of a batch that large) as there.
        """
        x = self._checked_input(x) if check_data else self._as_input(x)
        x_in = x if x_in is None else self._encoder_input(x_in, x, check_data)
        n = batch_total_of(x.shape[0], batch_total)
        code = self.code_head.forward(self.encoder.forward(x_in))   # (B, L)
        out = self.decoder.forward(code)                          # (B, D)
        nll, dout, dout_log_sigma = self._nll_and_grad(out, x, 1.0 / n)
        recon = nll.sum() / n                                     # 0-d, on the backend
        zero = self.xp.zeros((), dtype=self.dtype)
        if sync:
            recon, zero = float(recon), 0.0
            if not math.isfinite(recon):
                raise NonFiniteLoss(f"the reconstruction term (-log p(x|z), {self.likelihood}) is {recon}")
        if self._learn_out_log_sigma:
            self.grads["decoder.out_log_sigma"] += dout_log_sigma
        dcode = self.decoder.backward(dout)
        self.encoder.backward(self.code_head.backward(dcode))
        per_dim = numpy.zeros(self.latent_dim) if sync else self.xp.zeros(self.latent_dim, dtype=self.dtype)
        return recon, {"loss": recon, "recon": recon, "kl": zero, "kl_term": zero, "kl_per_dim": per_dim}
