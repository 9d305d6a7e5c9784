"""The :class:`Layer` base class shared by every layer.

A layer is a thin stateful wrapper around a pure ``*_forward`` /
``*_backward`` pair (cs231n style).  It owns

* ``params``: a dict of parameter arrays, updated in place by optimizers;
* ``grads``: a dict with the same keys, shapes and dtypes, into which
  :meth:`Layer.backward` *accumulates* (``+=``) and which
  :meth:`Layer.zero_grad` resets;
* the cache of exactly one forward call, replaced by the next forward.
"""
from __future__ import annotations

import math

import numpy

from ..backend import resolve
from ..choices import INITS

__all__ = ["Layer", "init_rng", "float_dtype", "gather_params", "zero_grads", "walk"]


def float_dtype(dtype) -> numpy.dtype:
    """Normalize ``dtype`` (a NumPy dtype or its name) to float32 or float64."""
    try:
        dt = numpy.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from err
    if dt not in (numpy.float32, numpy.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def init_weights(gen, init, shape):
    """A weight matrix (fan_in, fan_out) drawn as ``init`` says: ``"uniform"``, U(-k, k) with
    k = 1/sqrt(fan_in) (PyTorch's default for a linear layer), or ``"he"``, N(0, 2/fan_in) (He et al. 2015,
    the VampPrior code's initialization)."""
    if init == "uniform":
        k = 1.0 / math.sqrt(shape[0])
        return gen.uniform(-k, k, size=shape)
    if init == "he":
        return gen.normal(0.0, math.sqrt(2.0 / shape[0]), size=shape)
    raise ValueError(f"init must be one of {INITS}, got {init!r}")


def init_rng(rng):
    """A host NumPy generator for weight initialization.

    ``rng`` may be a ``numpy.random.Generator``, an int seed, or ``None``
    (fresh OS entropy: pass a seed for reproducible weights).
    """
    if isinstance(rng, numpy.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, numpy.integer)):
        return numpy.random.default_rng(rng)
    raise TypeError(f"rng must be a numpy.random.Generator, an int seed or None, got {type(rng).__name__}")


def gather_params(children, owner: str, backend, dtype) -> tuple[dict, dict]:
    """Every child's ``params`` and ``grads`` under dotted names, ``"<prefix>.<name>"``.

    ``children`` is an iterable of ``(prefix, layer)``; the dicts hold the
    children's own arrays (not copies), in order. Each child must use
    ``backend`` and ``dtype``; ``owner`` names the container in the error.
    """
    params, grads = {}, {}
    for prefix, child in children:
        if child.backend != backend or child.dtype != dtype:
            raise ValueError(f"{owner}: {prefix!r} ({child!r}) uses {child.backend.name}/{child.dtype}, "
                             f"expected {backend.name}/{dtype}")
        for name in child.params:
            params[f"{prefix}.{name}"] = child.params[name]
            grads[f"{prefix}.{name}"] = child.grads[name]
    return params, grads


def walk(layer):
    """``layer`` and, for a container, every layer inside it (depth first, in order)."""
    yield layer
    for child in getattr(layer, "layers", ()):
        yield from walk(child)


def zero_grads(grads: dict) -> None:
    """Reset every gradient array in ``grads`` to zero, in place (the optimizer holds these arrays)."""
    for g in grads.values():
        g.fill(0)


class Layer:
    """Base class: holds the backend, the dtype, params, grads and one cache.

    Parameters
    ----------
    backend : Backend, str or None
        Where the arrays live; ``None`` means NumPy.
    dtype : numpy dtype or str
        ``float32`` (default) or ``float64`` (for gradient checks).
    rng : numpy Generator, int or None
        Initializes the parameters of layers that have some; accepted (and
        unused) by the others, so that every constructor shares one signature.
    """

    def __init__(self, *, backend=None, dtype="float32", rng=None):
        self.backend = resolve(backend)
        self.dtype = float_dtype(dtype)
        self.params: dict = {}
        self.grads: dict = {}
        self._cache = None

    @property
    def xp(self):
        """The array module of this layer's backend."""
        return self.backend.xp

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dy):  # pragma: no cover - abstract
        raise NotImplementedError

    def zero_grad(self) -> None:
        """Reset every gradient to zero, in place."""
        zero_grads(self.grads)

    # -- helpers for subclasses ------------------------------------------------
    def _add_param(self, name: str, host_value: numpy.ndarray) -> None:
        """Register a parameter (given on the host) and its zero gradient."""
        value = self.backend.asarray(host_value, dtype=self.dtype)
        self.params[name] = value
        self.grads[name] = self.xp.zeros_like(value)

    def _check_input(self, x, expected: tuple, what: str = "input"):
        """Check backend, dtype and shape of ``x``.

        ``expected`` is a shape in which ``None`` matches any size; for
        example ``(None, 784)`` for a batch of flat images.
        """
        name = type(self).__name__
        if not self.backend.is_array(x):
            raise TypeError(f"{name}: {what} must be a {self.backend.name} array "
                            f"({self.backend.xp.__name__}.ndarray), got {type(x).__module__}.{type(x).__name__}")
        if x.dtype != self.dtype:
            raise TypeError(f"{name}: {what} dtype is {x.dtype}, expected {self.dtype} (the layer's dtype)")
        shape_ok = x.ndim == len(expected) and all(e is None or e == s for e, s in zip(expected, x.shape))
        if not shape_ok:
            want = "(" + ", ".join("N" if e is None else str(e) for e in expected) + ")"
            raise ValueError(f"{name}: {what} has shape {tuple(x.shape)}, expected {want}")
        return x

    def _get_cache(self):
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward: there is no cached input")
        return self._cache

    def _check_dy(self, dy, shape: tuple):
        """``dy`` must match the shape of the last forward output."""
        if tuple(dy.shape) != tuple(shape):
            raise ValueError(f"{type(self).__name__}.backward: dy has shape {tuple(dy.shape)}, "
                             f"expected {tuple(shape)} (the shape of the last forward output)")
        if dy.dtype != self.dtype:
            raise TypeError(f"{type(self).__name__}.backward: dy dtype is {dy.dtype}, expected {self.dtype}")
        return dy

    def __repr__(self):
        return f"{type(self).__name__}()"
