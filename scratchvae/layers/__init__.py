"""The layer library: every layer has ``forward(x) -> y`` and
``backward(dy) -> dx``, with ``params``/``grads`` dicts and ``zero_grad()``.

See :mod:`scratchvae.layers.base` for the shared contract.
"""
from .activations import Clamp, LeakyReLU, ReLU, Sigmoid, Softplus, Tanh
from .base import Layer
from .containers import Sequential
from .conv import Conv2d, ConvTranspose2d
from .dense import Dense
from .gated import GatedDense
from .pooling import MaxPool2d, Upsample2d
from .shape import Flatten, FromCHWB, Reshape, ToCHWB

__all__ = ["Layer", "Dense", "GatedDense", "Conv2d", "ConvTranspose2d", "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "Clamp",
           "Softplus", "Flatten", "Reshape", "ToCHWB", "FromCHWB", "Sequential", "MaxPool2d", "Upsample2d"]
