"""Fully connected layer: ``y = x @ W + b``."""
from __future__ import annotations

import math

from .base import Layer, init_rng, init_weights

__all__ = ["Dense", "affine_forward", "affine_backward"]


def affine_forward(x, W, b, order="C"):
    """Affine map.

    Parameters
    ----------
    x : array, shape (B, D_in)
    W : array, shape (D_in, D_out)
    b : array, shape (D_out,)
    order : "C" or "F"
        The memory order of ``out``. "F" computes ``out.T = W.T @ x.T``, so
        that the batch index is the fastest in memory: the (D_out, B) block
        a stack of CHWB convolutions reads without a transposing copy
        (:class:`~scratchvae.layers.ToCHWB`).

    Returns
    -------
    out : array, shape (B, D_out)
    cache : tuple ``(x, W)`` for :func:`affine_backward`
    """
    if order == "F":
        out = (W.T @ x.T).T  # (B, D_out), stored as (D_out, B)
    else:
        out = x @ W  # (B, D_out)
    out += b
    return out, (x, W)


def affine_backward(dout, cache, need_dx=True):
    """Backward of :func:`affine_forward`.

    Parameters
    ----------
    dout : array, shape (B, D_out)
        Upstream gradient dL/dout.
    cache : tuple from :func:`affine_forward`
    need_dx : bool
        False skips the input gradient (a whole matrix product), for a layer
        whose input is data.

    Returns
    -------
    dx : array, shape (B, D_in)   ``dout @ W.T`` (None when not needed), in the memory
        order of ``x``: for an ``x`` stored batch-fastest (a transposed view, as
        :class:`~scratchvae.layers.FromCHWB` gives) it is computed as ``(W @ dout.T).T``
    dW : array, shape (D_in, D_out)   ``x.T @ dout``
    db : array, shape (D_out,)   ``dout.sum(0)``
    """
    x, W = cache
    if not need_dx:
        dx = None
    elif x.flags.f_contiguous and not x.flags.c_contiguous:
        dx = (W @ dout.T).T  # (B, D_in), stored as (D_in, B) like x
    else:
        dx = dout @ W.T  # (B, D_in)
    dW = x.T @ dout
    db = dout.sum(axis=0)
    return dx, dW, db


class Dense(Layer):
    """Fully connected layer.

    ``params["W"]`` has shape (in_features, out_features) and ``params["b"]``
    shape (out_features,).  Initialization follows PyTorch's default for
    ``nn.Linear``: W and b are drawn from U(-k, k) with k = 1/sqrt(in_features),
    using ``rng`` (a NumPy generator or a seed); ``init="he"`` draws W from
    N(0, 2/in_features) instead (He et al. 2015; b as before).

    Input (B, in_features) -> output (B, out_features).

    Set ``input_grad = False`` on a layer whose input is data (the first
    layer of an encoder): ``backward`` then skips dL/dx and returns None.
    ``order="F"`` stores the output batch-fastest (see :func:`affine_forward`):
    for the layer that feeds a stack of CHWB convolutions.
    """

    input_grad = True

    def __init__(self, in_features: int, out_features: int, *, order: str = "C", backend=None, dtype="float32",
                 rng=None, init: str = "uniform"):
        super().__init__(backend=backend, dtype=dtype)
        if order not in ("C", "F"):
            raise ValueError(f"Dense: order must be 'C' or 'F', got {order!r}")
        self.order = order
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Dense: in_features and out_features must be >= 1, got {in_features}, {out_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        gen = init_rng(rng)
        k = 1.0 / math.sqrt(self.in_features)
        self._add_param("W", init_weights(gen, init, (self.in_features, self.out_features)))
        self._add_param("b", gen.uniform(-k, k, size=(self.out_features,)))

    def forward(self, x):
        """x: (B, in_features) -> (B, out_features)."""
        self._check_input(x, (None, self.in_features))
        y, self._cache = affine_forward(x, self.params["W"], self.params["b"], self.order)
        return y

    def backward(self, dy):
        """dy: (B, out_features) -> dx: (B, in_features) (None if not ``input_grad``); accumulates dW, db."""
        cache = self._get_cache()
        self._check_dy(dy, (cache[0].shape[0], self.out_features))
        dx, dW, db = affine_backward(dy, cache, need_dx=self.input_grad)
        self.grads["W"] += dW
        self.grads["b"] += db
        return dx

    def __repr__(self):
        return f"Dense({self.in_features}, {self.out_features}" + (", order='F')" if self.order == "F" else ")")
