"""scratchvae: a variational autoencoder engine written from scratch.

Start reading at ``examples/one_step.py`` (a bare training loop), then one
step of it: :mod:`scratchvae.vae` (the loss and its gradient),
:mod:`scratchvae.layers` (forward/backward pairs), :mod:`scratchvae.losses`
and :mod:`scratchvae.optim` (Adam); :mod:`scratchvae.gradcheck` is how every
derivative is verified. ``docs/reading.md`` walks the step in code order.
"""
__version__ = "0.1.0"
