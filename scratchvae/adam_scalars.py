"""The scalars of one Adam step, shared by every implementation of it: the plain array code
(:func:`scratchvae.optim.adam_update`) and the fused kernels (``scratchvae.kernels``), which both
import them from here (this module imports only NumPy, so the kernels need not import the optimizer)."""
from __future__ import annotations

import math

import numpy

__all__ = ["adam_coefficients"]


def adam_coefficients(dtype, *, lr, beta1, beta2, eps, weight_decay, step):
    """The scalars of one Adam step, cast to ``dtype`` (shared by every implementation).

    The bias corrections are folded into two scalars, so that the update
    per element is one square root and one division::

        mhat / (sqrt(vhat) + eps)
          = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)             bc1 = 1 - beta1**t, bc2 = 1 - beta2**t
          = m * (sqrt(bc2) / bc1) / (sqrt(v) + eps * sqrt(bc2))
          = m * step_scale / (sqrt(v) + eps_hat)

    an exact identity (Kingma & Ba, Section 2, give the same rearrangement).

    Returns
    -------
    tuple of ``dtype`` scalars
        ``(lr, beta1, 1 - beta1, beta2, 1 - beta2, step_scale, eps_hat,
        weight_decay, grad_floor, moment_floor)``; the differences, powers
        and square roots are formed in Python float64 before the cast.
        ``moment_floor`` is the smallest moment kept (smaller ones are stored
        as 0); ``grad_floor`` the smallest gradient entry used, chosen so
        that ``(1 - beta1) g`` and ``(1 - beta2) g**2`` stay normal numbers.
    """
    cast = numpy.dtype(dtype).type
    step = int(step)
    bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    tiny = float(numpy.finfo(dtype).tiny)                 # the smallest normal number
    moment_floor = tiny * 2.0 ** 24                       # beta * m stays normal for beta >= 2**-24
    grad_floor = 2.0 * max(math.sqrt(tiny / (1.0 - beta2)), tiny / (1.0 - beta1))
    return (cast(lr), cast(beta1), cast(1.0 - beta1), cast(beta2), cast(1.0 - beta2), cast(math.sqrt(bc2) / bc1),
            cast(eps * math.sqrt(bc2)), cast(weight_decay), cast(grad_floor), cast(moment_floor))
