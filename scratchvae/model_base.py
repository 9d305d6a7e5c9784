"""What every model shares: parameter bookkeeping in one flat buffer, the input checks, and the likelihood
p(x | decoder output) with its gradient. :class:`scratchvae.vae.VAE` and
:class:`scratchvae.autoencoder.Autoencoder` build on :class:`ModelBase`."""
from __future__ import annotations

import math

import numpy

from . import losses
from .backend import flat_views
from .choices import LIKELIHOODS
from .fused import kernels as fused_kernels
from .layers.base import gather_params, walk
from .layers.conv import Conv2d, ConvTranspose2d

__all__ = ["ModelBase", "NonFiniteLoss", "ACTIVE_UNIT_THRESHOLD", "batch_total_of", "check_loss_weights"]

ACTIVE_UNIT_THRESHOLD = 0.01   # Burda et al. (2015): a latent dimension is active when Var_x(E_q[z_j]) > 0.01


class NonFiniteLoss(FloatingPointError):
    """A loss term became NaN or Inf; the message names the term."""


class ModelBase:
    """What the VAE and the plain autoencoder share: parameter bookkeeping,
    input checks, the likelihood, and decoding."""

    def __init__(self, parts: dict, *, likelihood, input_shape, latent_dim, gaussian_log_sigma, fused):
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        first = next(iter(parts.values()))
        self.backend = first.backend
        self.dtype = first.dtype
        self.xp = self.backend.xp
        self.likelihood = likelihood
        self.input_shape = tuple(int(s) for s in input_shape)
        self.input_dim = math.prod(self.input_shape)
        self.latent_dim = int(latent_dim)
        self.fused = bool(fused)
        self.ops = fused_kernels() if fused else losses
        self.parts = parts
        self.params, self.grads = gather_params(parts.items(), "model part", self.backend, self.dtype)
        # The Gaussian likelihood's per-pixel log standard deviation: learned
        # (a parameter of the decoder's output distribution) or fixed.
        self.out_log_sigma = None
        self._learn_out_log_sigma = False
        if likelihood == "gaussian":
            if gaussian_log_sigma == "learned":
                self.out_log_sigma = self.xp.zeros(self.input_dim, dtype=self.dtype)  # (D,)
                self._learn_out_log_sigma = True
                self.params["decoder.out_log_sigma"] = self.out_log_sigma
                self.grads["decoder.out_log_sigma"] = self.xp.zeros_like(self.out_log_sigma)
            else:
                self.out_log_sigma = self.xp.full((1,), float(gaussian_log_sigma), dtype=self.dtype)  # (1,)
        self._flatten()

    def eval_chunk(self) -> int:
        """Images per pass of an evaluation: a GPU wants large launches (10,000), a CPU its caches (1000);
        a model with convolutions takes 100 on a CPU, as fast, because a conv layer's unfolded columns are
        16 times its input and it keeps the largest buffers it has used for the steps after."""
        if self.backend.name == "cupy":
            return 10_000
        convs = any(isinstance(layer, (Conv2d, ConvTranspose2d)) for part in self.parts.values() for layer in walk(part))
        return 100 if convs else 1000

    def _flatten(self) -> None:
        """Move the parameters into one flat buffer and the gradients into another.

        ``flat_params`` and ``flat_grads`` (1-D) hold every array of ``params``
        and ``grads`` back to back, in their order; every dict that held an
        array (the layers', the containers', the model's) holds its view
        instead. So one kernel launch updates them all (Adam), one fill zeroes
        the gradients and one copy snapshots them.
        """
        self.flat_params, params = flat_views(self.xp, self.params)
        self.flat_grads, grads = flat_views(self.xp, self.grads, copy=False)
        moved = {}
        for name in self.params:
            moved[id(self.params[name])], moved[id(self.grads[name])] = params[name], grads[name]
        for part in self.parts.values():
            for layer in walk(part):
                for arrays in (layer.params, layer.grads):
                    for key in arrays:
                        arrays[key] = moved[id(arrays[key])]
        self.params, self.grads = params, grads
        if self._learn_out_log_sigma:
            self.out_log_sigma = params["decoder.out_log_sigma"]

    # -- bookkeeping -------------------------------------------------------------
    def zero_grad(self) -> None:
        """Reset every gradient to zero, in place (one fill of ``flat_grads``)."""
        self.flat_grads.fill(0)

    def _noise(self, B, rng, eps, shape=None):
        """One batch's eps, shaped by :meth:`noise_shape` (or ``shape``): the given one (checked), or standard
        normal from ``rng``."""
        shape = self.noise_shape(B) if shape is None else shape
        if eps is None:
            if rng is None:
                raise ValueError("loss_and_grad needs rng (to draw eps) or eps")
            return rng.standard_normal(shape, dtype=self.dtype)
        eps = self.backend.asarray(eps, dtype=self.dtype)
        if eps.shape != shape:
            raise ValueError(f"eps has shape {tuple(eps.shape)}, expected {shape}")
        return eps

    def num_params(self) -> int:
        return sum(int(p.size) for p in self.params.values())

    def _as_input(self, x, name="x"):
        """Accept (B, D) or (B, C, H, W), host or device; return a (B, D) array of the model's dtype."""
        xp = self.xp
        if not self.backend.is_array(x):
            x = self.backend.asarray(x)
        if x.ndim == 1 + len(self.input_shape) and tuple(x.shape[1:]) == self.input_shape:
            x = x.reshape(x.shape[0], self.input_dim)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected (B, {self.input_dim}) "
                             f"or (B, {', '.join(map(str, self.input_shape))})")
        if x.shape[0] < 1:
            raise ValueError(f"{name} is an empty batch")
        if x.dtype != self.dtype:
            if x.dtype.kind not in "fiub":
                raise TypeError(f"{name} has dtype {x.dtype}, expected a numeric array")
            x = x.astype(self.dtype)
        return xp.ascontiguousarray(x)

    def _checked_input(self, x, name="x"):
        """:meth:`_as_input` and :meth:`_check_values`: what every public entry point does with data."""
        x = self._as_input(x, name)
        self._check_values(x, name)
        return x

    def _encoder_input(self, x_in, x, check_data):
        """The encoder's input of a denoising model: shaped like ``x``, checked as ``x`` is."""
        x_in = self._checked_input(x_in, "x_in") if check_data else self._as_input(x_in, "x_in")
        if x_in.shape != x.shape:
            raise ValueError(f"x_in has shape {tuple(x_in.shape)}, x has {tuple(x.shape)}; they must match")
        return x_in

    def _check_values(self, x, name="x"):
        """NaN/Inf anywhere, or values outside [0, 1] for the Bernoulli likelihood."""
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name} contains NaN or Inf values")
        if self.likelihood == "bernoulli" and (lo < 0 or hi > 1):
            raise ValueError(f"{name} has values in [{lo:g}, {hi:g}]; the Bernoulli likelihood needs data in [0, 1]")

    # -- likelihood ----------------------------------------------------------------
    def _nll_and_grad(self, out, x, scale):
        """-log p(x | out) per example (B,), d(scale * sum NLL)/d out (B, D), and
        d(scale * sum NLL)/d out_log_sigma (Gaussian) or None (Bernoulli).

        Nothing is accumulated here: the caller adds the log-sigma gradient
        once the loss is known to be finite.
        """
        if self.likelihood == "bernoulli":
            return (*self.ops.bce_with_logits(out, x, scale), None)
        return self.ops.gaussian_nll(out, x, self.out_log_sigma, scale)

    def _log_px(self, out, x):
        """log p(x | out) per example, (B,): the value only, no gradient pass."""
        if self.likelihood == "bernoulli":
            return -losses.bce_with_logits_value(out, x)
        return -losses.gaussian_nll_value(out, x, self.out_log_sigma)

    def _mean_image(self, out):
        return losses.sigmoid(out) if self.likelihood == "bernoulli" else out

    def _checked_code(self, z):
        """A code to decode: (B, L) with B >= 1, finite, on the model's backend and dtype."""
        z = self.backend.asarray(z, dtype=self.dtype)
        if z.ndim != 2 or z.shape[1] != self.latent_dim or z.shape[0] < 1:
            raise ValueError(f"z has shape {tuple(z.shape)}, expected (B, {self.latent_dim}) with B >= 1")
        lo, hi = float(z.min()), float(z.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("z contains NaN or Inf values")
        return z


def batch_total_of(B: int, batch_total) -> int:
    """The number of examples a loss's means are over: the shard's ``B``, or the whole batch's."""
    if batch_total is None:
        return B
    if not isinstance(batch_total, (int, numpy.integer)) or batch_total < B:
        raise ValueError(f"loss_and_grad: batch_total must be an int >= the shard's {B} examples, got {batch_total!r}")
    return int(batch_total)


def check_loss_weights(beta, free_bits) -> None:
    """beta and free_bits enter the gradient directly: a NaN or a negative value is refused here."""
    for name, value in (("beta", beta), ("free_bits", free_bits)):
        if not (isinstance(value, (int, float, numpy.floating)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"loss_and_grad: {name} must be a finite number >= 0, got {value!r}")
