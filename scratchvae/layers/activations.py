"""Elementwise activations, each a forward/backward pair plus a layer.

All of them accept any input shape; the output has the same shape.
"""
from __future__ import annotations

from ..fused import kernels as fused_kernels
from ..losses import sigmoid, softplus  # the one definition of each (re-exported here)
from .base import Layer

__all__ = ["ReLU", "LeakyReLU", "Sigmoid", "Tanh", "Softplus", "Clamp", "sigmoid", "softplus"]


class _Elementwise(Layer):
    """Shared plumbing: no params, any input shape, cache of one call."""

    def _forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def _backward(self, dy, cache):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x):
        self._check_input(x, (None,) * max(x.ndim, 1) if hasattr(x, "ndim") else (None,))
        y, self._cache = self._forward(x)
        return y

    def backward(self, dy):
        cache = self._get_cache()
        self._check_dy(dy, cache[0].shape)
        return self._backward(dy, cache)


class ReLU(_Elementwise):
    """y = max(x, 0); dy/dx = 1 where x > 0 else 0.

    ``fused=True``: on NumPy arrays, forward and backward run as the Numba
    loops of :mod:`scratchvae.kernels` (one pass each, the same numbers bit
    for bit); the array code below is the definition.
    """

    def __init__(self, *, fused: bool = False, **kw):
        super().__init__(**kw)
        self._kernels = None
        if fused and self.backend.name == "numpy":
            self._kernels = fused_kernels()

    def _forward(self, x):
        if self._kernels is not None:
            return self._kernels.relu_forward(x), (x,)
        return self.xp.maximum(x, 0), (x,)

    def _backward(self, dy, cache):
        (x,) = cache
        if self._kernels is not None:
            return self._kernels.relu_backward(dy, x)
        return dy * (x > 0)


class LeakyReLU(_Elementwise):
    """y = x for x > 0, negative_slope * x otherwise."""

    def __init__(self, negative_slope: float = 0.01, **kw):
        super().__init__(**kw)
        self.negative_slope = float(negative_slope)

    def _forward(self, x):
        return self.xp.where(x > 0, x, x * self.negative_slope), (x,)

    def _backward(self, dy, cache):
        (x,) = cache
        return self.xp.where(x > 0, dy, dy * self.negative_slope)

    def __repr__(self):
        return f"LeakyReLU(negative_slope={self.negative_slope})"


class Sigmoid(_Elementwise):
    """y = 1 / (1 + exp(-x)); dy/dx = y (1 - y)."""

    def _forward(self, x):
        y = sigmoid(x)
        return y, (x, y)

    def _backward(self, dy, cache):
        _, y = cache
        return dy * y * (1 - y)


class Tanh(_Elementwise):
    """y = tanh(x); dy/dx = 1 - y**2."""

    def _forward(self, x):
        y = self.xp.tanh(x)
        return y, (x, y)

    def _backward(self, dy, cache):
        _, y = cache
        return dy * (1 - y * y)


class Softplus(_Elementwise):
    """y = log(1 + exp(x)); dy/dx = sigmoid(x)."""

    def _forward(self, x):
        return softplus(x), (x,)

    def _backward(self, dy, cache):
        (x,) = cache
        return dy * sigmoid(x)


class Clamp(_Elementwise):
    """y = min(max(x, low), high): a hard clamp (Hardtanh).

    dy/dx = 1 for low < x < high and 0 outside, where the output does not
    move with x (at exactly ``low`` or ``high`` the gradient is taken as 0,
    the one-sided derivative from outside). The VampPrior recipe clamps the
    encoder's log variance to [-6, 2], that is log_sigma to [-3, 1].
    """

    def __init__(self, low: float, high: float, **kw):
        super().__init__(**kw)
        if not low < high:
            raise ValueError(f"Clamp: low must be below high, got {low}, {high}")
        self.low, self.high = float(low), float(high)

    def _forward(self, x):
        return self.xp.clip(x, self.low, self.high), (x,)

    def _backward(self, dy, cache):
        (x,) = cache
        return dy * ((x > self.low) & (x < self.high))

    def __repr__(self):
        return f"Clamp({self.low:g}, {self.high:g})"
