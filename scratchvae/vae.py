"""The variational autoencoder: the model, its loss with the hand-written gradient, and the
importance-weighted bound (:mod:`scratchvae.models` builds them: ``mlp_vae``, ``conv_vae``;
:mod:`scratchvae.hvae` stacks levels on :class:`ModelBase`).

One training step, in the order :meth:`VAE.loss_and_grad` runs it (shapes for
a batch of B flat images with D pixels and a latent of L dimensions)::

    h         = encoder(x)                      # (B, H)
    mu        = mu_head(h)                      # (B, L)
    log_sigma = log_sigma_head(h)               # (B, L)   log standard deviation
    z         = mu + exp(log_sigma) * eps       # (B, L)   eps ~ N(0, I)
    KL_j      = 0.5 * (mu**2 + exp(2 log_sigma) - 1) - log_sigma
    out       = decoder(z)                      # (B, D)   logits or Gaussian mean
    recon     = -log p(x | z)                   # (B,)     summed over pixels
    loss      = mean_b(recon) + beta * mean_b(sum_j KL_j)

and backward::

    d out                  = dNLL/d out / B                 (sigmoid(out) - x for Bernoulli)
    dz                     = decoder.backward(d out)
    dmu                    = dz + (beta / B) * mu
    dlog_sigma             = dz * exp(log_sigma) * eps + (beta / B) * (exp(2 log_sigma) - 1)
    dh                     = mu_head.backward(dmu) + log_sigma_head.backward(dlog_sigma)
    encoder.backward(dh)

The loss terms and their gradients come from :mod:`scratchvae.losses` (plain
array code, the readable ground truth) or :mod:`scratchvae.kernels` (the same
computations fused into single passes by Numba); ``fused`` chooses.
"""
from __future__ import annotations

import math

import numpy

from . import losses
from .backend import flat_views
from .choices import LIKELIHOODS
from .fused import kernels as fused_kernels
from .layers.base import gather_params, walk
from .objectives import ELBO
from .priors import StandardNormal

__all__ = ["VAE", "Autoencoder", "ModelBase", "NonFiniteLoss", "LIKELIHOODS", "batch_total_of", "check_loss_weights"]

ACTIVE_UNIT_THRESHOLD = 0.01   # Burda et al. (2015): a latent dimension is active when Var_x(E_q[z_j]) > 0.01
_LOG_2PI = math.log(2 * math.pi)


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

    def noise_shape(self, B: int) -> tuple:
        """The shape of one batch's eps, which the trainer draws for the model: (B, L)."""
        return (int(B), self.latent_dim)

    def _noise(self, B, rng, eps):
        """One batch's eps, shaped by :meth:`noise_shape`: the given one (checked), or standard normal from
        ``rng``."""
        shape = self.noise_shape(B)
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

    def evaluate(self, x, rng, batch_size: int | None = None) -> dict:
        """Negative ELBO (beta = 1, no free bits), recon and KL: per-example means over ``x``.

        No gradients are computed. ``rng`` is a generator of the model's
        backend, drawing one eps per example (a single-sample estimate).
        Returns host floats ``{"loss", "recon", "kl"}``; for a VAE also, per
        latent dimension (host float64 arrays (L,)), posterior collapse made
        visible: ``kl_per_dim``, the analytic ``mean_x KL(q(z_j | x) || N(0, 1))``
        (None for a prior without a per-dimension KL: the KL is then the
        one-sample estimate ``log q(z|x) - log p(z)``);
        ``activity``, Burda et al.'s ``Cov_x(E_q[z_j | x]) = Var_x(mu_j)``; and
        ``active_units``, the dimensions whose activity exceeds 0.01.
        """
        x = self._checked_input(x)
        if batch_size is None:   # sized for the device: a GPU wants large batches, a CPU its caches
            batch_size = 10_000 if self.backend.name == "cupy" else 1000
        totals, kl_dims, mus = numpy.zeros(2), numpy.zeros(self.latent_dim), []
        comps = self._prior_components() if hasattr(self, "prior") else None   # once, for every chunk
        for start in range(0, x.shape[0], batch_size):
            recon, kl, mu = self._eval_terms(x[start:start + batch_size], rng, comps=comps)   # (b,), (b, L) or (b, 1)
            totals += [float(recon.sum()), float(kl.sum(axis=1).sum()) if kl is not None else 0.0]
            if mu is not None:
                if kl.shape[1] == self.latent_dim:
                    kl_dims += self.backend.asnumpy(kl.sum(axis=0)).astype(numpy.float64)
                mus.append(self.backend.asnumpy(mu).astype(numpy.float64))
        recon, kl = totals / x.shape[0]
        out = {"loss": recon + kl, "recon": recon, "kl": kl}
        if mus:
            activity = numpy.concatenate(mus).var(axis=0)                      # (L,)
            out.update(kl_per_dim=kl_dims / x.shape[0] if self.prior.analytic else None, activity=activity,
                       active_units=int((activity > ACTIVE_UNIT_THRESHOLD).sum()))
        return out

    def _mean_image(self, out):
        return losses.sigmoid(out) if self.likelihood == "bernoulli" else out

    def decode(self, z):
        """Mean image of p(x | z): probabilities for Bernoulli, the mean for Gaussian.

        z : (B, L) -> (B, D)
        """
        z = self.backend.asarray(z, dtype=self.dtype)
        if z.ndim != 2 or z.shape[1] != self.latent_dim or z.shape[0] < 1:
            raise ValueError(f"z has shape {tuple(z.shape)}, expected (B, {self.latent_dim}) with B >= 1")
        lo, hi = float(z.min()), float(z.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("z contains NaN or Inf values")
        return self._mean_image(self.parts["decoder"].forward(z))

    def sample(self, n: int, rng):
        """Decode ``n`` draws from the prior N(0, I): (n, D) mean images.

        ``rng`` is a generator of the model's backend (``backend.rng(seed)``).
        """
        z = rng.standard_normal((int(n), self.latent_dim), dtype=self.dtype)  # (n, L)
        return self.decode(self.backend.asarray(z, dtype=self.dtype))

    def reconstruct(self, x):
        """Decode the encoder's mean code: (B, D) -> (B, D) mean images."""
        mu, _ = self.encode(self._checked_input(x))
        return self.decode(mu)


class VAE(ModelBase):
    """A variational autoencoder with a diagonal Gaussian posterior.

    Parameters
    ----------
    encoder : Layer
        (B, D) -> (B, H).
    mu_head, log_sigma_head : Dense
        (B, H) -> (B, L): the posterior mean and log standard deviation.
    decoder : Layer
        (B, L) -> (B, D): Bernoulli logits or the Gaussian mean.
    likelihood : {"bernoulli", "gaussian"}
    input_shape : tuple
        (C, H, W) or (D,): the shape of one example; D = prod(input_shape).
    gaussian_log_sigma : "learned" or float
        For the Gaussian likelihood: a learned per-pixel log standard
        deviation (parameter ``decoder.out_log_sigma``, shape (D,)) or a fixed one.
    fused : bool
        Compute the loss with the fused Numba kernels (default) or plain array code.

    ``params`` and ``grads`` are flat dicts keyed ``encoder.*``, ``mu.*``,
    ``log_sigma.*`` and ``decoder.*``.
    """

    def __init__(self, encoder, mu_head, log_sigma_head, decoder, *, likelihood="bernoulli", input_shape=(784,),
                 gaussian_log_sigma="learned", fused=True, prior=None, objective=None):
        if mu_head.out_features != log_sigma_head.out_features:
            raise ValueError("mu and log_sigma heads must have the same number of outputs")
        parts = {"encoder": encoder, "mu": mu_head, "log_sigma": log_sigma_head, "decoder": decoder}
        self.prior = StandardNormal() if prior is None else prior
        self.objective = ELBO() if objective is None else objective
        if self.prior.parametric:     # its parameters (the pseudo-inputs) train with the model's
            parts["prior"] = self.prior
            for layer in walk(encoder):
                if hasattr(layer, "input_grad"):
                    layer.input_grad = True   # the pseudo-inputs' gradient comes through the encoder's input
                    break
        super().__init__(parts, likelihood=likelihood, input_shape=input_shape, latent_dim=mu_head.out_features,
                         gaussian_log_sigma=gaussian_log_sigma, fused=fused)
        self.encoder, self.mu_head, self.log_sigma_head, self.decoder = encoder, mu_head, log_sigma_head, decoder

    def sample(self, n: int, rng):
        """Decode ``n`` draws from the prior (N(0, I), or the VampPrior's mixture): (n, D) mean images."""
        z = self.prior.sample(n, rng, self._prior_components(), self.latent_dim, self.dtype)   # (n, L)
        return self.decode(self.backend.asarray(z, dtype=self.dtype))

    @property
    def samples(self) -> int:
        """Latents drawn per image by the objective (eps is (B, L), or (B, S, L) for S > 1)."""
        return self.objective.samples

    def noise_shape(self, B: int) -> tuple:
        """The shape of one batch's eps: (B, L), or (B, S, L) for an objective of S > 1 samples."""
        return (int(B), self.latent_dim) if self.samples == 1 else (int(B), self.samples, self.latent_dim)

    def _prior_components(self, h_pseudo=None):
        """The prior's mixture components: the VampPrior's (mu_k, log_sigma_k) at the pseudo-inputs."""
        if not self.prior.parametric:
            return None
        h = self.encoder.forward(self.prior.pseudo_inputs()) if h_pseudo is None else h_pseudo
        return self.mu_head.forward(h), self.log_sigma_head.forward(h)

    def encode(self, x):
        """Posterior parameters: x (B, D) -> mu (B, L), log_sigma (B, L)."""
        h = self.encoder.forward(self._as_input(x))
        return self.mu_head.forward(h), self.log_sigma_head.forward(h)

    def loss_and_grad(self, x, rng=None, eps=None, beta=1.0, free_bits=0.0, check_data=True, sync=True,
                      x_in=None, batch_total=None, reduce=None):
        """Negative ELBO in nats per example; accumulates its gradient into ``grads``.

        A plain call, ``loss_and_grad(x, eps=eps)`` (and ``beta``,
        ``free_bits``), runs exactly the forward and backward lines of the
        module docstring. The other arguments are for the trainer, and the
        lines marked ``# trainer:`` are theirs: ``check_data=False`` skips
        the data check (the trainer validated the data set once),
        ``sync=False`` keeps the results on the device (no host read in a
        step), ``x_in`` feeds a denoising model's encoder, and
        ``batch_total`` and ``reduce`` make ``x`` one shard of a data-parallel
        batch.

        Parameters
        ----------
        x : array (B, D) or (B, C, H, W)
            A batch; in [0, 1] for the Bernoulli likelihood.
        rng : generator of the model's backend, optional
            Draws ``eps`` when it is not given.
        eps : array (B, L), optional
            Fixed standard-normal noise (tests pass it).
        beta : float
            Weight of the KL term (beta-VAE; 1 is the ELBO).
        free_bits : float
            Per-dimension KL floor in nats (Kingma et al. 2016): the loss uses
            ``sum_j max(free_bits, mean_b KL_bj)``; a dimension under the floor
            gets no KL gradient. 0 turns it off.
        check_data : bool
            Check x for NaN/Inf and range (one reduction); the trainer
            validates the whole data set once and turns this off.
        sync : bool
            True: return host floats and raise :class:`NonFiniteLoss` at
            once (each costs a device-to-host read). False: return 0-d arrays
            on the model's backend and leave the finiteness check to the
            caller (the trainer checks every few steps), so the step queues
            its work without waiting for the device.
        x_in : array, shape of ``x``, optional
            What the encoder sees, when it is not ``x`` itself: a corrupted
            copy for a denoising model, whose reconstruction is scored against
            the clean ``x``.
        batch_total : int, optional
            Data parallelism (:mod:`scratchvae.distributed`): ``x`` is one
            shard of a batch of ``batch_total`` examples. Sums over the shard
            are divided by ``batch_total`` instead of ``B``, so the gradients,
            ``recon`` and ``kl`` are this shard's share of the whole batch's
            means, and summing them over the shards gives those means.
        reduce : callable, optional
            With ``batch_total`` and free bits: sums an (L,) array over the
            shards (an all-reduce), so that a dimension's activity is decided
            from the whole batch's KL; ``kl_term`` is then the whole batch's.

        Returns
        -------
        loss : float (0-d array with ``sync=False``)
            ``mean_b recon + beta * KL term``.
        stats : dict
            ``recon`` and ``kl`` (per-example means, nats), ``kl_term`` (the
            KL as it enters the loss, after free bits), ``kl_per_dim`` (L,)
            (a host float64 array, or the device array with ``sync=False``).
        """
        x = self._checked_input(x) if check_data else self._as_input(x)           # trainer: check_data
        x_in = x if x_in is None else self._encoder_input(x_in, x, check_data)   # trainer: denoising input
        check_loss_weights(beta, free_bits)
        B = x.shape[0]
        n = batch_total_of(B, batch_total)                   # the examples the means are over (trainer: a shard's batch)
        eps = self._noise(B, rng, eps)                     # (B, L), or (B, S, L)
        if not (self.prior.analytic and self.samples == 1):   # a sampled KL: another prior, or the IWAE
            if free_bits > 0:
                raise ValueError("free bits need the analytic per-dimension KL of the standard prior and the ELBO")
            return self._sampled_loss_and_grad(x, x_in, eps, beta, n, sync)

        # forward
        h = self.encoder.forward(x_in)                     # (B, H)
        mu = self.mu_head.forward(h)                       # (B, L)
        log_sigma = self.log_sigma_head.forward(h)         # (B, L)
        z, kl = self.ops.reparameterize_kl(mu, log_sigma, eps)   # (B, L), (B, L)
        out = self.decoder.forward(z)                      # (B, D)
        nll, dout, dout_log_sigma = self._nll_and_grad(out, x, 1.0 / n)   # (B,), (B, D), (D,) or None
        kl_per_dim = kl.sum(axis=0) / n                    # (L,)
        recon, kl_mean = nll.sum() / n, kl_per_dim.sum()   # 0-d, on the backend
        if sync:                                           # trainer: sync=False reads nothing back here
            recon, kl_mean = float(recon), float(kl_mean)
            self._raise_if_not_finite(recon, kl_mean, mu, log_sigma)
        # free bits decide a dimension's activity from the whole batch's KL (trainer: summed over the shards)
        batch_kl = reduce(kl_per_dim) if (reduce is not None and free_bits > 0) else kl_per_dim   # (L,)
        kl_term, kl_weight = self._kl_term_and_weight(batch_kl, beta, free_bits, n)   # 0-d, (L,)
        if sync:                                           # trainer
            kl_term = float(kl_term)

        # backward
        if self._learn_out_log_sigma:
            self.grads["decoder.out_log_sigma"] += dout_log_sigma
        dz = self.decoder.backward(dout)                   # (B, L)
        dmu, dlog_sigma = self.ops.reparameterize_kl_backward(dz, mu, log_sigma, eps, kl_weight)
        dh = self.mu_head.backward(dmu)                    # (B, H)
        dh += self.log_sigma_head.backward(dlog_sigma)
        self.encoder.backward(dh)

        # this shard's share of the batch's loss (the whole loss for a whole batch): the ranks' shares sum to
        # it; free bits summed over the shards make kl_term the whole batch's, so a shard takes B / n of it
        whole_batch_kl = reduce is not None and free_bits > 0
        loss = recon + beta * (kl_term * (B / n) if whole_batch_kl else kl_term)
        per_dim = self.backend.asnumpy(kl_per_dim).astype(numpy.float64) if sync else kl_per_dim   # trainer
        return loss, {"loss": loss, "recon": recon, "kl": kl_mean, "kl_term": kl_term, "kl_per_dim": per_dim}

    def _sampled_loss_and_grad(self, x, x_in, eps, beta, n, sync):
        """The loss with a sampled KL, ``log q(z|x) - log p(z)``, for any prior and objective.

        With S samples per image (eps (B, S, L), or (B, L) for S = 1) and the
        per-sample terms ``c_bs = nll_bs + beta (log q(z_bs|x_b) - log p(z_bs))``,
        the objective gives ``loss_b`` and ``v_bs = dloss_b/dc_bs``
        (:mod:`scratchvae.objectives`). Backward, with ``c'_bs = v_bs / n``::

            d out_bs    = c'_bs * dnll_bs/d out_bs                 the decoder, on all B*S rows at once
            dz_bs       = decoder.backward(d out) + prior's  -beta c'_bs dlog p/dz_bs
            log q(z_bs | x_b) = -0.5 |eps_bs|^2 - sum_j log_sigma_bj - 0.5 L log(2 pi)
                        at z = mu + sigma eps: its total derivative is 0 in mu and -1 in each log_sigma_j
            dmu_b       = sum_s dz_bs
            dlog_sigma_b = sum_s dz_bs * sigma_b * eps_bs - beta sum_s c'_bs
            the VampPrior's components (the encoder at the pseudo-inputs) get the prior's gradients, through
            the same encoder pass as the batch, down to the pseudo-inputs.
        """
        xp, B, L, S = self.xp, x.shape[0], self.latent_dim, self.samples
        eps3 = eps.reshape(B, S, L)
        # forward: the encoder sees the batch and, for the VampPrior, the pseudo-inputs below it
        pseudo = self.prior.pseudo_inputs() if self.prior.parametric else None
        h = self.encoder.forward(x_in if pseudo is None else xp.concatenate([x_in, pseudo.astype(self.dtype)]))
        mu_all, log_sigma_all = self.mu_head.forward(h), self.log_sigma_head.forward(h)     # (B [+ K], L)
        mu, log_sigma = mu_all[:B], log_sigma_all[:B]
        comps = None if pseudo is None else (mu_all[B:], log_sigma_all[B:])               # (K, L) each
        sigma = xp.exp(log_sigma)                                                          # (B, L)
        z = (mu[:, None, :] + sigma[:, None, :] * eps3).reshape(B * S, L)                  # (B*S, L)
        out = self.decoder.forward(z)                                                      # (B*S, D)
        x_rep = x if S == 1 else xp.broadcast_to(x[:, None, :], (B, S, x.shape[1])).reshape(B * S, x.shape[1])
        nll, dout, dout_log_sigma = self._nll_and_grad(out, x_rep, 1.0)                    # (B*S,), (B*S, D)
        log_q = (-0.5 * (eps3 * eps3).sum(axis=2) - log_sigma.sum(axis=1)[:, None]
                 - 0.5 * L * _LOG_2PI)                                                     # (B, S)
        log_p = self.prior.log_prob(z, comps).reshape(B, S)                                # (B, S)
        kl = log_q - log_p                                                                 # (B, S)
        loss_b, v = self.objective.reduce(nll.reshape(B, S) + beta * kl, xp)               # (B,), (B, S)
        loss, recon, kl_mean = loss_b.sum() / n, nll.sum() / (n * S), kl.sum() / (n * S)
        if sync:
            loss, recon, kl_mean = float(loss), float(recon), float(kl_mean)
            self._raise_if_not_finite(recon, kl_mean, mu, log_sigma)
        # backward
        c = (v / n).astype(self.dtype)                                                     # (B, S)
        dout *= c.reshape(B * S, 1)
        if self._learn_out_log_sigma:   # d sum_rows c_row nll_row / d out_log_sigma_d = sum c - sum c r^2 e^{-2 ls}
            r = out - x_rep
            self.grads["decoder.out_log_sigma"] += (c.sum() - (c.reshape(B * S, 1) * r * r).sum(axis=0)
                                                    * xp.exp(-2 * self.out_log_sigma))
        dz = self.decoder.backward(dout)                                                   # (B*S, L)
        dz_prior, dcomps = self.prior.log_prob_backward(z, comps, -beta * c.reshape(B * S))
        dz3 = (dz + dz_prior).reshape(B, S, L)
        dmu = dz3.sum(axis=1)                                                              # (B, L)
        dlog_sigma = (dz3 * eps3).sum(axis=1) * sigma - beta * c.sum(axis=1)[:, None]      # (B, L)
        if dcomps is not None:
            dmu, dlog_sigma = xp.concatenate([dmu, dcomps[0]]), xp.concatenate([dlog_sigma, dcomps[1]])
        dh = self.mu_head.backward(dmu)
        dh += self.log_sigma_head.backward(dlog_sigma)
        dx = self.encoder.backward(dh)
        if pseudo is not None:
            self.prior.pseudo_inputs_backward(dx[B:])
        # a sampled KL has no per-dimension split: zeros (on the device for an unsynced step)
        stats = {"loss": loss, "recon": recon, "kl": kl_mean, "kl_term": kl_mean,
                 "kl_per_dim": numpy.zeros(L) if sync else xp.zeros(L, dtype=self.dtype)}
        return loss, stats

    def _raise_if_not_finite(self, recon, kl_mean, mu, log_sigma):
        """NonFiniteLoss naming the term (and, for the KL, the ranges of mu and log_sigma)."""
        bad = []
        if not math.isfinite(kl_mean):
            bad.append(f"the KL term is {kl_mean} (log_sigma in [{float(log_sigma.min()):g}, "
                       f"{float(log_sigma.max()):g}], mu in [{float(mu.min()):g}, {float(mu.max()):g}])")
        if not math.isfinite(recon):
            bad.append(f"the reconstruction term (-log p(x|z), {self.likelihood}) is {recon}")
        if bad:
            raise NonFiniteLoss("; ".join(bad))

    def _kl_term_and_weight(self, kl_per_dim, beta, free_bits, B):
        """The KL as it enters the loss (0-d, on the backend), and each dimension's KL-gradient weight (L,).

        Without free bits: ``sum_j KL_j`` and ``beta / B`` everywhere. With
        free bits lambda: ``sum_j max(lambda, KL_j)``, and dimensions at the
        floor get no KL gradient.
        """
        xp = self.xp
        if free_bits > 0:
            active = kl_per_dim > free_bits                # (L,) dims above the floor get gradients
            return xp.maximum(kl_per_dim, free_bits).sum(), (beta / B) * active.astype(self.dtype)
        return kl_per_dim.sum(), xp.full((self.latent_dim,), beta / B, dtype=self.dtype)

    def _eval_terms(self, x, rng, eps=None, comps=None):
        """-log p(x|z) (B,) for one z per example, the KL and mu (B, L); no gradients. The KL is the
        analytic one per dimension (B, L) for the standard prior, else the one-sample estimate
        ``log q(z|x) - log p(z)`` as (B, 1)."""
        mu, log_sigma = self.encode(x)
        if eps is None:
            eps = rng.standard_normal(mu.shape, dtype=self.dtype)
        z, kl = losses.reparameterize_kl(mu, log_sigma, self.backend.asarray(eps, dtype=self.dtype))
        if not self.prior.analytic:
            comps = self._prior_components() if comps is None else comps
            log_q = -0.5 * (eps * eps).sum(axis=1) - log_sigma.sum(axis=1) - 0.5 * self.latent_dim * _LOG_2PI
            kl = (log_q - self.prior.log_prob(z, comps))[:, None]
        return -self._log_px(self.decoder.forward(z), x), kl, mu

    def elbo(self, x, rng=None, eps=None):
        """Per-example ELBO, (B,) host float64 (no gradients, beta = 1)."""
        recon, kl, _ = self._eval_terms(self._checked_input(x), rng, eps)
        return self.backend.asnumpy(-(recon + kl.sum(axis=1))).astype(numpy.float64)

    def iwae_bound(self, x, k: int, rng, max_elements: int | None = None):
        """Importance-weighted lower bound on log p(x) (Burda et al. 2015).

        For each example, with z_i ~ q(z | x), i = 1..k::

            log w_i = log p(x | z_i) + log p(z_i) - log q(z_i | x)
            bound   = logsumexp_i(log w_i) - log k

        computed with a streaming (running-max) logsumexp over chunks of
        samples, so that k = 5000 fits in memory: at most ``max_elements``
        decoder outputs (chunk * B * D) are alive at once.

        Parameters
        ----------
        x : array (B, D)
        k : int
            Number of importance samples; k = 1 gives the ELBO.
        rng : generator of the model's backend

        Returns
        -------
        bound : host float64 array (B,), nats. The test NLL quoted in papers
        is ``-mean(bound)`` with k = 5000.
        """
        if isinstance(k, bool) or not isinstance(k, (int, numpy.integer)) or k < 1:
            raise ValueError(f"iwae_bound: k must be an integer >= 1, got {k!r}")
        xp = self.xp
        x = self._checked_input(x)
        if max_elements is None:   # 64 MB of float32 decoder outputs on the CPU, 512 MB on a GPU
            max_elements = 2 ** 27 if self.backend.name == "cupy" else 2 ** 24
        B, L = x.shape[0], self.latent_dim
        comps = self._prior_components()                    # the VampPrior's (mu_k, log_sigma_k), else None
        mu, log_sigma = self.encode(x)                      # (B, L)
        sigma = xp.exp(log_sigma)
        chunk = max(1, min(k, max_elements // max(1, B * self.input_dim)))
        run_max = xp.full((B,), -xp.inf, dtype=xp.float64)
        run_sum = xp.zeros((B,), dtype=xp.float64)
        x_rep = None
        done = 0
        while done < k:
            c = min(chunk, k - done)
            eps = rng.standard_normal((c, B, L), dtype=self.dtype)          # (c, B, L)
            z = mu + sigma * eps                                            # (c, B, L)
            out = self.decoder.forward(z.reshape(c * B, L))                 # (c*B, D)
            if x_rep is None or x_rep.shape[0] != c * B:
                x_rep = xp.broadcast_to(x, (c, B, self.input_dim)).reshape(c * B, self.input_dim)
            log_px = self._log_px(out, x_rep).reshape(c, B)                 # (c, B)
            log_pz = self.prior.log_prob(z.reshape(c * B, L), comps).reshape(c, B)   # (c, B)
            log_qz = -0.5 * (eps * eps).sum(axis=2) - log_sigma.sum(axis=1) - 0.5 * L * _LOG_2PI
            log_w = (log_px + log_pz - log_qz).astype(xp.float64)          # (c, B)
            new_max = xp.maximum(run_max, log_w.max(axis=0))
            run_sum = run_sum * xp.exp(run_max - new_max) + xp.exp(log_w - new_max).sum(axis=0)
            run_max = new_max
            done += c
        bound = run_max + xp.log(run_sum) - math.log(k)
        return self.backend.asnumpy(bound)


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

    def _eval_terms(self, x, rng, eps=None, comps=None):
        code, _ = self.encode(x)
        return -self._log_px(self.decoder.forward(code), x), None, None   # no KL, no posterior

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
