"""scratchvae: a variational autoencoder engine written from scratch.

Start reading at :mod:`scratchvae.backend` (NumPy/CuPy), then
:mod:`scratchvae.layers` (forward/backward pairs), :mod:`scratchvae.gradcheck`
(how every derivative is verified).
"""
__version__ = "0.1.0"
