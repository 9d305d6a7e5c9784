"""Adam (Kingma & Ba 2015, Algorithm 1) with decoupled weight decay (AdamW).

The optimizer object holds only hyperparameters; its state is a plain dict
of arrays, so it can be checkpointed and restored::

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

The plain array version is :func:`scratchvae.losses.adam_update`; the fused
one-pass kernel is :func:`scratchvae.kernels.adam_update`
(:func:`~scratchvae.kernels.adam_update_many`: all parameters in one call).
"""
from __future__ import annotations

import dataclasses

from . import kernels, losses
from .backend import array_module

__all__ = ["Adam", "geometric_lr"]


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
    """

    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    fused: bool = True

    def __post_init__(self):
        b1, b2 = self.betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"Adam: betas must lie in [0, 1), got {self.betas}")
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0:
            raise ValueError(f"Adam: need lr > 0, eps > 0, weight_decay >= 0; got lr={self.lr}, "
                             f"eps={self.eps}, weight_decay={self.weight_decay}")

    def init(self, params: dict) -> dict:
        """Zero moments shaped like ``params``.

        Returns
        -------
        state : dict
            ``{"step": int, "m": {name: array}, "v": {name: array}}``,
            arrays on the parameters' backend and in their dtype.
        """
        return {
            "step": 0,
            "m": {k: array_module(p).zeros_like(p) for k, p in params.items()},
            "v": {k: array_module(p).zeros_like(p) for k, p in params.items()},
        }

    def step(self, params: dict, grads: dict, state: dict, lr: float | None = None) -> dict:
        """Apply one Adam step to every array in ``params`` (in place).

        ``lr``, when given, replaces ``self.lr`` for this step (learning-rate
        schedules: see :func:`geometric_lr`).

        Returns the new state (the moment arrays are updated in place and
        shared with the old state; ``step`` is incremented).
        """
        lr = self.lr if lr is None else float(lr)
        if not lr > 0:
            raise ValueError(f"Adam.step: lr must be > 0, got {lr}")
        if params.keys() != grads.keys() or params.keys() != state["m"].keys():
            raise KeyError("Adam.step: params, grads and state must have the same keys; "
                           f"missing in grads: {sorted(set(params) - set(grads))}, "
                           f"missing in state: {sorted(set(params) - set(state['m']))}")
        t = int(state["step"]) + 1
        b1, b2 = self.betas
        hyper = dict(lr=lr, beta1=b1, beta2=b2, eps=self.eps, weight_decay=self.weight_decay, step=t)
        names = list(params)
        if self.fused:  # every parameter in one kernel call
            kernels.adam_update_many([params[k] for k in names], [grads[k] for k in names],
                                     [state["m"][k] for k in names], [state["v"][k] for k in names], **hyper)
        else:
            for k in names:
                losses.adam_update(params[k], grads[k], state["m"][k], state["v"][k], **hyper)
        return {"step": t, "m": state["m"], "v": state["v"]}


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
