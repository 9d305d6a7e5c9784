"""The fused kernels, :mod:`scratchvae.kernels`, loaded in this one place.

The model (its loss terms), the layers (ReLU, the convolutions' unfolding)
and Adam call ``fused.kernels()`` when they are built with ``fused=True``.
The kernels live in the top-level ``kernels/`` folder, installed as
``scratchvae.kernels``, and need Numba; they are imported on first use so
that the plain path (``fused=False``) needs neither.
"""
from __future__ import annotations

__all__ = ["kernels"]


def kernels():
    """:mod:`scratchvae.kernels`, imported on first use; an ImportError that says what to do when missing."""
    try:
        from . import kernels as module  # optional: Numba, and an installed checkout
    except ImportError as err:
        raise ImportError(
            f"the fused kernels (scratchvae.kernels) cannot be imported: {err}. They live in the top-level "
            "kernels/ folder, which is installed as scratchvae.kernels: from a source checkout run "
            "`pip install -e .` first (and make sure numba is installed), or build the model with "
            "fused=False for the plain array code") from err
    return module
