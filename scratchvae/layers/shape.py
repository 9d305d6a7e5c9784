"""Layers that only change an array's shape."""
from __future__ import annotations

import math

from .base import Layer

__all__ = ["Flatten", "Reshape"]


class Flatten(Layer):
    """(B, d1, d2, ...) -> (B, d1 * d2 * ...)."""

    def forward(self, x):
        self._check_input(x, (None,) * max(getattr(x, "ndim", 1), 2))
        self._cache = (x.shape,)
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        (shape,) = self._get_cache()
        self._check_dy(dy, (shape[0], math.prod(shape[1:])))
        return dy.reshape(shape)


class Reshape(Layer):
    """(B, prod(shape)) -> (B, *shape); ``shape`` excludes the batch axis."""

    def __init__(self, shape, **kw):
        super().__init__(**kw)
        self.shape = tuple(int(s) for s in shape)
        self.size = math.prod(self.shape)

    def forward(self, x):
        self._check_input(x, (None, self.size))
        self._cache = (x.shape,)
        return x.reshape((x.shape[0],) + self.shape)

    def backward(self, dy):
        (shape,) = self._get_cache()
        self._check_dy(dy, (shape[0],) + self.shape)
        return dy.reshape(shape)

    def __repr__(self):
        return f"Reshape({self.shape})"
