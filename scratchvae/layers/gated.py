"""Gated fully connected layer (Dauphin et al. 2017; the VampPrior paper's MLP layer).

    a = x W + b            (B, D_out)   the signal
    g = sigmoid(x V + c)   (B, D_out)   the gate
    h = a * g              (B, D_out)

Backward, for an upstream gradient dh (B, D_out):

    dL/da = dh * g                          (the gate scales the signal's gradient)
    dL/dg = dh * a
    dL/ds = dL/dg * g * (1 - g)             s = x V + c, sigmoid'(s) = g (1 - g)
    dW = x^T dL/da,   db = sum_b dL/da
    dV = x^T dL/ds,   dc = sum_b dL/ds
    dx = dL/da W^T + dL/ds V^T
"""
from __future__ import annotations

import math

from ..fused import kernels as fused_kernels
from ..losses import sigmoid
from .base import Layer, init_rng, init_weights

__all__ = ["GatedDense", "gated_forward", "gated_backward"]


def gated_forward(x, W, b, V, c, kernels=None):
    """``h = (x W + b) * sigmoid(x V + c)``: x (B, D_in) -> h (B, D_out), and the cache.

    ``kernels`` (:mod:`scratchvae.kernels`, NumPy arrays): the three elementwise
    lines in one Numba pass.
    """
    a = x @ W                         # (B, D_out)
    s = x @ V                         # (B, D_out)
    if kernels is not None:           # a <- a + b, s <- g, h = a * g, in one pass
        h = kernels.gated_forward(a, s, b, c)
        return h, (x, W, V, a, s)
    a += b
    g = sigmoid(s + c)
    return a * g, (x, W, V, a, g)


def gated_backward(dh, cache, need_dx=True, kernels=None):
    """Backward of :func:`gated_forward`: ``dx`` (None unless ``need_dx``), ``dW, db, dV, dc``."""
    x, W, V, a, g = cache
    if kernels is not None:           # the next two lines in one pass
        da, ds = kernels.gated_backward(dh, a, g)
    else:
        da = dh * g                   # (B, D_out)
        ds = dh * a * g * (1 - g)     # (B, D_out)  through the sigmoid
    dx = da @ W.T + ds @ V.T if need_dx else None   # (B, D_in)
    return dx, x.T @ da, da.sum(axis=0), x.T @ ds, ds.sum(axis=0)


class GatedDense(Layer):
    """``h = (x W + b) * sigmoid(x V + c)``: (B, in_features) -> (B, out_features).

    W, b and V, c are initialized as two :class:`~scratchvae.layers.Dense`
    layers are (PyTorch's ``nn.Linear`` default: U(-k, k), k = 1/sqrt(in_features);
    ``init="he"``: W and V from N(0, 2/in_features), as the VampPrior code initializes them).
    ``input_grad = False`` skips dL/dx (a layer whose input is data).
    ``fused=True``: on NumPy arrays, the elementwise lines run as one Numba
    pass each (:mod:`scratchvae.kernels`); the array code is the definition.
    """

    input_grad = True

    def __init__(self, in_features: int, out_features: int, *, backend=None, dtype="float32", rng=None,
                 fused: bool = False, init: str = "uniform"):
        super().__init__(backend=backend, dtype=dtype)
        self._kernels = fused_kernels() if fused and self.backend.name == "numpy" else None
        if in_features < 1 or out_features < 1:
            raise ValueError(f"GatedDense: in_features and out_features must be >= 1, got {in_features}, "
                             f"{out_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        gen = init_rng(rng)
        k = 1.0 / math.sqrt(self.in_features)
        for name, shape in (("W", (self.in_features, self.out_features)), ("b", (self.out_features,)),
                            ("V", (self.in_features, self.out_features)), ("c", (self.out_features,))):
            self._add_param(name, init_weights(gen, init, shape) if len(shape) == 2 else gen.uniform(-k, k, size=shape))

    def forward(self, x):
        """x: (B, in_features) -> (B, out_features)."""
        self._check_input(x, (None, self.in_features))
        p = self.params
        h, self._cache = gated_forward(x, p["W"], p["b"], p["V"], p["c"], self._kernels)
        return h

    def backward(self, dh):
        """dh: (B, out_features) -> dx (None if not ``input_grad``); accumulates dW, db, dV, dc."""
        cache = self._get_cache()
        self._check_dy(dh, (cache[0].shape[0], self.out_features))
        dx, dW, db, dV, dc = gated_backward(dh, cache, need_dx=self.input_grad, kernels=self._kernels)
        for name, grad in (("W", dW), ("b", db), ("V", dV), ("c", dc)):
            self.grads[name] += grad
        return dx

    def __repr__(self):
        return f"GatedDense({self.in_features}, {self.out_features})"
