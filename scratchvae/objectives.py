"""Training objectives: the ELBO, and the importance-weighted bound (Burda et al. 2016).

Each image draws ``samples`` latents z_s; with the per-sample negative log
weights ``c_bs = -log w_bs = -log p(x_b | z_bs) + beta (log q(z_bs | x_b) - log p(z_bs))``
(beta = 1 is the bound itself; beta < 1 during a KL warm-up), an objective
turns the (B, S) array ``c`` into the per-image loss and into the weights
``v_bs = dloss_b / dc_bs`` that the model's backward pass scales each
sample's gradient by. The loss is written here once, for every prior.
"""
from __future__ import annotations

import math

from .choices import OBJECTIVES

__all__ = ["ELBO", "IWAE", "OBJECTIVES", "make"]


class ELBO:
    """loss_b = c_b1 (one sample); v = 1."""

    name = "elbo"
    samples = 1

    def reduce(self, c, xp):
        """c (B, 1) -> loss (B,), v (B, 1)."""
        return c[:, 0], xp.ones_like(c)


class IWAE:
    """loss_b = -log (1/S) sum_s w_bs = -logsumexp_s(-c_bs) + log S.

    Its gradient is the softmax-weighted sum of the per-sample gradients::

        dloss_b / dc_bs = exp(-c_bs) / sum_t exp(-c_bt) = softmax_s(-c_b)_s = v_bs

    computed with the row maximum subtracted (numerically stable for any c).

    **Negligible samples get an exact zero.** A sample whose weight is below
    ``eps**2`` of its dtype (1.4e-14 in float32) changes the image's gradient
    by less than the type's rounding (unless its own gradient is 1/eps**2
    times the others'), and its weight is set to 0. Left as it is, a weight
    like exp(-100) scales its sample's rows of the backward pass into the
    subnormal range, where x86 matrix products run 3 to 50 times slower (the
    IWAE step ran 5x its matrix products' time; benchmarks/README.md).
    """

    name = "iwae"

    def __init__(self, samples: int):
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
            raise ValueError(f"IWAE needs samples >= 2 (one sample is the ELBO), got {samples!r}")
        self.samples = samples

    def reduce(self, c, xp):
        """c (B, S) -> loss (B,), v (B, S)."""
        lw = -c
        m = lw.max(axis=1, keepdims=True)                    # (B, 1)
        e = xp.exp(lw - m)                                   # (B, S), the largest is 1
        total = e.sum(axis=1, keepdims=True)
        loss = -(m[:, 0] + xp.log(total[:, 0])) + math.log(self.samples)
        v = e / total                                        # (B, S), each row sums to 1
        v[v < xp.finfo(v.dtype).eps ** 2] = 0                # negligible samples: exact zeros, no subnormals
        return loss, v




def make(name: str, samples: int = 1):
    """The objective called ``name`` (``elbo``, or ``iwae`` with ``samples`` >= 2)."""
    if name == "elbo":
        if samples != 1:
            raise ValueError(f"the ELBO draws one sample per image; samples={samples} needs objective 'iwae'")
        return ELBO()
    if name == "iwae":
        return IWAE(samples)
    raise ValueError(f"unknown objective {name!r}; choose one of {OBJECTIVES}")
