"""Layers that only change an array's shape."""
from __future__ import annotations

import math

from .base import Layer

__all__ = ["Flatten", "Reshape", "ToCHWB", "FromCHWB"]


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


class ToCHWB(Layer):
    """Flat images (B, C*H*W) -> (C, H, W, B), the batch-innermost layout.

    The entry of a stack of ``layout="CHWB"`` convolutions: one transposing
    copy here instead of two per convolution, and none when ``x`` is already
    stored batch-fastest (the output of a ``Dense(..., order="F")``).
    ``backward`` returns a transposed view (B, C*H*W), no copy.  ``shape`` is
    (C, H, W).
    """

    def __init__(self, shape, **kw):
        super().__init__(**kw)
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3:
            raise ValueError(f"ToCHWB: shape must be (C, H, W), got {shape!r}")
        self.size = math.prod(self.shape)

    def forward(self, x):
        self._check_input(x, (None, self.size))
        B = x.shape[0]
        self._cache = (B,)
        return self.xp.ascontiguousarray(x.T).reshape(self.shape + (B,))  # (C, H, W, B)

    def backward(self, dy):
        (B,) = self._get_cache()
        self._check_dy(dy, self.shape + (B,))
        return dy.reshape(self.size, B).T  # (B, C*H*W), a view stored batch-fastest

    def __repr__(self):
        return f"ToCHWB({self.shape})"


class FromCHWB(Layer):
    """(C, H, W, B) -> flat images (B, C*H*W): the exit of a CHWB convolution stack.

    ``forward`` returns a transposed view, no copy (a Dense reads it through
    BLAS's transpose flag, and returns its input gradient in the same order,
    which ``backward`` then reshapes without a copy).
    """

    def forward(self, x):
        self._check_input(x, (None, None, None, None), what="input (CHWB)")
        self._cache = (tuple(x.shape),)
        B = x.shape[-1]
        return x.reshape(-1, B).T  # (B, C*H*W), a view stored batch-fastest

    def backward(self, dy):
        (shape,) = self._get_cache()
        B, size = shape[-1], math.prod(shape[:-1])
        self._check_dy(dy, (B, size))
        return self.xp.ascontiguousarray(dy.T).reshape(shape)  # (C, H, W, B)
