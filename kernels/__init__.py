"""Numba-fused kernels (installed as ``scratchvae.kernels``)."""
