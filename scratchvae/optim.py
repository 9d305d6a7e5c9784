"""Adam (Kingma & Ba 2015, Algorithm 1) with decoupled weight decay (AdamW).

Everything about Adam is in this file: the update rule in plain array code
(:func:`adam_update`, the readable ground truth), the scalars every
implementation shares (:func:`adam_coefficients`, defined with the folding of
the bias corrections in :mod:`scratchvae.adam_scalars`, which the fused
kernels import too, so that they need not import the optimizer), the typed state
(:class:`AdamState`) and the optimizer that dispatches to the fused kernel
(:class:`Adam`). The optimizer object holds only hyperparameters; its state
is plain arrays, so it is checkpointed and restored as it is::

    opt = Adam(lr=1e-3)
    state = opt.init(model.params)
    ...
    state = opt.step(model.params, model.grads, state)   # updates params in place

One step, for every parameter ``p`` with gradient ``g``, at step ``t >= 1``::

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g**2
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    p = p - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p)

With ``normalize_grads=True`` each parameter's gradient is first divided by
its own L2 norm, ``g = g / (||g||_2 + 1e-7)`` (the VampPrior authors' code
trains with this variant, its ``AdamNormGrad``): every step then has the
same size in every tensor whatever the loss's scale, so a rare batch with a
huge gradient (a mixture prior's component far from a sample) moves the
moments no more than any other.

**Subnormal numbers.** A parameter whose gradient stays zero (a weight of an
always-blank border pixel, a dead ReLU unit) has moments that decay by
``beta1`` and ``beta2`` every step until they reach the subnormal range
(below 1.2e-38 in float32), where x86 CPUs compute in microcode, 10 to 30
times slower: a run's Adam step then slows down as the run ages. Every
implementation here therefore keeps its values out of that range: a moment
smaller than ``moment_floor`` (the smallest normal number times 2**24) is
stored as 0, and a gradient entry so small that ``(1 - beta2) g**2`` would be
subnormal counts as 0. Both floors are about 30 orders of magnitude below
anything that moves a parameter (the step is ``m_hat / (sqrt(v_hat) + eps)``
with ``eps = 1e-8``), so the trajectory is Algorithm 1's wherever its values
are normal. scratchvae never changes the processor's floating-point mode
(flush-to-zero): the user's process computes as it did.

The fused one-pass kernels are ``scratchvae.kernels.adam_update`` and
``adam_update_many`` (all parameters in one call), imported on first use.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

from .adam_scalars import adam_coefficients
from .backend import array_module, flat_views
from .fused import kernels as fused_kernels
from .validation import check_adam_arrays

__all__ = ["Adam", "AdamState", "adam_update", "adam_coefficients", "check_adam_arrays", "geometric_lr", "normalized"]


class AdamState(NamedTuple):
    """Adam's state: the step count and the two moment estimates per parameter name."""

    step: int     # steps taken (0 before the first)
    m: dict       # name -> first moment, shaped and typed like the parameter
    v: dict       # name -> second moment


def adam_update(param, grad, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
    """One AdamW step in plain array code, in place on ``param``, ``m`` and ``v``.

    Algorithm 1 of Kingma & Ba (2015) with bias correction and ``eps`` added
    after the square root, plus decoupled weight decay (Loshchilov & Hutter)::

        m     = beta1 m + (1 - beta1) g
        v     = beta2 v + (1 - beta2) g**2
        mhat  = m / (1 - beta1**t),   vhat = v / (1 - beta2**t)
        param = param - lr (mhat / (sqrt(vhat) + eps) + weight_decay param)

    where the decay term uses ``param`` from before this step, and values
    below the floors of :func:`adam_coefficients` count as 0 (see the
    module's note on subnormal numbers).

    Parameters
    ----------
    param : array, any shape
        Updated in place.
    grad : array, shape and dtype of ``param``
    m, v : arrays, shape and dtype of ``param``
        First and second moment estimates (zeros before step 1); updated in place.
    lr, beta1, beta2, eps, weight_decay : float
    step : int
        The step count ``t >= 1`` (1 on the first call).

    Returns
    -------
    None
    """
    check_adam_arrays(param, grad, m, v, step)
    xp = array_module(param, grad, m, v)
    lr, b1, one_minus_b1, b2, one_minus_b2, step_scale, eps_hat, wd, grad_floor, moment_floor = adam_coefficients(
        param.dtype, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    zero = param.dtype.type(0)
    g = xp.where(xp.abs(grad) >= grad_floor, grad, zero)
    m[...] = b1 * m + one_minus_b1 * g
    v[...] = b2 * v + one_minus_b2 * (g * g)
    m[...] = xp.where(xp.abs(m) >= moment_floor, m, zero)
    v[...] = xp.where(v >= moment_floor, v, zero)
    update = step_scale * m / (xp.sqrt(v) + eps_hat)  # = mhat / (sqrt(vhat) + eps): see adam_coefficients
    param -= lr * (update + wd * param)


@dataclasses.dataclass(frozen=True)
class Adam:
    """Adam hyperparameters.

    Parameters
    ----------
    lr : float
        Step size (alpha in the paper).
    betas : (float, float)
        Decay rates of the first and second moment estimates.
    eps : float
        Added to ``sqrt(v_hat)``, after the square root.
    weight_decay : float
        Decoupled weight decay (AdamW): ``p -= lr * weight_decay * p``.
    fused : bool
        Use the one-pass Numba kernel (default) or the plain array code.
    normalize_grads : bool
        Divide each parameter's gradient by its L2 norm (plus ``NORM_EPS``)
        before the step: the VampPrior code's ``AdamNormGrad``.
    """

    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    fused: bool = True
    normalize_grads: bool = False

    def __post_init__(self):
        b1, b2 = self.betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"Adam: betas must lie in [0, 1), got {self.betas}")
        if not (self.lr > 0 and self.eps > 0 and self.weight_decay >= 0) or not all(
                math.isfinite(x) for x in (self.lr, self.eps, self.weight_decay)):
            raise ValueError(f"Adam: need finite lr > 0, eps > 0, weight_decay >= 0; got lr={self.lr}, "
                             f"eps={self.eps}, weight_decay={self.weight_decay}")

    def init(self, params: dict) -> AdamState:
        """Zero moments shaped like ``params``: arrays on their backend, in their dtype.

        When the parameters share one dtype and one array library, ``m`` and
        ``v`` are views of one flat buffer each, in the order of ``params`` (as
        a model's ``flat_params``), so that one kernel launch on a GPU updates
        every parameter.
        """
        arrays = list(params.values())
        if arrays and len({(a.dtype, array_module(a)) for a in arrays}) == 1:
            xp = array_module(arrays[0])
            return AdamState(step=0, m=flat_views(xp, params, copy=False)[1],
                             v=flat_views(xp, params, copy=False)[1])
        return AdamState(step=0,
                         m={k: array_module(p).zeros_like(p) for k, p in params.items()},
                         v={k: array_module(p).zeros_like(p) for k, p in params.items()})

    def step(self, params: dict, grads: dict, state: AdamState, lr: float | None = None) -> AdamState:
        """Apply one Adam step to every array in ``params`` (in place).

        ``lr``, when given, replaces ``self.lr`` for this step (learning-rate
        schedules: see :func:`geometric_lr`).

        Returns the new state (the moment arrays are updated in place and
        shared with the old state; ``step`` is incremented).
        """
        lr = self.lr if lr is None else float(lr)
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"Adam.step: lr must be > 0, got {lr}")
        if params.keys() != grads.keys() or params.keys() != state.m.keys():
            raise KeyError("Adam.step: params, grads and state must have the same keys; "
                           f"missing in grads: {sorted(set(params) - set(grads))}, "
                           f"missing in state: {sorted(set(params) - set(state.m))}")
        t = int(state.step) + 1
        b1, b2 = self.betas
        hyper = dict(lr=lr, beta1=b1, beta2=b2, eps=self.eps, weight_decay=self.weight_decay, step=t)
        names = list(params)
        if self.normalize_grads:
            grads = normalized(grads)
        if self.fused:  # every parameter in one kernel call
            fused_kernels().adam_update_many([params[k] for k in names], [grads[k] for k in names],
                                     [state.m[k] for k in names], [state.v[k] for k in names], **hyper)
        else:
            for k in names:
                adam_update(params[k], grads[k], state.m[k], state.v[k], **hyper)
        return state._replace(step=t)


#: Added to each gradient's norm by ``normalize_grads`` (the value of the VampPrior code).
NORM_EPS = 1e-7


def normalized(grads: dict) -> dict:
    """Each gradient divided by its own L2 norm: ``g / (||g||_2 + NORM_EPS)``, new arrays."""
    out = {}
    for k, g in grads.items():
        norm = array_module(g).sqrt((g * g).sum(dtype=g.dtype))   # ||g||_2 in g's dtype
        out[k] = g / (norm + g.dtype.type(NORM_EPS))
    return out


def geometric_lr(lr: float, lr_final: float | None, step: int, total_steps: int) -> float:
    """Learning rate at ``step`` (0-based) of a geometric decay from ``lr`` to ``lr_final``.

    ``lr * (lr_final / lr) ** (step / total_steps)``: ``lr`` at the first step,
    ``lr_final`` after the last, a constant factor per step in between. With
    ``lr_final=None`` the rate stays ``lr``.
    """
    if lr_final is None:
        return lr
    if lr <= 0 or lr_final <= 0 or total_steps < 1:
        raise ValueError(f"geometric_lr: need lr > 0, lr_final > 0, total_steps >= 1; got {lr}, {lr_final}, {total_steps}")
    return lr * (lr_final / lr) ** (min(step, total_steps) / total_steps)
