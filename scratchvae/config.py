"""The typed config of a training run, and its checks.

:class:`TrainConfig` holds everything that defines a run (the command line's
flags). Every value is checked where it enters: the constructor refuses a
wrong type, a NaN, a value out of range or a flag that does nothing for the
chosen model, and each message names the one field (and its flag) that is
wrong. :meth:`TrainConfig.from_dict` reads one back from a checkpoint's
metadata and refuses unknown keys.
"""
from __future__ import annotations

import dataclasses
import math

from .choices import ACTIVATIONS, ARCHS, BACKENDS, DOWNSAMPLING, DTYPES, INITS, LIKELIHOODS, MODELS, OBJECTIVES, PRIORS

__all__ = ["TrainConfig", "RUN_DEFINING", "AE_UNUSED", "CHOICES"]

IMAGE_DATASETS = ("folder", "celeba")   # scratchvae.datasets.IMAGE_DATASETS (here: the config imports nothing heavy)


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (the command line's flags)."""

    backend: str = "numpy"
    dataset: str = "binarized-mnist"
    data_dir: str | None = None
    binarize: str | None = None
    color: str = "rgb"              # dataset folder / celeba: the images as RGB or grayscale
    image_size: int = 64            # dataset folder / celeba: the side of the square images
    max_image_pixels: int = 64_000_000   # dataset folder / celeba: larger images are refused before decoding
    arch: str = "mlp"
    hidden: tuple = (400,)
    channels: tuple = (32, 64)
    downsample: str = "stride"
    latent_dim: int = 20
    levels: int = 1                 # stochastic levels of latent_dim each (scratchvae.vae)
    activation: str = "relu"
    init: str = "uniform"           # Dense/GatedDense weights: "uniform" (PyTorch's default) or "he" (He normal)
    likelihood: str = "bernoulli"
    model: str = "vae"
    prior: str = "standard"         # p(z): "standard" N(0, I) or "vampprior" (scratchvae.priors)
    pseudo_inputs: int = 500        # the VampPrior's K
    objective: str = "elbo"         # "elbo" or "iwae" (scratchvae.objectives)
    samples: int = 1                # latents per image: 1 for the ELBO, S >= 2 for the IWAE
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    lr_final: float | None = None
    normalize_grads: bool = False   # Adam on each gradient divided by its L2 norm (the VampPrior code's AdamNormGrad)
    beta: float = 1.0
    kl_warmup: float = 0.0
    free_bits: float = 0.0
    input_noise: float = 0.0
    seed: int = 0
    dtype: str = "float32"
    limit: int | None = None
    test_limit: int | None = None
    iwae_k: int = 0
    keep_best: bool = False
    valid_k: int = 0                # > 0: early stopping and best.npz follow the IWAE bound with this many samples
    patience: int = 0
    out: str = "runs/latest"
    fused: bool = True
    figures: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), _TYPES[f.name])
        self.hidden = tuple(int(h) for h in self.hidden)
        self.channels = tuple(int(c) for c in self.channels)
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{_name(key)} must be one of {allowed}, got {getattr(self, key)!r}")
        for key in ("epochs", "batch_size", "latent_dim", "levels", "pseudo_inputs", "samples"):
            _check_number(key, getattr(self, key), low=1)
        for key in ("seed", "iwae_k", "patience", "valid_k"):
            _check_number(key, getattr(self, key), low=0)
        for key in ("limit", "test_limit"):
            _check_number(key, getattr(self, key), low=1, optional=True)
        _check_number("image_size", self.image_size, low=4)
        if self.image_size > 1024:
            raise ValueError(f"{_name('image_size')} must be at most 1024, got {self.image_size}")
        _check_number("max_image_pixels", self.max_image_pixels, low=1)
        if self.dataset not in IMAGE_DATASETS:
            changed = [key for key in ("color", "image_size", "max_image_pixels") if getattr(self, key) != _DEFAULTS[key]]
            if changed:
                raise ValueError(f"{', '.join(_name(k) for k in changed)}: only for the image datasets "
                                 f"{IMAGE_DATASETS} (dataset {self.dataset!r} has a fixed image format)")
        _check_number("lr", self.lr, low=0, open_low=True)
        _check_number("lr_final", self.lr_final, low=0, open_low=True, optional=True)
        _check_number("input_noise", self.input_noise, low=0)
        if self.input_noise >= 1:
            raise ValueError(f"{_name('input_noise')} must be below 1 (the share of corrupted pixels, or the noise's "
                             f"standard deviation on [0, 1] pixels), got {self.input_noise!r}")
        for key in ("beta", "kl_warmup", "free_bits"):
            _check_number(key, getattr(self, key), low=0)
        if any(h < 1 for h in self.hidden) or any(c < 1 for c in self.channels):
            raise ValueError(f"hidden and channels (--hidden, --channels) must be positive widths, "
                             f"got {self.hidden} and {self.channels}")
        if self.arch == "conv" and not self.channels:
            raise ValueError(f"channels (--channels) must name at least one convolution width for --arch conv, "
                             f"got {self.channels} (e.g. --channels 32,64)")
        if self.arch in ("mlp", "gated") and not self.hidden:
            raise ValueError(f"hidden (--hidden) must name at least one layer width for --arch {self.arch}, got "
                             f"{self.hidden} (e.g. --hidden 400)")
        if self.arch in ("mlp", "gated") and self.downsample != "stride":
            raise ValueError(f"downsample (--downsample) {self.downsample!r} is for --arch conv; the MLP has no "
                             "convolutions to pool")
        self._check_prior_and_objective()
        self._check_levels()
        if self.arch == "gated" and (self.model != "vae" or self.activation != "relu"):
            raise ValueError("--arch gated is the VampPrior paper's VAE: its gates are its nonlinearity, so it "
                             f"takes no --activation, and it has no autoencoder twin (--model {self.model!r})")
        if self.init != _DEFAULTS["init"] and self.arch == "conv":
            raise ValueError(f"init (--init) {self.init!r} is for the Dense and GatedDense layers of --arch mlp and "
                             "--arch gated; the conv VAE keeps PyTorch's default (drop --init)")
        if self.valid_k > 0 and not self.keep_best:
            raise ValueError(f"valid_k (--valid-k) sets the validation loss of keep_best (--keep-best); add it, "
                             f"or drop --valid-k (got valid_k={self.valid_k})")
        if self.patience > 0 and not self.keep_best:
            raise ValueError(f"patience (--patience) needs keep_best (--keep-best): it counts epochs without a "
                             f"better validation loss; got patience={self.patience}")
        if not self.out.strip():
            raise ValueError("out (--out) is empty; name the folder the run should write into")
        if self.model == "ae":
            changed = [key for key in AE_UNUSED if getattr(self, key) != _DEFAULTS[key]]
            if changed:
                raise ValueError(f"{', '.join(_name(k) for k in changed)}: a plain autoencoder (model 'ae') has "
                                 "no KL term and no importance-weighted bound, so this does nothing; drop it or "
                                 "train a VAE")

    def _check_prior_and_objective(self):
        if self.pseudo_inputs != _DEFAULTS["pseudo_inputs"] and self.prior != "vampprior":
            raise ValueError(f"pseudo_inputs (--pseudo-inputs) is the VampPrior's number of components; the prior "
                             f"is {self.prior!r} (add --prior vampprior)")
        if self.objective == "elbo" and self.samples != 1:
            raise ValueError(f"samples (--samples) {self.samples}: the ELBO draws one latent per image; pass "
                             "--objective iwae for an importance-weighted bound")
        if self.objective == "iwae" and self.samples < 2:
            raise ValueError("objective (--objective) 'iwae' needs --samples S >= 2 (with one sample it is the "
                             "ELBO: use --objective elbo)")
        if self.model == "ae" and (self.prior != "standard" or self.objective != "elbo"):
            raise ValueError(f"--prior {self.prior} / --objective {self.objective}: a plain autoencoder (--model ae) "
                             "has no prior over codes and no bound to weight; train a VAE")
        if self.free_bits > 0 and (self.prior != "standard" or self.objective != "elbo"):
            raise ValueError("free_bits (--free-bits) floors the analytic KL of each latent dimension, which only "
                             "the standard prior with the ELBO has; the VampPrior's KL and the IWAE's weights do "
                             "not split by dimension. Drop --free-bits (the KL warm-up, --kl-warmup, works with both)")
        if self.arch == "conv" and (self.prior != "standard" or self.objective != "elbo"):
            chosen = " and ".join(f"--{key} {getattr(self, key)}" for key in ("prior", "objective")
                                  if getattr(self, key) != _DEFAULTS[key])
            raise ValueError(f"{chosen}: built for --arch mlp and --arch gated; the conv VAE trains the standard "
                             "prior with the ELBO (drop it, or pass --arch gated)")

    def _check_levels(self):
        if self.levels == 1:
            return
        if self.arch == "conv":
            raise ValueError(f"levels (--levels) {self.levels}: the hierarchy is built for --arch gated and --arch "
                             "mlp; the conv VAE has one level (drop --levels, or pass --arch gated)")
        if self.model != "vae":
            raise ValueError(f"levels (--levels) {self.levels}: a plain autoencoder (--model ae) has no stochastic "
                             "levels; train a VAE")
        if self.free_bits != _DEFAULTS["free_bits"]:   # it needs the one level's closed-form KL per dimension
            raise ValueError(f"{_name('free_bits')} is for one-level models; with levels (--levels) {self.levels}, "
                             "drop it (the KL warm-up, --kl-warmup, works at any depth)")

    @classmethod
    def from_dict(cls, d: dict, source: str = "the config") -> TrainConfig:
        """A config from a dict (a checkpoint's ``config``), refusing unknown keys and bad values.

        Raises ValueError naming ``source`` and the key.
        """
        if not isinstance(d, dict):
            raise ValueError(f"{source}: the config is a {type(d).__name__}, expected a JSON object")
        unknown = sorted(set(d) - set(_TYPES))
        if unknown:
            raise ValueError(f"{source}: unknown config keys {unknown}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None


# The fields whose values make a run what it is: a resumed run must keep them.
RUN_DEFINING = ("dataset", "binarize", "color", "image_size", "arch", "hidden", "channels", "downsample", "latent_dim", "levels", "activation",
                "init", "likelihood", "model", "prior", "pseudo_inputs", "objective", "samples", "batch_size", "lr", "lr_final", "normalize_grads", "beta", "kl_warmup", "free_bits", "input_noise",
                "seed", "dtype", "limit", "fused", "valid_k")
# VAE-only settings: given to a plain autoencoder, they would silently do nothing.
AE_UNUSED = ("beta", "kl_warmup", "free_bits", "iwae_k")

_TYPES = {"backend": str, "dataset": str, "data_dir": (str, None), "binarize": (str, None), "color": str,
          "image_size": int, "max_image_pixels": int, "arch": str,
          "hidden": tuple, "channels": tuple, "downsample": str, "latent_dim": int, "levels": int,
          "activation": str, "init": str, "likelihood": str, "model": str,
          "prior": str, "pseudo_inputs": int, "objective": str, "samples": int,
          "epochs": int, "batch_size": int, "lr": float, "lr_final": (float, None), "normalize_grads": bool, "beta": float,
          "kl_warmup": float, "free_bits": float, "input_noise": float, "seed": int, "dtype": str, "limit": (int, None),
          "test_limit": (int, None), "iwae_k": int, "keep_best": bool, "valid_k": int, "patience": int, "out": str, "fused": bool,
          "figures": bool}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
#: The allowed values of each field with a fixed set (the command line offers the same; None: not given).
CHOICES = {"arch": ARCHS, "model": MODELS, "likelihood": LIKELIHOODS, "dtype": DTYPES, "backend": BACKENDS,
           "binarize": (None, "static", "dynamic"), "activation": ACTIVATIONS, "downsample": DOWNSAMPLING,
           "color": ("rgb", "gray"), "prior": PRIORS, "objective": OBJECTIVES, "init": INITS}


def _name(key: str) -> str:
    return f"{key} (--{key.replace('_', '-')})"


def _check_type(key, value, kind):
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if value is None and None in kinds:
        return
    kind = kinds[0]
    if kind is tuple:
        ok = isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        what = "a list of integers"
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        what = "a number"
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        what = "an integer"
    else:
        ok = isinstance(value, kind)
        what = {str: "a string", bool: "true or false"}[kind]
    if not ok:
        raise ValueError(f"{_name(key)} must be {what}, got {value!r}")


def _check_number(key, value, *, low, open_low=False, optional=False):
    if value is None and optional:
        return
    bound = f"> {low}" if open_low else f">= {low}"
    if not (math.isfinite(value) and (value > low if open_low else value >= low)):
        raise ValueError(f"{_name(key)} must be a finite number {bound}, got {value!r}")
