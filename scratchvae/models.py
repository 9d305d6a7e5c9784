"""The builders: an MLP or convolutional VAE (and the plain-autoencoder twins) from a few numbers.

``mlp_vae(input_dim=784, hidden=(400,), latent_dim=20)`` is Kingma & Welling's
model; ``conv_vae`` stacks stride-2 convolutions (or 3x3 convolutions and
max-pooling) down to a Dense bottleneck and transposed convolutions back up.
Each returns a :class:`scratchvae.vae.VAE` (or :class:`~scratchvae.vae.Autoencoder`)
whose parts are :mod:`scratchvae.layers` layers.
"""
from __future__ import annotations

import math

import numpy

from .autoencoder import Autoencoder
from .backend import resolve
from .choices import DOWNSAMPLING, INITS
from .layers import (
    Clamp,
    Conv2d,
    ConvTranspose2d,
    Dense,
    FromCHWB,
    GatedDense,
    LeakyReLU,
    MaxPool2d,
    ReLU,
    Sequential,
    Sigmoid,
    Softplus,
    Tanh,
    ToCHWB,
    Upsample2d,
)
from .layers.base import float_dtype
from .objectives import make as make_objective
from .priors import make as make_prior
from .vae import VAE

__all__ = ["mlp_vae", "gated_vae", "conv_vae", "mlp_autoencoder", "conv_autoencoder", "hierarchical_vae",
           "DOWNSAMPLING", "GATED_LOG_SIGMA_RANGE"]


_ACTIVATIONS = {"relu": ReLU, "leaky_relu": LeakyReLU, "tanh": Tanh, "softplus": Softplus, "sigmoid": Sigmoid}


def _activation(name, fused=False, **kw):
    """The activation layer ``name``; ``fused`` reaches the one with Numba loops (ReLU)."""
    try:
        return _ACTIVATIONS[name](fused=fused, **kw) if name == "relu" else _ACTIVATIONS[name](**kw)
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None


def _setting_up(backend, dtype, seed, hidden, init):
    """What every MLP-shaped builder starts from: the weights' generator, the layers' backend and dtype
    keywords, the hidden widths (at least one), and the keywords of the layers with weights (the
    generator and ``init``)."""
    kw = dict(backend=resolve(backend), dtype=float_dtype(dtype))
    hidden = tuple(int(h) for h in hidden)
    if not hidden:
        raise ValueError("hidden must name at least one layer width")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    gen = numpy.random.default_rng(seed)
    return gen, kw, hidden, dict(kw, rng=gen, init=init)


def _mlp_parts(input_dim, hidden, latent_dim, activation, backend, dtype, seed, fused=False, init="uniform"):
    gen, kw, hidden, wkw = _setting_up(backend, dtype, seed, hidden, init)
    akw = dict(kw, fused=fused)   # the activations: Numba loops when fused
    enc, width = [], int(input_dim)
    for h in hidden:
        enc += [Dense(width, h, **wkw), _activation(activation, **akw)]
        width = h
    heads = Dense(width, latent_dim, **wkw), Dense(width, latent_dim, **wkw)
    dec, width = [], int(latent_dim)
    for h in reversed(hidden):
        dec += [Dense(width, h, **wkw), _activation(activation, **akw)]
        width = h
    dec.append(Dense(width, int(input_dim), **wkw))
    enc[0].input_grad = False   # its input is data: skip dL/dx
    return Sequential(*enc), heads, Sequential(*dec)


#: The VampPrior recipe's clamp of the encoder's log variance, [-6, 2], as log_sigma = log_var / 2.
GATED_LOG_SIGMA_RANGE = (-3.0, 1.0)


def _gated_parts(input_dim, hidden, latent_dim, backend, dtype, seed, fused=False, init="uniform"):
    """Tomczak & Welling's MLP: GatedDense hidden layers (no other activation), a linear mu head, a
    log_sigma head clamped to :data:`GATED_LOG_SIGMA_RANGE`, a linear output layer (logits or mean)."""
    gen, kw, hidden, wkw = _setting_up(backend, dtype, seed, hidden, init)
    enc, width = [], int(input_dim)
    for h in hidden:
        enc.append(GatedDense(width, h, fused=fused, **wkw))
        width = h
    mu = Dense(width, latent_dim, **wkw)
    log_sigma = Sequential(Dense(width, latent_dim, **wkw), Clamp(*GATED_LOG_SIGMA_RANGE, **kw))
    dec, width = [], int(latent_dim)
    for h in reversed(hidden):
        dec.append(GatedDense(width, h, fused=fused, **wkw))
        width = h
    dec.append(Dense(width, int(input_dim), **wkw))
    enc[0].input_grad = False   # its input is data: skip dL/dx
    return Sequential(*enc), (mu, log_sigma), Sequential(*dec)


def gated_vae(input_dim=784, hidden=(300, 300), latent_dim=40, likelihood="bernoulli", backend=None,
              dtype="float32", seed=0, gaussian_log_sigma="learned", fused=True, input_shape=None,
              prior="standard", pseudo_inputs=500, objective="elbo", samples=1, init="uniform") -> VAE:
    """The VampPrior paper's MLP VAE: GatedDense layers ``input_dim -> hidden...``, the encoder's log
    variance clamped to [-6, 2]; the decoder mirrors it. Weights from ``seed``; ``prior``, ``pseudo_inputs``,
    ``objective``, ``samples`` and ``init`` as for :func:`mlp_vae`."""
    encoder, (mu, log_sigma), decoder = _gated_parts(input_dim, hidden, latent_dim, backend, dtype, seed, fused, init)
    return VAE(encoder, mu, log_sigma, decoder, likelihood=likelihood, input_shape=_flat_shape(input_dim, input_shape),
               gaussian_log_sigma=gaussian_log_sigma, fused=fused,
               **_prior_and_objective(prior, pseudo_inputs, objective, samples, input_dim, encoder, seed))


def _prior_and_objective(prior, pseudo_inputs, objective, samples, input_dim, encoder, seed):
    """The ``prior`` and ``objective`` keywords of :class:`~scratchvae.vae.VAE` for their names."""
    # its own generator: the layers' initialization stays that of the standard model
    made = make_prior(prior, input_dim=input_dim, pseudo_inputs=pseudo_inputs, backend=encoder.backend,
                      dtype=encoder.dtype, rng=numpy.random.SeedSequence([seed, 1]))
    return {"prior": made, "objective": make_objective(objective, samples)}


def mlp_vae(input_dim=784, hidden=(400,), latent_dim=20, activation="relu", likelihood="bernoulli",
            backend=None, dtype="float32", seed=0, gaussian_log_sigma="learned", fused=True, input_shape=None,
            prior="standard", pseudo_inputs=500, objective="elbo", samples=1, init="uniform") -> VAE:
    """An MLP VAE: input_dim -> hidden... -> (mu, log_sigma) of latent_dim; the decoder mirrors it.

    With the defaults, the 784-400-20 ReLU model of Kingma & Welling.
    Weights are initialized from ``seed``: ``init="uniform"``, PyTorch's default
    scheme, or ``"he"``, He-normal weights (the VampPrior code's).
    ``input_shape`` (e.g. (1, 28, 28)) only tells the model, and the figures,
    how a flat row of ``input_dim`` pixels is an image; default (input_dim,).
    ``prior``: ``"standard"`` (N(0, I)) or ``"vampprior"`` with
    ``pseudo_inputs`` components (:mod:`scratchvae.priors`); ``objective``:
    ``"elbo"`` or ``"iwae"`` with ``samples`` >= 2 (:mod:`scratchvae.objectives`).
    """
    encoder, (mu, log_sigma), decoder = _mlp_parts(input_dim, hidden, latent_dim, activation, backend, dtype, seed, fused,
                                                   init)
    return VAE(encoder, mu, log_sigma, decoder, likelihood=likelihood, input_shape=_flat_shape(input_dim, input_shape),
               gaussian_log_sigma=gaussian_log_sigma, fused=fused,
               **_prior_and_objective(prior, pseudo_inputs, objective, samples, input_dim, encoder, seed))


def mlp_autoencoder(input_dim=784, hidden=(400,), latent_dim=20, activation="relu", likelihood="bernoulli",
                    backend=None, dtype="float32", seed=0, gaussian_log_sigma="learned", fused=True, input_shape=None,
                    init="uniform") -> Autoencoder:
    """The plain-autoencoder twin of :func:`mlp_vae` (same layers, no log_sigma head)."""
    encoder, (code, _), decoder = _mlp_parts(input_dim, hidden, latent_dim, activation, backend, dtype, seed, fused,
                                             init)
    return Autoencoder(encoder, code, decoder, likelihood=likelihood, input_shape=_flat_shape(input_dim, input_shape),
                       gaussian_log_sigma=gaussian_log_sigma, fused=fused)


def _flat_shape(input_dim, input_shape):
    if input_shape is None:
        return (int(input_dim),)
    if math.prod(input_shape) != int(input_dim):
        raise ValueError(f"input_shape {tuple(input_shape)} does not hold input_dim={input_dim} pixels")
    return tuple(int(s) for s in input_shape)




def _conv_parts(input_shape, channels, latent_dim, hidden, activation, backend, dtype, seed, downsample="stride",
                fused=False):
    be, dt = resolve(backend), float_dtype(dtype)
    gen = numpy.random.default_rng(seed)
    kw = dict(backend=be, dtype=dt)
    ckw = dict(kw, fused=fused)   # the convolutions: im2col/col2im as Numba loops when fused
    c_in, height, width = (int(s) for s in input_shape)
    channels = tuple(int(c) for c in channels)
    if downsample not in DOWNSAMPLING:
        raise ValueError(f"downsample must be one of {DOWNSAMPLING}, got {downsample!r}")
    if downsample == "pool":
        return _pool_parts(c_in, height, width, channels, latent_dim, hidden, activation, gen, kw, ckw)
    sizes = [(height, width)]          # spatial size after each stride-2 4x4 convolution (padding 1)
    for _ in channels:
        h, w = sizes[-1]
        sizes.append(((h - 2) // 2 + 1, (w - 2) // 2 + 1))
    if min(sizes[-1]) < 1:
        raise ValueError(f"input_shape {input_shape} is too small for {len(channels)} stride-2 convolutions")
    # the convolutions work in the batch-innermost layout (C, H, W, B) between ToCHWB and FromCHWB
    enc = [ToCHWB((c_in, height, width), **kw)]
    prev = c_in
    for c in channels:
        enc += [Conv2d(prev, c, 4, stride=2, padding=1, layout="CHWB", rng=gen, **ckw), _activation(activation, **ckw)]
        prev = c
    enc.append(FromCHWB(**kw))
    tail, heads, dec = _bottleneck(prev * sizes[-1][0] * sizes[-1][1], hidden, latent_dim, activation, gen, kw,
                                   ckw)
    enc += tail
    dec.append(ToCHWB((prev, *sizes[-1]), **kw))

    def up(i, c_from, c_to):
        small, big = sizes[len(channels) - i], sizes[len(channels) - i - 1]
        # (s - 1) * 2 - 2 + 4 + output_padding = big  =>  output_padding = big - 2 s
        out_pad = (big[0] - 2 * small[0], big[1] - 2 * small[1])
        return [ConvTranspose2d(c_from, c_to, 4, stride=2, padding=1, output_padding=out_pad, layout="CHWB",
                                rng=gen, **ckw)]
    return _assemble(enc, heads, dec, channels, c_in, up, activation, kw, ckw)


def _assemble(enc, heads, dec, channels, c_in, up, activation, kw, ckw):
    """Finish the conv parts: the decoder's up stages, ``up(i, c_from, c_to)`` -> layers, one per
    encoder stage in reverse order back to ``c_in`` channels, the activation between them (none after
    the last: its output is the likelihood's parameter), then FromCHWB; the first convolution skips
    dL/dx (its input is data). Returns (encoder, heads, decoder)."""
    prev = channels[-1]
    ups = list(reversed(channels[:-1])) + [c_in]
    for i, c in enumerate(ups):
        dec += up(i, prev, c)
        if i < len(ups) - 1:
            dec.append(_activation(activation, **ckw))
        prev = c
    dec.append(FromCHWB(**kw))
    enc[1].input_grad = False
    return Sequential(*enc), heads, Sequential(*dec)


def _bottleneck(flat, hidden, latent_dim, activation, gen, kw, ckw):
    """The Dense layers between the conv stacks: (encoder tail, heads, decoder head).

    The decoder's last Dense stores its output batch-fastest (``order="F"``), and the
    encoder's first reads FromCHWB's transposed view, so that no transposing copy
    stands between the Dense layers and the CHWB convolutions, forward or backward."""
    enc, width_in = [], flat
    if hidden:
        enc += [Dense(flat, hidden, rng=gen, **kw), _activation(activation, **ckw)]
        width_in = hidden
    heads = Dense(width_in, latent_dim, rng=gen, **kw), Dense(width_in, latent_dim, rng=gen, **kw)
    if hidden:
        dec = [Dense(latent_dim, hidden, rng=gen, **kw), _activation(activation, **ckw),
               Dense(hidden, flat, order="F", rng=gen, **kw), _activation(activation, **ckw)]
    else:
        dec = [Dense(latent_dim, flat, order="F", rng=gen, **kw), _activation(activation, **ckw)]
    return enc, heads, dec


def _pool_parts(c_in, height, width, channels, latent_dim, hidden, activation, gen, kw, ckw):
    """The encoder that compresses with max-pooling and the decoder that up-samples, as the VAE
    explainers describe them: per stage a 3x3 convolution (padding 1), the activation and a 2x2
    max-pooling; back up, a nearest up-sampling by 2 and a 3x3 convolution. In the CHWB layout."""
    stages = len(channels)
    if height % 2 ** stages or width % 2 ** stages:
        raise ValueError(f"downsample='pool': the image size {height}x{width} must be divisible by 2**{stages} "
                         f"(one halving per entry of channels {channels})")
    small = (height // 2 ** stages, width // 2 ** stages)
    enc, prev = [ToCHWB((c_in, height, width), **kw)], c_in
    for c in channels:
        enc += [Conv2d(prev, c, 3, padding=1, layout="CHWB", rng=gen, **ckw), _activation(activation, **ckw),
                MaxPool2d(2, layout="CHWB", **kw)]
        prev = c
    enc.append(FromCHWB(**kw))
    tail, heads, dec = _bottleneck(prev * small[0] * small[1], hidden, latent_dim, activation, gen, kw, ckw)
    enc += tail
    dec.append(ToCHWB((prev, *small), **kw))

    def up(i, c_from, c_to):
        return [Upsample2d(2, layout="CHWB", **kw), Conv2d(c_from, c_to, 3, padding=1, layout="CHWB", rng=gen, **ckw)]
    return _assemble(enc, heads, dec, channels, c_in, up, activation, kw, ckw)


def conv_vae(input_shape=(1, 28, 28), channels=(32, 64), latent_dim=20, likelihood="bernoulli", backend=None,
             dtype="float32", seed=0, hidden=256, activation="relu", gaussian_log_sigma="learned",
             fused=True, downsample="stride") -> VAE:
    """A convolutional VAE.

    Encoder: stride-2 4x4 convolutions (padding 1) with ``channels``, a
    Dense bottleneck of ``hidden`` units (None: none), Dense heads for mu and
    log_sigma.  Decoder: the mirror image, with ConvTranspose2d back up to
    ``input_shape`` (output_padding chosen so odd sizes come back exactly).
    With ``downsample="pool"``: 3x3 convolutions each followed by a 2x2
    max-pooling, and back up through nearest up-sampling and 3x3 convolutions
    (H and W divisible by 2 per stage). Takes and returns flat (B, C*H*W)
    arrays like the MLP model. ``fused`` also runs the convolutions'
    im2col/col2im as Numba loops (bit-identical to the array code).
    """
    encoder, (mu, log_sigma), decoder = _conv_parts(input_shape, channels, latent_dim, hidden, activation,
                                                    backend, dtype, seed, downsample, fused)
    return VAE(encoder, mu, log_sigma, decoder, likelihood=likelihood, input_shape=tuple(input_shape),
               gaussian_log_sigma=gaussian_log_sigma, fused=fused)


def conv_autoencoder(input_shape=(1, 28, 28), channels=(32, 64), latent_dim=20, likelihood="bernoulli",
                     backend=None, dtype="float32", seed=0, hidden=256, activation="relu",
                     gaussian_log_sigma="learned", fused=True, downsample="stride") -> Autoencoder:
    """The plain-autoencoder twin of :func:`conv_vae`."""
    encoder, (code, _), decoder = _conv_parts(input_shape, channels, latent_dim, hidden, activation,
                                              backend, dtype, seed, downsample, fused)
    return Autoencoder(encoder, code, decoder, likelihood=likelihood, input_shape=tuple(input_shape),
                       gaussian_log_sigma=gaussian_log_sigma, fused=fused)


def _hierarchical_parts(input_dim, hidden, latent_dim, levels, arch, activation, backend, dtype, seed, fused, init="uniform"):
    """The networks of a ``levels``-level model (the names of :class:`~scratchvae.vae.VAE`), gated or MLP."""
    gen, kw, hidden, wkw = _setting_up(backend, dtype, seed, hidden, init)
    H, Z, D = hidden[-1], int(latent_dim), int(input_dim)

    def stack(width, widths, data_input=False):
        layers = []
        for h in widths:
            layers += ([GatedDense(width, h, fused=fused, **wkw)] if arch == "gated" else
                       [Dense(width, h, **wkw), _activation(activation, fused=fused, **kw)])
            width = h
        if data_input:
            layers[0].input_grad = False   # its input is data: skip dL/dx
        return Sequential(*layers)

    def heads(prefix):
        return {f"{prefix}mu": Dense(H, Z, **wkw),
                f"{prefix}log_sigma": Sequential(Dense(H, Z, **wkw), Clamp(*GATED_LOG_SIGMA_RANGE, **kw))}

    T = int(levels)
    parts = {"encoder": stack(D, hidden, data_input=True), **heads("")}
    for l in range(T - 1, 0, -1):
        parts.update({f"q{l}.x": stack(D, (H,), data_input=True), f"q{l}.z": stack(Z, (H,)),
                      f"q{l}.joint": stack(2 * H, (H,)), **heads(f"q{l}."),
                      f"p{l}.net": stack(Z, hidden), **heads(f"p{l}.")})
    for l in range(1, T + 1):
        parts[f"decoder.z{l}"] = stack(Z, (hidden[-1],))
    widths = hidden[::-1][1:] or (H,)             # the joint layers after the concatenation of the T branches
    parts["decoder"] = Sequential(*stack(T * H, widths).layers, Dense(widths[-1], D, **wkw))
    return parts


def hierarchical_vae(input_dim=784, hidden=(300, 300), latent_dim=40, levels=2, arch="gated", prior="standard",
                     pseudo_inputs=500, objective="elbo", samples=1, likelihood="bernoulli", backend=None,
                     dtype="float32", seed=0, fused=True, activation="relu", input_shape=None,
                     gaussian_log_sigma="learned", init="uniform") -> VAE:
    """A VAE of ``levels`` stochastic levels of ``latent_dim`` dimensions each (the VampPrior paper's HVAE
    for ``levels=2``, ``arch="gated"``, ``hidden=(300, 300)``, ``latent_dim=40``).

    ``q(z_T|x)``: the hidden stack on x and the heads; ``q(z_l|x, z_{l+1})``: one layer on x and one on
    z_{l+1}, concatenated, a joint layer, the heads; ``p(z_l|z_{l+1})``: the hidden stack on z_{l+1}, the
    heads; ``p(x|z_1..z_T)``: one layer on each z_l, concatenated, the reversed hidden stack, the output
    layer. ``arch="gated"``: GatedDense layers; ``"mlp"``: Dense and ``activation``. Every log variance is
    clamped to [-6, 2]. The prior (``standard`` or ``vampprior``) is on the top level.
    """
    levels = _positive_int("levels", levels)
    if arch not in ("gated", "mlp"):
        raise ValueError(f"hierarchical_vae: arch must be 'gated' or 'mlp', got {arch!r}")
    parts = _hierarchical_parts(input_dim, hidden, latent_dim, levels, arch, activation, backend, dtype, seed, fused,
                                init)
    top = [parts.pop(name) for name in ("encoder", "mu", "log_sigma", "decoder")]
    return VAE(*top, lower_levels=parts, likelihood=likelihood, input_shape=_flat_shape(input_dim, input_shape),
               gaussian_log_sigma=gaussian_log_sigma, fused=fused,
               **_prior_and_objective(prior, pseudo_inputs, objective, samples, input_dim, top[0], seed))


def _positive_int(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)
