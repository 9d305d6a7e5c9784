"""Every list of named choices, defined once: the modules that implement them, the config that checks
them and the command line that offers them all read them here (this module imports nothing)."""

BACKENDS = ("numpy", "cupy")                         # scratchvae.backend
ARCHS = ("mlp", "gated", "conv")                     # scratchvae.models
DOWNSAMPLING = ("stride", "pool")                    # conv_vae: stride-2 convolutions, or pooling
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "softplus")   # the hidden activations the command line offers
LIKELIHOODS = ("bernoulli", "gaussian")              # p(x | z)
PRIORS = ("standard", "vampprior")                   # scratchvae.priors
OBJECTIVES = ("elbo", "iwae")                        # scratchvae.objectives
MODELS = ("vae", "ae")                               # a VAE, or the plain autoencoder
DTYPES = ("float32", "float64")
INITS = ("uniform", "he")                           # Dense/GatedDense weights: PyTorch's default, or He normal
