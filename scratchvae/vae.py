"""The variational autoencoder: a stack of stochastic levels, its loss written once with the hand-written
gradient, and the importance-weighted bound (:mod:`scratchvae.models` builds them: ``mlp_vae``,
``gated_vae``, ``conv_vae`` with one level, ``hierarchical_vae`` with any number).

One training step of the one-level model, in the order :meth:`VAE.loss_and_grad` runs it (shapes for a
batch of B flat images with D pixels and a latent of L dimensions)::

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

**Levels.** A model of T levels numbers them from the data up: z_1 is the lowest, z_T the top, and the
parts above are the top level's (``encoder``, ``mu``, ``log_sigma``). With S samples per image (R = B S
rows) and Z dimensions per level::

    inference, top-down       q(z_T | x)            = N(mu_T(x), sigma_T(x))
                              q(z_l | x, z_{l+1})   = N(mu_l(x, z_{l+1}), sigma_l(x, z_{l+1}))    l < T
    generative model          p(z_T)                = the prior object (standard normal, VampPrior, ...)
                              p(z_l | z_{l+1})      = N(m_l(z_{l+1}), s_l(z_{l+1}))                l < T
                              p(x | z_1, ..., z_T)  = the likelihood of decoder(z_1, ..., z_T)

A network that conditions on two things (``q(z_l | x, z_{l+1})``, a branched decoder) runs one branch on
each, concatenates their outputs and runs a joint layer on the result.

**The loss, once.** :meth:`VAE._log_weights` computes the per-sample terms of ``-log w`` for any depth::

    c_r = nll_r + beta * sum_l [ log q(z_l | .) - log p(z_l | z_{l+1}) ]      (p(z_T | z_{T+1}) is p(z_T))

and the objective (ELBO, IWAE) reduces ``c`` to the loss and the weights ``v = dloss/dc``
(:mod:`scratchvae.objectives`). Training, evaluation and :meth:`VAE.iwae_bound` all go through it. Its one
special case is the closed form: one level, a prior with an analytic KL (the standard normal) and one
sample replace the sampled ``log q - log p`` by ``sum_j KL_j`` above (lower variance; free bits need it).

**The gradient** of the sampled terms, with ``c'_r = v_r / n``, at z = mu + sigma eps with eps fixed::

    log q(z | .)  = -0.5 |eps|^2 - sum_j log_sigma_j - const
                    total derivative: 0 in mu, -1 in each log_sigma_j
    log N(z; m, s)            d/dz = -(z - m) / s^2,   d/dm = (z - m) / s^2,
                              d/dlog s = (z - m)^2 / s^2 - 1
    d out_r       = c'_r dnll_r/d out_r                         decoder, all R rows
    dz_l         += decoder branch l's backward                 (the concatenation splits the gradient)
    dz_l         += beta c'_r (z_l - m_l) / s_l^2               (l < T; the top's from the prior object)
    dm_l, dlog s_l = -beta c'_r (z_l - m_l) / s_l^2,  -beta c'_r ((z_l - m_l)^2 / s_l^2 - 1)
    dz_{l+1}     += p-network l's backward(dm_l, dlog s_l)
    dmu_l         = dz_l                                        (complete once level l-1 is done: bottom-up)
    dlog_sigma_l  = dz_l sigma_l eps_l - beta c'_r
    dz_{l+1}     += q-network l's z-branch backward; the x-branch sums its S rows of gradient
    top level     : dmu_T = sum_s dz_T, dlog_sigma_T = sum_s (dz_T eps_T) sigma_T - beta sum_s c'

The loss terms and their gradients come from :mod:`scratchvae.losses` (plain array code, the readable
ground truth) or :mod:`scratchvae.kernels` (the same computations fused into single passes by Numba);
``fused`` chooses.
"""
from __future__ import annotations

import math

import numpy

from .layers.base import walk
from .model_base import ACTIVE_UNIT_THRESHOLD, ModelBase, NonFiniteLoss, batch_total_of, check_loss_weights
from .objectives import ELBO
from .priors import StandardNormal

__all__ = ["VAE"]

_LOG_2PI = math.log(2 * math.pi)


class VAE(ModelBase):
    """A variational autoencoder with diagonal Gaussian posteriors on one or more stochastic levels.

    Parameters
    ----------
    encoder : Layer
        (B, D) -> (B, H): the top level's inference network on x.
    mu_head, log_sigma_head : Layer
        (B, H) -> (B, L): the top level's posterior mean and log standard deviation.
    decoder : Layer
        (B, L) -> (B, D): Bernoulli logits or the Gaussian mean; with branches (``decoder.z{l}`` in
        ``lower_levels``), the joint layers after the branches' concatenation.
    lower_levels : dict, optional
        The networks of the levels below the top (see :func:`scratchvae.models.hierarchical_vae`):
        for l < T ``q{l}.x``, ``q{l}.z``, ``q{l}.joint``, ``q{l}.mu``, ``q{l}.log_sigma``, ``p{l}.net``,
        ``p{l}.mu``, ``p{l}.log_sigma``, and the decoder's branches ``decoder.z{l}`` for every level.
    likelihood : {"bernoulli", "gaussian"}
    input_shape : tuple
        (C, H, W) or (D,): the shape of one example; D = prod(input_shape).
    gaussian_log_sigma : "learned" or float
        For the Gaussian likelihood: a learned per-pixel log standard
        deviation (parameter ``decoder.out_log_sigma``, shape (D,)) or a fixed one.
    fused : bool
        Compute the loss with the fused Numba kernels (default) or plain array code.
    prior, objective : optional
        The prior on the top level (:mod:`scratchvae.priors`; N(0, I) by default) and the objective
        (:mod:`scratchvae.objectives`; the ELBO by default).

    ``params`` and ``grads`` are flat dicts keyed ``encoder.*``, ``mu.*``, ``log_sigma.*``, the lower
    levels' names, ``decoder.*`` and ``prior.*``.
    """

    def __init__(self, encoder, mu_head, log_sigma_head, decoder, *, lower_levels=None, likelihood="bernoulli",
                 input_shape=(784,), gaussian_log_sigma="learned", fused=True, prior=None, objective=None):
        if mu_head.out_features != log_sigma_head.out_features:
            raise ValueError("mu and log_sigma heads must have the same number of outputs")
        parts = {"encoder": encoder, "mu": mu_head, "log_sigma": log_sigma_head, **(lower_levels or {}),
                 "decoder": decoder}
        self.levels = 1 + sum(name.startswith("p") and name.endswith(".mu") for name in parts)
        self.branched = "decoder.z1" in parts   # the decoder reads every level through a branch
        self.prior = StandardNormal() if prior is None else prior
        self.objective = ELBO() if objective is None else objective
        if self.prior.params:     # its parameters (the pseudo-inputs) train with the model's
            parts["prior"] = self.prior
        self.prior_reads_encoder = self.prior.encoder_inputs() is not None   # the VampPrior's components
        if self.prior_reads_encoder:   # the pseudo-inputs' gradient comes through the encoder's input
            next(layer for layer in walk(encoder) if hasattr(layer, "input_grad")).input_grad = True
        super().__init__(parts, likelihood=likelihood, input_shape=input_shape, latent_dim=mu_head.out_features,
                         gaussian_log_sigma=gaussian_log_sigma, fused=fused)
        self.encoder, self.mu_head, self.log_sigma_head, self.decoder = encoder, mu_head, log_sigma_head, decoder
        # the one-level model with a closed-form KL (the standard normal prior) keeps it (lower variance)
        self.closed_form_kl = self.levels == 1 and self.prior.analytic

    @property
    def samples(self) -> int:
        """Latents drawn per image by the objective."""
        return self.objective.samples

    def noise_shape(self, B: int) -> tuple:
        """The shape of one batch's eps: (B, L), or (B, S, L) for S > 1 samples; (B, S, T, L) for T > 1
        levels (level 1 first)."""
        if self.levels > 1:
            return (int(B), self.samples, self.levels, self.latent_dim)
        return (int(B), self.latent_dim) if self.samples == 1 else (int(B), self.samples, self.latent_dim)

    # -- the networks ------------------------------------------------------------------------
    def _heads(self, name, h):
        return self.parts[f"{name}mu"].forward(h), self.parts[f"{name}log_sigma"].forward(h)

    def _heads_backward(self, name, dmu, dlog_sigma):
        dh = self.parts[f"{name}mu"].backward(dmu)
        dh += self.parts[f"{name}log_sigma"].backward(dlog_sigma)
        return dh

    def encode(self, x):
        """The top level's posterior: x (B, D) -> mu (B, L), log_sigma (B, L) (the figures' latent space)."""
        return self._heads("", self.encoder.forward(self._as_input(x)))

    def _q_level(self, l, hx, z_above):
        """q(z_l | x, z_{l+1}) for l < T: ``hx`` is the x-branch's output repeated to z_above's rows."""
        hz = self.parts[f"q{l}.z"].forward(z_above)
        return self._heads(f"q{l}.", self.parts[f"q{l}.joint"].forward(self.xp.concatenate([hx, hz], axis=1)))

    def _p_level(self, l, z_above):
        """p(z_l | z_{l+1}) for l < T: m, log_s."""
        return self._heads(f"p{l}.", self.parts[f"p{l}.net"].forward(z_above))

    def _p_backward(self, l, dm, dlog_s):
        return self.parts[f"p{l}.net"].backward(self._heads_backward(f"p{l}.", dm, dlog_s))

    def _decode_logits(self, z):
        """decoder(z_1, ..., z_T) for z = {l: z_l}: logits or the Gaussian mean, (R, D)."""
        if not self.branched:
            return self.decoder.forward(z[1])
        return self.decoder.forward(self.xp.concatenate(
            [self.parts[f"decoder.z{l}"].forward(z[l]) for l in range(1, self.levels + 1)], axis=1))

    def _decode_backward(self, dout):
        """The decoder's backward pass: dz_l for every level, {l: (R, L)}."""
        dh = self.decoder.backward(dout)
        if not self.branched:
            return {1: dh}
        width = dh.shape[1] // self.levels
        return {l: self.parts[f"decoder.z{l}"].backward(self.xp.ascontiguousarray(dh[:, (l - 1) * width:l * width]))
                for l in range(1, self.levels + 1)}

    def prior_components(self):
        """What the prior reads from the model: the top posterior ``(mu_k, log_sigma_k)`` (K, L) each at
        the prior's encoder inputs (the VampPrior's K components, at its pseudo-inputs), or None."""
        if not self.prior_reads_encoder:
            return None
        return self._heads("", self.encoder.forward(self.prior.encoder_inputs().astype(self.dtype)))

    # -- the loss, written once ----------------------------------------------------------------
    def _log_weights(self, x, x_in, eps, *, closed_form, n=None, comps=None, with_prior_inputs=False):
        """Forward pass of every level: the per-sample terms and what the backward pass needs.

        x (B, D) is scored, x_in (B, D) is what the encoders see; eps (B, S, T, Z). Returns ``nll`` (R,),
        ``kl`` (R,) (the sampled ``sum_l log q - log p``, or with ``closed_form`` the one level's
        ``sum_j KL_j``) and the cache. With ``n`` (the examples the loss's mean is over) the likelihood's
        gradient pass runs too: scaled by 1 / n for one sample per image (every row's weight in the loss is
        then 1 / n: one pass, no rescaling), unscaled for more (the objective weighs the rows); without,
        values only. With ``with_prior_inputs`` the top encoder runs on x_in and the prior's
        encoder inputs in one pass, and ``comps`` is computed here.
        """
        xp, T = self.xp, self.levels
        B, S, _, Z = eps.shape
        R = B * S
        u = self.prior.encoder_inputs() if with_prior_inputs and self.prior_reads_encoder else None
        mu_all, ls_all = self._heads("", self.encoder.forward(x_in if u is None else
                                                              xp.concatenate([x_in, u.astype(self.dtype)])))
        if u is not None:
            comps = (mu_all[B:], ls_all[B:])                                       # (K, Z) each
        mu_t, ls_t = mu_all[:B], ls_all[:B]                                         # (B, Z)
        cache = dict(B=B, S=S, eps=eps, comps=comps, mu_t=mu_t, ls_t=ls_t, q={}, p={})
        if closed_form:                               # z = mu + sigma eps and KL(q || N(0, I)) per dimension
            z_top, kl_dims = self.ops.reparameterize_kl(mu_t, ls_t, eps[:, 0, 0, :])   # (B, Z) each
            z = {1: z_top}
            kl = cache["kl_dims"] = kl_dims
        else:
            sig_t = cache["sig_t"] = xp.exp(ls_t)
            z = {T: (mu_t[:, None, :] + sig_t[:, None, :] * eps[:, :, T - 1, :]).reshape(R, Z)}
            log_q = (-0.5 * (eps * eps).sum(axis=(2, 3)).reshape(R) - xp.repeat(ls_t.sum(axis=1), S)
                     - 0.5 * T * Z * _LOG_2PI)                                      # (R,), every level's
            log_p = self.prior.log_prob(z[T], comps)                                # (R,)
            for l in range(T - 1, 0, -1):
                hx = self.parts[f"q{l}.x"].forward(x_in)                            # (B, H)
                mu, ls = self._q_level(l, xp.repeat(hx, S, axis=0), z[l + 1])       # (R, Z)
                z[l] = mu + xp.exp(ls) * eps[:, :, l - 1, :].reshape(R, Z)
                log_q -= ls.sum(axis=1)
                m, log_s = self._p_level(l, z[l + 1])
                d = (z[l] - m) * xp.exp(-log_s)
                log_p += -0.5 * (d * d).sum(axis=1) - log_s.sum(axis=1) - 0.5 * Z * _LOG_2PI
                cache["q"][l], cache["p"][l] = ls, (log_s, d)
            kl = log_q - log_p
        cache["z"] = z
        out = self._decode_logits(z)                                                # (R, D)
        x_rep = x if S == 1 else xp.repeat(x, S, axis=0)
        if n is None:
            return -self._log_px(out, x_rep), kl, cache
        nll, cache["dout"], cache["dout_log_sigma"] = self._nll_and_grad(out, x_rep, 1.0 / n if S == 1 else 1.0)
        cache.update(out=out, x_rep=x_rep)
        return nll, kl, cache

    def _log_weights_backward(self, c1, beta, cache, kl_weight=None):
        """Accumulate into ``grads`` the gradient of ``sum_r c1_r c_r`` (for one sample per image the
        likelihood's gradient pass already applied c1 = 1 / n); with ``kl_weight`` (L,), of the closed form's
        ``mean_b nll_b + sum_j kl_weight_j sum_b KL_bj`` instead. Returns dLoss/d(the prior's encoder
        inputs), or None."""
        xp, T = self.xp, self.levels
        B, S, eps, z, q, p = cache["B"], cache["S"], cache["eps"], cache["z"], cache["q"], cache["p"]
        R, Z = B * S, self.latent_dim
        if S == 1:
            dout = cache["dout"]
            if self._learn_out_log_sigma:
                self.grads["decoder.out_log_sigma"] += cache["dout_log_sigma"]
        else:
            dout = cache["dout"] * c1[:, None]
            if self._learn_out_log_sigma:   # d sum_r c1_r nll_r / d out_log_sigma_d = sum c1 - sum c1 r^2 e^{-2 ls}
                r = cache["out"] - cache["x_rep"]
                self.grads["decoder.out_log_sigma"] += (c1.sum() - (c1[:, None] * r * r).sum(axis=0)
                                                        * xp.exp(-2 * self.out_log_sigma))
        dz = self._decode_backward(dout)                                            # {l: (R, Z)}
        if kl_weight is not None:                     # the closed form's backward, one fused pass
            dmu_t, dls_t = self.ops.reparameterize_kl_backward(dz[1], cache["mu_t"], cache["ls_t"],
                                                               eps[:, 0, 0, :], kl_weight)
            self.encoder.backward(self._heads_backward("", dmu_t, dls_t))
            return None
        a = (beta * c1)[:, None]                                                    # (R, 1)
        for l in range(1, T):                                   # bottom-up: dz_l is complete when level l is reached
            ls, (log_s, d) = q[l], p[l]
            g = d * xp.exp(-log_s)                                                  # (z - m) / s^2
            dz[l] += a * g                                                          # -beta c1 dlog p/dz
            dz[l + 1] += self._p_backward(l, -a * g, -a * (d * d - 1))
            dls = dz[l] * xp.exp(ls) * eps[:, :, l - 1, :].reshape(R, Z) - a       # reparameterization, log q
            dhj = self.parts[f"q{l}.joint"].backward(self._heads_backward(f"q{l}.", dz[l], dls))   # (R, 2H)
            hw = dhj.shape[1] // 2
            dz[l + 1] += self.parts[f"q{l}.z"].backward(xp.ascontiguousarray(dhj[:, hw:]))
            self.parts[f"q{l}.x"].backward(dhj[:, :hw].reshape(B, S, hw).sum(axis=1))   # it saw each x S times
        dz_prior, dcomps = self.prior.log_prob_backward(z[T], cache["comps"], -beta * c1)
        dz3 = (dz[T] + dz_prior).reshape(B, S, Z)
        dmu_t = dz3.sum(axis=1)                                                     # (B, Z)
        dls_t = (dz3 * eps[:, :, T - 1, :]).sum(axis=1) * cache["sig_t"] - beta * c1.reshape(B, S).sum(axis=1)[:, None]
        if dcomps is not None:
            dmu_t, dls_t = xp.concatenate([dmu_t, dcomps[0]]), xp.concatenate([dls_t, dcomps[1]])
        dx = self.encoder.backward(self._heads_backward("", dmu_t, dls_t))
        return None if dcomps is None else dx[B:]

    def loss_and_grad(self, x, rng=None, eps=None, beta=1.0, free_bits=0.0, check_data=True, sync=True,
                      x_in=None, batch_total=None, reduce=None):
        """The objective's loss in nats per example (the negative ELBO by default); accumulates its
        gradient into ``grads``.

        A plain call, ``loss_and_grad(x, eps=eps)`` (and ``beta``, ``free_bits``), runs the forward and
        backward lines of the module docstring. The other arguments are for the trainer:
        ``check_data=False`` skips the data check (the trainer validated the data set once),
        ``sync=False`` keeps the results on the device (no host read in a step), ``x_in`` feeds a
        denoising model's encoders, and ``batch_total`` and ``reduce`` make ``x`` one shard of a
        data-parallel batch.

        Parameters
        ----------
        x : array (B, D) or (B, C, H, W)
            A batch; in [0, 1] for the Bernoulli likelihood.
        rng : generator of the model's backend, optional
            Draws ``eps`` when it is not given.
        eps : array of :meth:`noise_shape` (B), optional
            Fixed standard-normal noise (tests pass it).
        beta : float
            Weight of every level's KL term (beta-VAE, a KL warm-up; 1 is the bound).
        free_bits : float
            Per-dimension KL floor in nats (Kingma et al. 2016), for the closed-form KL only: the loss
            uses ``sum_j max(free_bits, mean_b KL_bj)``; a dimension under the floor gets no KL
            gradient. 0 turns it off.
        check_data : bool
            Check x for NaN/Inf and range (one reduction).
        sync : bool
            True: return host floats and raise :class:`~scratchvae.model_base.NonFiniteLoss` at once
            (each costs a device-to-host read). False: return 0-d arrays on the model's backend and
            leave the finiteness check to the caller, so the step queues its work without waiting.
        x_in : array, shape of ``x``, optional
            What the encoders see, when it is not ``x`` itself: a corrupted copy for a denoising model,
            whose reconstruction is scored against the clean ``x``.
        batch_total : int, optional
            ``x`` is one shard of a batch of ``batch_total`` examples (:mod:`scratchvae.distributed`):
            sums over the shard are divided by ``batch_total``, so that the shards' results sum to the
            whole batch's.
        reduce : callable, optional
            With ``batch_total`` and free bits: sums an (L,) array over the shards (an all-reduce).

        Returns
        -------
        loss : float (0-d array with ``sync=False``)
        stats : dict
            ``recon`` and ``kl`` (per-example means, nats), ``kl_term`` (the KL as it enters the loss,
            after free bits), ``kl_per_dim`` (L,) (zeros for a sampled KL).
        """
        x = self._checked_input(x) if check_data else self._as_input(x)           # trainer: check_data
        x_in = x if x_in is None else self._encoder_input(x_in, x, check_data)   # trainer: denoising input
        check_loss_weights(beta, free_bits)
        B, S = x.shape[0], self.samples
        n = batch_total_of(B, batch_total)                  # the examples the means are over (trainer: a shard's batch)
        eps = self._noise(B, rng, eps).reshape(B, S, self.levels, self.latent_dim)
        closed_form = self.closed_form_kl and S == 1
        if free_bits > 0 and not closed_form:
            raise ValueError("free bits need the closed-form per-dimension KL: one level, the standard prior "
                             "and the ELBO")
        nll, kl, cache = self._log_weights(x, x_in, eps, closed_form=closed_form, n=n, with_prior_inputs=True)
        if closed_form:
            kl_per_dim = kl.sum(axis=0) / n                 # (L,)
            recon, kl_mean = nll.sum() / n, kl_per_dim.sum()
        else:
            loss_b, v = self.objective.reduce((nll + beta * kl).reshape(B, S), self.xp)   # (B,), (B, S)
            loss, recon, kl_mean = loss_b.sum() / n, nll.sum() / (n * S), kl.sum() / (n * S)
        if sync:                                            # trainer: sync=False reads nothing back here
            recon, kl_mean = float(recon), float(kl_mean)
            self._raise_if_not_finite(recon, kl_mean, cache["mu_t"], cache["ls_t"])
        if closed_form:
            # free bits decide a dimension's activity from the whole batch's KL (trainer: summed over the shards)
            batch_kl = reduce(kl_per_dim) if (reduce is not None and free_bits > 0) else kl_per_dim   # (L,)
            kl_term, kl_weight = self._kl_term_and_weight(batch_kl, beta, free_bits, n)   # 0-d, (L,)
            whole_batch_kl = reduce is not None and free_bits > 0   # a shard takes B / n of the batch's KL term
            kl_term = float(kl_term) if sync else kl_term
            loss = recon + beta * (kl_term * (B / n) if whole_batch_kl else kl_term)
            self._log_weights_backward(None, beta, cache, kl_weight)
            per_dim = self.backend.asnumpy(kl_per_dim).astype(numpy.float64) if sync else kl_per_dim
            return loss, {"loss": loss, "recon": recon, "kl": kl_mean, "kl_term": kl_term, "kl_per_dim": per_dim}
        loss = float(loss) if sync else loss
        du = self._log_weights_backward((v / n).astype(self.dtype).reshape(B * S), beta, cache)
        if du is not None:
            self.prior.encoder_inputs_backward(du)
        per_dim = numpy.zeros(self.latent_dim) if sync else self.xp.zeros(self.latent_dim, dtype=self.dtype)
        return loss, {"loss": loss, "recon": recon, "kl": kl_mean, "kl_term": kl_mean, "kl_per_dim": per_dim}

    def _raise_if_not_finite(self, recon, kl_mean, mu, log_sigma):
        """NonFiniteLoss naming the term (and, for the KL, the ranges of the top level's mu and log_sigma)."""
        bad = []
        if not math.isfinite(kl_mean):
            bad.append(f"the KL term is {kl_mean} (log_sigma in [{float(log_sigma.min()):g}, "
                       f"{float(log_sigma.max()):g}], mu in [{float(mu.min()):g}, {float(mu.max()):g}])")
        if not math.isfinite(recon):
            bad.append(f"the reconstruction term (-log p(x|z), {self.likelihood}) is {recon}")
        if bad:
            raise NonFiniteLoss("; ".join(bad))

    def _kl_term_and_weight(self, kl_per_dim, beta, free_bits, B):
        """The closed-form KL as it enters the loss (0-d, on the backend), and each dimension's
        KL-gradient weight (L,).

        Without free bits: ``sum_j KL_j`` and ``beta / B`` everywhere. With
        free bits lambda: ``sum_j max(lambda, KL_j)``, and dimensions at the
        floor get no KL gradient.
        """
        xp = self.xp
        if free_bits > 0:
            active = kl_per_dim > free_bits                # (L,) dims above the floor get gradients
            return xp.maximum(kl_per_dim, free_bits).sum(), (beta / B) * active.astype(self.dtype)
        return kl_per_dim.sum(), xp.full((self.latent_dim,), beta / B, dtype=self.dtype)

    # -- evaluation --------------------------------------------------------------------------
    def _one_sample(self, B, rng, eps=None):
        """eps for one sample per image, (B, 1, T, L): given as (B, L) for one level or (B, 1, T, L), or drawn."""
        shape = (B, self.latent_dim) if self.levels == 1 else (B, 1, self.levels, self.latent_dim)
        return self._noise(B, rng, eps, shape).reshape(B, 1, self.levels, self.latent_dim)

    def evaluate(self, x, rng, batch_size: int | None = None) -> dict:
        """Negative ELBO (one sample, beta = 1, no free bits), recon and KL (every level's): per-example
        means over ``x``, no gradients. ``rng`` (a generator of the model's backend) draws the noise.

        Returns host floats ``{"loss", "recon", "kl"}`` and, posterior collapse made visible,
        ``kl_per_dim`` (L,), the closed-form ``mean_x KL(q(z_j | x) || N(0, 1))`` (None for a sampled KL),
        Burda et al.'s ``activity`` ``Var_x(E_q[z_j | x])`` and ``active_units``, the dimensions whose
        activity exceeds 0.01: an (L,) array and an int for one level, lists over the levels (bottom
        first) for more.
        """
        x = self._checked_input(x)
        if batch_size is None:
            batch_size = self.eval_chunk()
        comps = self.prior_components()                     # once, for every chunk
        sums, kl_dims, mus = numpy.zeros(2), numpy.zeros(self.latent_dim), [[] for _ in range(self.levels)]
        for start in range(0, x.shape[0], batch_size):
            xb = x[start:start + batch_size]
            nll, kl, cache = self._log_weights(xb, xb, self._one_sample(xb.shape[0], rng),
                                               closed_form=self.closed_form_kl, comps=comps)   # (b,), (b, L) or (b,)
            sums += [float(nll.sum()), float(kl.sum())]
            if self.closed_form_kl:
                kl_dims += self.backend.asnumpy(kl.sum(axis=0)).astype(numpy.float64)
            for l, mu in enumerate(self._level_means(xb, cache["mu_t"])):   # the top encoder ran once, above
                mus[l].append(self.backend.asnumpy(mu).astype(numpy.float64))
        recon, kl = sums / x.shape[0]
        activity = [numpy.concatenate(m).var(axis=0) for m in mus]      # (L,) per level
        active = [int((a > ACTIVE_UNIT_THRESHOLD).sum()) for a in activity]
        return {"loss": recon + kl, "recon": recon, "kl": kl,
                "kl_per_dim": kl_dims / x.shape[0] if self.closed_form_kl else None,
                "activity": activity[0] if self.levels == 1 else activity,
                "active_units": active[0] if self.levels == 1 else active}

    def elbo(self, x, rng=None, eps=None):
        """Per-example ELBO, (B,) host float64 (one sample, no gradients, beta = 1)."""
        x = self._checked_input(x)
        nll, kl, _ = self._log_weights(x, x, self._one_sample(x.shape[0], rng, eps), closed_form=self.closed_form_kl,
                                       comps=self.prior_components())
        return self.backend.asnumpy(-(nll + (kl.sum(axis=1) if self.closed_form_kl else kl))).astype(numpy.float64)

    def iwae_bound(self, x, k: int, rng, max_elements: int | None = None):
        """Importance-weighted lower bound on log p(x) (Burda et al. 2015).

        For each example, with k samples of every level from q::

            log w_i = log p(x | z_i) + sum_l [log p(z_l,i | z_l+1,i) - log q(z_l,i | .)]
            bound   = logsumexp_i(log w_i) - log k

        computed with a streaming (running-max) logsumexp over chunks of samples, so that k = 5000 fits
        in memory: at most ``max_elements`` decoder outputs (chunk * B * D) are alive at once. k = 1 is
        the ELBO with a sampled KL. Returns host float64 (B,), nats; the test NLL quoted in papers is
        ``-mean(bound)`` with k = 5000.
        """
        if isinstance(k, bool) or not isinstance(k, (int, numpy.integer)) or k < 1:
            raise ValueError(f"iwae_bound: k must be an integer >= 1, got {k!r}")
        xp, x = self.xp, self._checked_input(x)
        if max_elements is None:   # 64 MB of float32 decoder outputs on the CPU, 512 MB on a GPU
            max_elements = 2 ** 27 if self.backend.name == "cupy" else 2 ** 24
        B, comps = x.shape[0], self.prior_components()
        chunk = max(1, min(k, max_elements // max(1, B * self.input_dim)))
        run_max, run_sum, done = xp.full((B,), -xp.inf), xp.zeros((B,)), 0
        while done < k:
            c = min(chunk, k - done)
            eps = rng.standard_normal((c, B, self.levels, self.latent_dim), dtype=self.dtype)
            eps = xp.ascontiguousarray(eps.transpose(1, 0, 2, 3))   # (B, c, T, L): sample-major draws, so
                                                                    # chunks of any size see the same samples
            nll, kl, _ = self._log_weights(x, x, eps, closed_form=False, comps=comps)
            log_w = (-(nll + kl)).astype(xp.float64).reshape(B, c)
            new_max = xp.maximum(run_max, log_w.max(axis=1))
            run_sum = run_sum * xp.exp(run_max - new_max) + xp.exp(log_w - new_max[:, None]).sum(axis=1)
            run_max, done = new_max, done + c
        return self.backend.asnumpy(run_max + xp.log(run_sum) - math.log(k))

    # -- codes and images ------------------------------------------------------------------------
    def encode_levels(self, x):
        """Every level's posterior mean, top-down through the means: [mu_1, ..., mu_T], each (B, L)."""
        x = self._as_input(x)
        return self._level_means(x, self.encode(x)[0])

    def _level_means(self, x, mu_top):
        """[mu_1, ..., mu_T] from x (B, D) and the top level's posterior mean mu_T (B, L)."""
        mus = {self.levels: mu_top}
        for l in range(self.levels - 1, 0, -1):
            mus[l], _ = self._q_level(l, self.parts[f"q{l}.x"].forward(x), mus[l + 1])
        return [mus[l] for l in range(1, self.levels + 1)]

    def decode(self, z):
        """Mean image for a top-level code z_T (B, L), the levels below at their conditional prior means:
        probabilities for Bernoulli, the mean for Gaussian, (B, D)."""
        return self._decode_chain(self._checked_code(z), None)

    def _decode_chain(self, z_top, rng):
        """Down the conditional priors from z_T: their means (rng None) or draws; the mean image."""
        zs = {self.levels: z_top}
        for l in range(self.levels - 1, 0, -1):
            m, log_s = self._p_level(l, zs[l + 1])
            zs[l] = m if rng is None else m + self.xp.exp(log_s) * self.backend.asarray(
                rng.standard_normal(m.shape, dtype=self.dtype))
        return self._mean_image(self._decode_logits(zs))

    def sample(self, n: int, rng):
        """Ancestral samples, top-down: z_T ~ p(z_T) (N(0, I), or the VampPrior's mixture),
        z_l ~ p(z_l | z_{l+1}), the mean image of p(x | z): (n, D)."""
        z = self.prior.sample(n, rng, self.prior_components(), self.latent_dim, self.dtype)   # (n, L)
        return self._decode_chain(self._checked_code(z), rng)

    def reconstruct(self, x):
        """Decode the posterior means of every level: (B, D) -> (B, D) mean images."""
        return self._mean_image(self._decode_logits(dict(enumerate(self.encode_levels(self._checked_input(x)), 1))))
