"""Sequential composition of layers."""
from __future__ import annotations

from .base import Layer, gather_params

__all__ = ["Sequential"]


class Sequential(Layer):
    """Apply ``layers`` in order; backward runs them in reverse.

    ``params`` and ``grads`` expose every child's arrays (the same array
    objects, not copies) under dotted names: ``"0.W"``, ``"2.b"``, nested
    containers as ``"1.0.W"``; the order is the layer order, then each
    layer's own order.
    """

    def __init__(self, *layers, backend=None, dtype=None, rng=None):
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: item {i} is a {type(layer).__name__}, not a Layer")
        first = layers[0]
        super().__init__(backend=backend if backend is not None else first.backend,
                         dtype=dtype if dtype is not None else first.dtype)
        self.layers = list(layers)
        self.params, self.grads = gather_params(((str(i), layer) for i, layer in enumerate(self.layers)),
                                                "Sequential: layer", self.backend, self.dtype)

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        self._cache = True
        return x

    def backward(self, dy):
        """Backward through the layers in reverse; returns dL/dx.

        Returns None when the first parameter layer has ``input_grad = False``
        (only layers without parameters may come before it).
        """
        self._get_cache()
        for i in range(len(self.layers) - 1, -1, -1):
            dy = self.layers[i].backward(dy)
            if dy is None:
                before = [layer for layer in self.layers[:i] if layer.params]
                if before:
                    raise RuntimeError(f"Sequential: layer {i} ({self.layers[i]!r}) returned no input gradient "
                                       f"(input_grad=False) but parameter layers come before it: {before}")
                return None
        return dy

    @property
    def out_features(self):
        """The output width of the last layer that has one (a Dense head followed by a clamp, say)."""
        for layer in reversed(self.layers):
            if hasattr(layer, "out_features"):
                return layer.out_features
        raise AttributeError("Sequential: no layer has out_features")

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __repr__(self):
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"Sequential(\n  {inner}\n)"
