"""A VAE with a stack of stochastic levels (the VampPrior paper's HVAE, for any depth), its loss written once.

Levels are numbered from the data up: z_1 is the lowest, z_T the top. With
shapes for B images, S samples per image (R = B S rows) and Z dimensions per
level::

    inference, top-down       q(z_T | x)            = N(mu_T(x), sigma_T(x))
                              q(z_l | x, z_{l+1})   = N(mu_l(x, z_{l+1}), sigma_l(x, z_{l+1}))    l < T
    generative model          p(z_T)                = the prior object (standard normal or VampPrior)
                              p(z_l | z_{l+1})      = N(m_l(z_{l+1}), s_l(z_{l+1}))                l < T
                              p(x | z_1, ..., z_T)  = the likelihood of decoder(z_1, ..., z_T)

Every network that conditions on two things (``q(z_l | x, z_{l+1})``, the
decoder) runs one branch on each, concatenates their outputs and runs a
joint layer on the result. Every log standard deviation is clamped to
[-3, 1] (the log variance to [-6, 2], the paper's recipe).

**The loss, once.** :meth:`HierarchicalVAE._log_weights` computes the
per-sample terms of ``-log w`` for any depth::

    c_r = nll_r + beta * sum_l [ log q(z_l | .) - log p(z_l | z_{l+1}) ]      (p(z_T | z_{T+1}) is p(z_T))

and the objective (ELBO, IWAE) reduces ``c`` to the loss and the weights
``v = dloss/dc`` (:mod:`scratchvae.objectives`). Training, evaluation and
:meth:`iwae_bound` all go through it. The KL of every level is the sampled
one (the difference of the two log densities at the drawn z), for every
prior and depth.

**The gradient.** With ``c'_r = v_r / n``, at z = mu + sigma eps with eps fixed::

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
"""
from __future__ import annotations

import math

import numpy

from .layers.base import walk
from .objectives import ELBO
from .priors import StandardNormal
from .vae import ACTIVE_UNIT_THRESHOLD, ModelBase, NonFiniteLoss, batch_total_of, check_loss_weights

__all__ = ["HierarchicalVAE"]

_LOG_2PI = math.log(2 * math.pi)


class HierarchicalVAE(ModelBase):
    """A VAE of ``levels`` stochastic levels; built by :func:`scratchvae.models.hierarchical_vae`.

    ``parts`` maps names to layers: ``q{T}.x`` (the top inference network on x), for each l < T
    ``q{l}.x``, ``q{l}.z``, ``q{l}.joint`` (the inference network on x and z_{l+1}) and ``p{l}.net``
    (the conditional prior's network on z_{l+1}), for every level ``q{l}.mu``, ``q{l}.log_sigma`` and for
    l < T ``p{l}.mu``, ``p{l}.log_sigma`` (heads; the log-sigma heads end in a clamp), ``decoder.z{l}``
    (the decoder's branch on z_l) and ``decoder`` (the joint layers down to the logits or mean).
    """

    def __init__(self, parts: dict, levels: int, *, prior=None, objective=None, likelihood="bernoulli",
                 input_shape=(784,), gaussian_log_sigma="learned", fused=True):
        self.levels = int(levels)
        self.prior = StandardNormal() if prior is None else prior
        self.objective = ELBO() if objective is None else objective
        if self.prior.parametric:   # the pseudo-inputs train with the model, through the top encoder's input
            parts["prior"] = self.prior
            next(layer for layer in walk(parts[f"q{self.levels}.x"]) if hasattr(layer, "input_grad")).input_grad = True
        super().__init__(parts, likelihood=likelihood, input_shape=input_shape,
                         latent_dim=parts["q1.mu"].out_features, gaussian_log_sigma=gaussian_log_sigma, fused=fused)

    @property
    def samples(self) -> int:
        return self.objective.samples

    def noise_shape(self, B: int) -> tuple:
        """The shape of one batch's eps: (B, S, levels, Z) (level 1 first)."""
        return (int(B), self.samples, self.levels, self.latent_dim)

    # -- the networks ------------------------------------------------------------------------
    def _heads(self, name, h):
        return self.parts[f"{name}.mu"].forward(h), self.parts[f"{name}.log_sigma"].forward(h)

    def _heads_backward(self, name, dmu, dlog_sigma):
        dh = self.parts[f"{name}.mu"].backward(dmu)
        dh += self.parts[f"{name}.log_sigma"].backward(dlog_sigma)
        return dh

    def _q_top(self, x):
        """q(z_T | x): mu, log_sigma (rows of x)."""
        return self._heads(f"q{self.levels}", self.parts[f"q{self.levels}.x"].forward(x))

    def _q_level(self, l, hx, z_above):
        """q(z_l | x, z_{l+1}) for l < T: ``hx`` is the x-branch's output repeated to z_above's rows."""
        hz = self.parts[f"q{l}.z"].forward(z_above)
        return self._heads(f"q{l}", self.parts[f"q{l}.joint"].forward(self.xp.concatenate([hx, hz], axis=1)))

    def _p_level(self, l, z_above):
        """p(z_l | z_{l+1}) for l < T: m, log_s."""
        return self._heads(f"p{l}", self.parts[f"p{l}.net"].forward(z_above))

    def _decode_logits(self, zs):
        """decoder(z_1, ..., z_T): logits or the Gaussian mean, (R, D)."""
        h = self.xp.concatenate([self.parts[f"decoder.z{l}"].forward(z) for l, z in enumerate(zs, 1)], axis=1)
        return self.parts["decoder"].forward(h)

    def _prior_components(self):
        """The VampPrior's components: q(z_T | u_k) at the pseudo-inputs (None for the standard prior)."""
        return self._q_top(self.prior.pseudo_inputs()) if self.prior.parametric else None

    # -- the loss, written once ----------------------------------------------------------------
    def _log_weights(self, x, eps, beta, comps=None, pseudo=None):
        """Forward pass of every level: the per-sample terms and what the backward pass needs.

        x (B, D), eps (B, S, T, Z). Returns ``nll`` (R,), ``kl`` (R,) (the sampled
        ``sum_l log q - log p``), ``c = nll + beta kl`` (R,), and the cache.
        With ``pseudo`` (the VampPrior's pseudo-inputs, (K, D)) the top
        encoder runs on x and them in one pass, and ``comps`` is computed here.
        """
        xp, T = self.xp, self.levels
        B, S, _, Z = eps.shape
        R = B * S
        top_in = x if pseudo is None else xp.concatenate([x, pseudo.astype(self.dtype)])
        mu_all, ls_all = self._q_top(top_in)                                       # (B [+ K], Z)
        if pseudo is not None:
            comps = (mu_all[B:], ls_all[B:])
        mu_t, ls_t = mu_all[:B], ls_all[:B]
        sig_t = xp.exp(ls_t)
        z = {T: (mu_t[:, None, :] + sig_t[:, None, :] * eps[:, :, T - 1, :]).reshape(R, Z)}
        log_q = (-0.5 * (eps * eps).sum(axis=(2, 3)).reshape(R) - xp.repeat(ls_t.sum(axis=1), S)
                 - 0.5 * T * Z * _LOG_2PI)                                          # (R,), every level's
        log_p = self.prior.log_prob(z[T], comps)                                    # (R,)
        hx, q, p = {}, {}, {}
        for l in range(T - 1, 0, -1):
            hx[l] = self.parts[f"q{l}.x"].forward(x)                                # (B, H)
            mu, ls = self._q_level(l, xp.repeat(hx[l], S, axis=0), z[l + 1])          # (R, Z)
            z[l] = mu + xp.exp(ls) * eps[:, :, l - 1, :].reshape(R, Z)
            log_q -= ls.sum(axis=1)
            m, log_s = self._p_level(l, z[l + 1])
            d = (z[l] - m) * xp.exp(-log_s)
            log_p += -0.5 * (d * d).sum(axis=1) - log_s.sum(axis=1) - 0.5 * Z * _LOG_2PI
            q[l], p[l] = ls, (log_s, d)
        out = self._decode_logits([z[l] for l in range(1, T + 1)])                  # (R, D)
        x_rep = x if S == 1 else xp.repeat(x, S, axis=0)
        nll, dout, dout_log_sigma = self._nll_and_grad(out, x_rep, 1.0)             # (R,), (R, D)
        kl = log_q - log_p
        cache = dict(B=B, S=S, eps=eps, z=z, q=q, p=p, sig_t=sig_t, comps=comps, out=out, x_rep=x_rep,
                     dout=dout, dout_log_sigma=dout_log_sigma, mu_t=mu_t, ls_t=ls_t)
        return nll, kl, nll + beta * kl, cache

    def _log_weights_backward(self, c1, beta, cache):
        """Accumulate the gradient of ``sum_r c1_r c_r`` into ``grads``; returns dLoss/d(pseudo-inputs) or None."""
        xp, T = self.xp, self.levels
        B, S, eps, z, q, p = (cache[k] for k in ("B", "S", "eps", "z", "q", "p"))
        R, Z = B * S, self.latent_dim
        dout = cache["dout"] * c1[:, None]
        if self._learn_out_log_sigma:   # d sum_r c1_r nll_r / d out_log_sigma_d = sum c1 - sum c1 r^2 e^{-2 ls}
            r = cache["out"] - cache["x_rep"]
            self.grads["decoder.out_log_sigma"] += (c1.sum() - (c1[:, None] * r * r).sum(axis=0)
                                                    * xp.exp(-2 * self.out_log_sigma))
        dh = self.parts["decoder"].backward(dout)                                   # (R, T H)
        width = dh.shape[1] // T
        dz = {l: self.parts[f"decoder.z{l}"].backward(xp.ascontiguousarray(dh[:, (l - 1) * width:l * width]))
              for l in range(1, T + 1)}
        a = (beta * c1)[:, None]                                                    # (R, 1)
        for l in range(1, T):                                   # bottom-up: dz_l is complete when level l is reached
            ls, (log_s, d) = q[l], p[l]
            g = d * xp.exp(-log_s)                                                  # (z - m) / s^2
            dz[l] += a * g                                                          # -beta c1 dlog p/dz
            dz[l + 1] += self._p_backward(l, -a * g, -a * (d * d - 1))
            dmu = dz[l]
            dls = dz[l] * xp.exp(ls) * eps[:, :, l - 1, :].reshape(R, Z) - a       # reparameterization, log q
            dhj = self.parts[f"q{l}.joint"].backward(self._heads_backward(f"q{l}", dmu, dls))   # (R, 2H)
            hw = dhj.shape[1] // 2
            dz[l + 1] += self.parts[f"q{l}.z"].backward(xp.ascontiguousarray(dhj[:, hw:]))
            dhx = dhj[:, :hw].reshape(B, S, hw).sum(axis=1)                         # the x-branch saw each x S times
            self.parts[f"q{l}.x"].backward(dhx)
        dz_prior, dcomps = self.prior.log_prob_backward(z[T], cache["comps"], -beta * c1)
        dz3 = (dz[T] + dz_prior).reshape(B, S, Z)
        dmu_t = dz3.sum(axis=1)                                                     # (B, Z)
        dls_t = (dz3 * eps[:, :, T - 1, :]).sum(axis=1) * cache["sig_t"] - beta * c1.reshape(B, S).sum(axis=1)[:, None]
        if dcomps is not None:
            dmu_t, dls_t = xp.concatenate([dmu_t, dcomps[0]]), xp.concatenate([dls_t, dcomps[1]])
        dx = self.parts[f"q{T}.x"].backward(self._heads_backward(f"q{T}", dmu_t, dls_t))
        return None if dcomps is None else dx[B:]

    def _p_backward(self, l, dm, dlog_s):
        return self.parts[f"p{l}.net"].backward(self._heads_backward(f"p{l}", dm, dlog_s))

    def loss_and_grad(self, x, rng=None, eps=None, beta=1.0, free_bits=0.0, check_data=True, sync=True,
                      x_in=None, batch_total=None, reduce=None):
        """The objective's loss in nats per example; accumulates its gradient into ``grads``.

        ``rng`` (a generator of the model's backend) draws the noise of every
        level, or ``eps`` (B, S, levels, Z) gives it; ``beta`` weights every
        level's KL. The other arguments are the trainer's, as for
        :meth:`scratchvae.vae.VAE.loss_and_grad` (free bits and a separate
        encoder input are not offered for a hierarchy).
        """
        if free_bits > 0:
            raise ValueError("free bits need the analytic per-dimension KL of a one-level model")
        if x_in is not None:
            raise ValueError("a hierarchical VAE does not train as a denoising model (x_in)")
        x = self._checked_input(x) if check_data else self._as_input(x)
        check_loss_weights(beta, free_bits)
        B = x.shape[0]
        n = batch_total_of(B, batch_total)
        eps = self._noise(B, rng, eps)
        pseudo = self.prior.pseudo_inputs() if self.prior.parametric else None
        nll, kl, c, cache = self._log_weights(x, eps, beta, pseudo=pseudo)
        S = self.samples
        loss_b, v = self.objective.reduce(c.reshape(B, S), self.xp)                 # (B,), (B, S)
        loss, recon, kl_mean = loss_b.sum() / n, nll.sum() / (n * S), kl.sum() / (n * S)
        if sync:
            loss, recon, kl_mean = float(loss), float(recon), float(kl_mean)
            bad = [f"the {what} is {value}" for what, value in
                   (("KL term (every level's log q - log p)", kl_mean), (f"reconstruction term ({self.likelihood})",
                                                                          recon)) if not math.isfinite(value)]
            if bad:
                raise NonFiniteLoss("; ".join(bad))
        du = self._log_weights_backward((v / n).astype(self.dtype).reshape(B * S), beta, cache)
        if du is not None:
            self.prior.pseudo_inputs_backward(du)
        per_dim = numpy.zeros(self.latent_dim) if sync else self.xp.zeros(self.latent_dim, dtype=self.dtype)
        return loss, {"loss": loss, "recon": recon, "kl": kl_mean, "kl_term": kl_mean, "kl_per_dim": per_dim}

    # -- evaluation --------------------------------------------------------------------------
    def encode_levels(self, x):
        """Every level's posterior mean, top-down through the means: [mu_1, ..., mu_T], each (B, Z)."""
        x = self._as_input(x)
        mu, _ = self._q_top(x)
        mus = {self.levels: mu}
        for l in range(self.levels - 1, 0, -1):
            mus[l], _ = self._q_level(l, self.parts[f"q{l}.x"].forward(x), mus[l + 1])
        return [mus[l] for l in range(1, self.levels + 1)]

    def encode(self, x):
        """The top level's posterior: x (B, D) -> mu_T, log_sigma_T (the figures' latent space)."""
        return self._q_top(self._as_input(x))

    def decode(self, z):
        """Mean image for a top-level code z_T (B, Z), the levels below at their conditional prior means."""
        z = self.backend.asarray(z, dtype=self.dtype)
        if z.ndim != 2 or z.shape[1] != self.latent_dim or z.shape[0] < 1:
            raise ValueError(f"z has shape {tuple(z.shape)}, expected (B, {self.latent_dim}) with B >= 1")
        return self._decode_chain(z, None)

    def _decode_chain(self, z_top, rng):
        """Down the conditional priors from z_T: their means (rng None) or draws; the mean image."""
        zs = {self.levels: z_top}
        for l in range(self.levels - 1, 0, -1):
            m, log_s = self._p_level(l, zs[l + 1])
            zs[l] = m if rng is None else m + self.xp.exp(log_s) * self.backend.asarray(
                rng.standard_normal(m.shape, dtype=self.dtype))
        return self._mean_image(self._decode_logits([zs[l] for l in range(1, self.levels + 1)]))

    def sample(self, n: int, rng):
        """Ancestral samples, top-down: z_T ~ p(z_T), z_l ~ p(z_l | z_{l+1}), the mean image of p(x | z)."""
        z = self.prior.sample(n, rng, self._prior_components(), self.latent_dim, self.dtype)
        return self._decode_chain(self.backend.asarray(z, dtype=self.dtype), rng)

    def reconstruct(self, x):
        """Decode the posterior means of every level."""
        return self._mean_image(self._decode_logits(self.encode_levels(self._checked_input(x))))

    def evaluate(self, x, rng, batch_size: int | None = None) -> dict:
        """Negative ELBO (one sample, beta = 1), recon and KL (every level's), per-example means; and per level,
        bottom first, Burda et al.'s activity ``Var_x(mu_l)`` and the active units (a list)."""
        x = self._checked_input(x)
        batch_size = batch_size or (10_000 if self.backend.name == "cupy" else 1000)
        comps = self._prior_components()
        sums, mus = numpy.zeros(2), [[] for _ in range(self.levels)]
        for start in range(0, x.shape[0], batch_size):
            xb = x[start:start + batch_size]
            eps = rng.standard_normal((xb.shape[0], 1, self.levels, self.latent_dim), dtype=self.dtype)
            nll, kl, _, _ = self._log_weights(xb, eps, 1.0, comps=comps)
            sums += [float(nll.sum()), float(kl.sum())]
            for l, mu in enumerate(self.encode_levels(xb)):
                mus[l].append(self.backend.asnumpy(mu).astype(numpy.float64))
        recon, kl = sums / x.shape[0]
        activity = [numpy.concatenate(m).var(axis=0) for m in mus]
        return {"loss": recon + kl, "recon": recon, "kl": kl, "kl_per_dim": None, "activity": activity,
                "active_units": [int((a > ACTIVE_UNIT_THRESHOLD).sum()) for a in activity]}

    def elbo(self, x, rng=None, eps=None):
        """Per-example ELBO, (B,) host float64 (one sample, no gradients)."""
        x = self._checked_input(x)
        eps = self._noise(x.shape[0], rng, eps) if self.samples == 1 else \
            rng.standard_normal((x.shape[0], 1, self.levels, self.latent_dim), dtype=self.dtype)
        nll, kl, _, _ = self._log_weights(x, eps, 1.0, comps=self._prior_components())
        return self.backend.asnumpy(-(nll + kl)).astype(numpy.float64)

    def iwae_bound(self, x, k: int, rng, max_elements: int | None = None):
        """``logsumexp_i log w_i - log k`` over k samples of every level (Burda et al.), (B,) host float64,
        streamed over chunks of samples so that k = 5000 fits in memory."""
        if isinstance(k, bool) or not isinstance(k, (int, numpy.integer)) or k < 1:
            raise ValueError(f"iwae_bound: k must be an integer >= 1, got {k!r}")
        xp, x = self.xp, self._checked_input(x)
        max_elements = max_elements or (2 ** 27 if self.backend.name == "cupy" else 2 ** 24)
        B, comps = x.shape[0], self._prior_components()
        chunk = max(1, min(k, max_elements // max(1, B * self.input_dim)))
        run_max, run_sum, done = xp.full((B,), -xp.inf), xp.zeros((B,)), 0
        while done < k:
            c = min(chunk, k - done)
            eps = rng.standard_normal((c, B, self.levels, self.latent_dim), dtype=self.dtype).transpose(1, 0, 2, 3)
            eps = xp.ascontiguousarray(eps)                        # (B, c, T, Z): sample-major draws, so chunks
                                                                   # of any size see the same samples
            nll, kl, _, _ = self._log_weights(x, eps, 1.0, comps=comps)
            log_w = (-(nll + kl)).astype(xp.float64).reshape(B, c)
            new_max = xp.maximum(run_max, log_w.max(axis=1))
            run_sum = run_sum * xp.exp(run_max - new_max) + xp.exp(log_w - new_max[:, None]).sum(axis=1)
            run_max, done = new_max, done + c
        return self.backend.asnumpy(run_max + xp.log(run_sum) - math.log(k))
