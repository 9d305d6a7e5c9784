"""Central finite-difference gradient checks, in float64.

Two entry points:

* :func:`check_layer` checks a layer's ``backward`` (input gradient and every
  parameter gradient) against finite differences of ``sum(forward(x) * dy)``
  for a random upstream gradient ``dy``.
* :func:`check_scalar` checks the gradients of any scalar function (a loss)
  with respect to named arrays that it reads.

Both return a :class:`GradcheckReport`: the maximum relative error per array,
printable as a table.  The relative error of one entry is::

    |analytic - numeric| / max(|analytic| + |numeric|, floor)

(the cs231n definition). Each entry's floor is the finite differences' own
error for that entry divided by the tolerance: the quotient is formed with
steps h and 2h, their difference estimates the truncation error, and the
rounding error is bounded from the magnitudes of the terms that were summed
(not from the sum, which may cancel). So an entry the finite differences
resolve is compared relatively, and one they cannot (near zero, or under a
cancelling sum) passes only when the two gradients agree to within that
error. In float64 a correct gradient typically shows errors of 1e-8 to
1e-11; a wrong one shows 1e-4 or more.

Run it on a layer of your own::

    from scratchvae import gradcheck
    report = gradcheck.check_layer(MyLayer(dtype="float64"), x)
    print(report)          # per array: max rel. error, tolerance, PASS/FAIL, worst entry
    assert report.passed()
"""
from __future__ import annotations

import dataclasses

import numpy

__all__ = ["GradcheckReport", "rel_error", "worst_error", "numerical_gradient", "numerical_gradient_and_error",
           "check_layer", "check_scalar"]


def rel_error(analytic, numeric, floor: float = 1e-8) -> float:
    """Maximum elementwise relative error between two arrays (host or device).

    ``|a - n| / max(|a| + |n|, floor)``: entries whose size is below ``floor``
    are in effect compared absolutely, so that two zeros (or two values at
    the rounding level) are not reported as a 100% disagreement.
    """
    return worst_error(analytic, numeric, floor)[0]


def worst_error(analytic, numeric, floor: float = 1e-8) -> tuple[float, tuple]:
    """:func:`rel_error` and the index of the entry where it occurs (``()`` for empty arrays)."""
    a = numpy.asarray(_to_host(analytic), dtype=numpy.float64)
    n = numpy.asarray(_to_host(numeric), dtype=numpy.float64)
    if a.shape != n.shape:
        raise ValueError(f"rel_error: shapes differ, {a.shape} vs {n.shape}")
    if a.size == 0:
        return 0.0, ()
    err = numpy.abs(a - n) / numpy.maximum(numpy.abs(a) + numpy.abs(n), floor)
    bad = numpy.isnan(err)
    flat = int(numpy.argmax(bad)) if bad.any() else int(numpy.argmax(err))   # a NaN is the worst entry
    where = numpy.unravel_index(flat, err.shape)
    return float(err[where]), tuple(int(i) for i in where)


def _to_host(a):
    if isinstance(a, numpy.ndarray) or numpy.isscalar(a):
        return a
    get = getattr(a, "get", None)  # CuPy array
    return get() if callable(get) else numpy.asarray(a)


def _require_float64(name, a):
    if a.dtype != numpy.float64:
        raise TypeError(f"gradcheck: {name} has dtype {a.dtype}; finite differences need float64 "
                        "(float32 rounding swamps the difference quotient)")


@dataclasses.dataclass
class GradcheckReport:
    """Maximum relative error of each checked array, where it occurs, and the verdict.

    Attributes
    ----------
    errors : dict[str, float]
        ``{"x": 3e-10, "W": 1e-10, ...}`` (NaN when a gradient is NaN).
    worst : dict[str, tuple]
        The index of the worst entry of each array.
    tol : float
        The tolerance that :meth:`passed` and the table's verdict use.
    """

    errors: dict
    worst: dict = dataclasses.field(default_factory=dict)
    tol: float = 1e-6

    @property
    def max_error(self) -> float:
        """The largest error over all arrays (0 when nothing was checked; NaN if any is NaN)."""
        values = list(self.errors.values())
        if any(v != v for v in values):
            return float("nan")
        return max(values, default=0.0)

    def passed(self, tol: float | None = None) -> bool:
        tol = self.tol if tol is None else tol
        return bool(self.max_error <= tol)   # False for NaN

    def __str__(self):
        width = max((len(k) for k in self.errors), default=5)
        lines = [f"{'array':<{width}}  {'max rel. error':>14}  {'tolerance':>9}  {'verdict':<7}  worst entry"]
        for k, v in self.errors.items():
            verdict = "PASS" if v <= self.tol else "FAIL"
            lines.append(f"{k:<{width}}  {v:>14.3e}  {self.tol:>9.1e}  {verdict:<7}  {self.worst.get(k, '')}")
        return "\n".join(lines)


def numerical_gradient(f, x, dy=None, h: float = 1e-5, order: int = 2):
    """Central-difference gradient of ``sum(f() * dy)`` with respect to ``x``.

    ``f`` takes no arguments and reads ``x``, which is perturbed in place one
    entry at a time (and restored).  If ``dy`` is ``None``, ``f`` must return
    a scalar.  The outputs are subtracted before they are summed against
    ``dy``, which keeps the rounding error of the difference small.

    Parameters
    ----------
    f : callable () -> array or scalar
    x : float64 array, any shape
    dy : array shaped like ``f()``, or None
    h : float
        The step.
    order : {2, 4}
        2: the three-point stencil ``(f(x+h) - f(x-h)) / 2h``, error O(h^2).
        4: the five-point stencil
        ``(-f(x+2h) + 8 f(x+h) - 8 f(x-h) + f(x-2h)) / 12h``, error O(h^4),
        which allows a larger step and so far less rounding error; use it for
        scalar losses, whose rounding noise (about eps * |L| / h) swamps the
        three-point quotient.

    Returns
    -------
    grad : host float64 array, shape of ``x``
    """
    _require_float64("x", x)
    grad = numpy.zeros(x.shape, dtype=numpy.float64)
    if not x.flags.c_contiguous:
        raise ValueError("numerical_gradient: x must be C-contiguous so that it can be perturbed in place")
    flat = x.reshape(-1)  # a view: writing into it perturbs x
    dy_host = None if dy is None else numpy.asarray(_to_host(dy), dtype=numpy.float64)
    if order not in (2, 4):
        raise ValueError(f"numerical_gradient: order must be 2 or 4, got {order}")
    # (offset, weight) pairs; the weighted outputs are summed, then divided by `denominator`
    stencil, denominator = ([(1, 1.0), (-1, -1.0)], 2 * h) if order == 2 else \
        ([(2, -1.0), (1, 8.0), (-1, -8.0), (-2, 1.0)], 12 * h)
    for i in range(flat.size):
        old = float(flat[i])
        diff = 0.0
        for offset, weight in stencil:
            flat[i] = old + offset * h
            # copy: f() may return a view of x (Flatten does), which the next
            # perturbation would change under our feet
            diff = diff + weight * numpy.array(_to_host(f()), dtype=numpy.float64, copy=True)
        flat[i] = old
        diff = numpy.asarray(diff)
        grad.flat[i] = (diff.sum() if dy_host is None else numpy.sum(diff * dy_host)) / denominator
    return grad


def check_layer(layer, x, dy=None, *, h: float = 1e-5, seed: int = 0, check_params: bool = True) -> GradcheckReport:
    """Check ``layer.backward`` against finite differences.

    Parameters
    ----------
    layer : Layer
        Built with ``dtype="float64"``.
    x : float64 array
        The input (perturbed in place during the check, then restored).
    dy : array shaped like ``layer.forward(x)``, optional
        The upstream gradient; by default standard normal from ``seed``.
    h : float
        Finite-difference step (the three-point stencil, at h and 2h: each entry's floor is its own
        finite-difference error, as in :func:`check_scalar`).
    check_params : bool
        Also check every entry of every parameter.

    Returns
    -------
    GradcheckReport with an entry ``"x"`` and one per parameter name.
    """
    _require_float64("x", x)
    be = layer.backend
    name = type(layer).__name__
    y = layer.forward(x)
    if dy is None:
        dy = be.asarray(numpy.random.default_rng(seed).standard_normal(y.shape), dtype=numpy.float64)
    dy_before = be.asnumpy(dy).copy()
    layer.zero_grad()
    grad_arrays = dict(layer.grads)
    dx = layer.backward(dy)
    if not numpy.array_equal(be.asnumpy(dy), dy_before):
        raise AssertionError(f"{name}.backward modified its dy argument")
    analytic = {"x": be.asnumpy(dx).copy()}
    if check_params:
        _check_accumulates(layer, x, dy, grad_arrays)
        analytic.update({k: be.asnumpy(g).copy() for k, g in layer.grads.items()})

    report = GradcheckReport({})
    checks = [("x", x)] + ([(k, p) for k, p in layer.params.items()] if check_params else [])
    for key, a in checks:
        _require_float64(key, a)
        numeric, error = numerical_gradient_and_error(lambda: layer.forward(x), a, h, 2, dy=dy)
        report.errors[key], report.worst[key] = worst_error(analytic[key], numeric, _floor(error, report.tol))
    return report


def _check_accumulates(layer, x, dy, grad_arrays) -> None:
    """``backward`` must add into the very arrays in ``layer.grads`` (an optimizer holds
    references to them): rebinding ``grads[k] = ...`` or overwriting would silently stop
    training that parameter. A second forward/backward must double every gradient."""
    be, name = layer.backend, type(layer).__name__
    for k, g in layer.grads.items():
        if grad_arrays.get(k) is not g:
            raise AssertionError(f"{name}.backward rebound grads[{k!r}] to a new array instead of adding into "
                                 "the existing one; an optimizer holding the old array would never see it")
    once = {k: be.asnumpy(g).copy() for k, g in layer.grads.items()}
    layer.forward(x)
    layer.backward(dy)
    for k, g in layer.grads.items():
        twice = be.asnumpy(g)
        if not numpy.allclose(twice, 2 * once[k], rtol=1e-12, atol=1e-300):
            raise AssertionError(f"{name}.backward does not accumulate into grads[{k!r}]: after two backward "
                                 f"passes it holds {rel_error(twice, 2 * once[k]):.1e} (relative) away from "
                                 "twice one pass; gradients must be added (+=), not assigned")
    for k, g in layer.grads.items():   # leave one pass's gradients, as a single backward would
        g[...] = be.asarray(once[k])


def numerical_gradient_and_error(f, x, h: float = 1e-3, order: int = 4, dy=None):
    """Central-difference gradient of a scalar ``f()`` (or of ``sum(f() * dy)``) with respect to ``x``, and
    its error estimate.

    ``f`` returns the scalar, or the terms it is the sum of (any array): the
    rounding error of a sum is set by its terms' magnitudes, not by the sum,
    which may cancel. With ``dy`` the outputs at the stencil's points are
    subtracted before they are summed against ``dy`` (as
    :func:`numerical_gradient` does), and the terms are ``f() * dy``. For each entry the quotient is formed twice, with steps
    ``h`` and ``2h`` (the stencils share their points: six evaluations for
    ``order=4``, four for ``order=2``), and its error estimated as

    * truncation: ``|g(h) - g(2h)|`` (an over-estimate: g(2h)'s truncation
      error is 2**order times g(h)'s), plus
    * rounding: ``ROUNDING_ULPS * eps * M * sum|weights| / denominator``,
      with ``M`` the largest ``sum |terms|`` seen over the stencil.

    Returns
    -------
    grad, error : host float64 arrays, shape of ``x``
    """
    _require_float64("x", x)
    if order not in (2, 4):
        raise ValueError(f"numerical_gradient_and_error: order must be 2 or 4, got {order}")
    if not x.flags.c_contiguous:
        raise ValueError("numerical_gradient_and_error: x must be C-contiguous so that it can be perturbed in place")
    weights = {1: 1.0, -1: -1.0} if order == 2 else {2: -1.0, 1: 8.0, -1: -8.0, -2: 1.0}
    denominator = 2.0 if order == 2 else 12.0                # times the step
    offsets = sorted(set(weights) | {2 * k for k in weights})
    eps = numpy.finfo(numpy.float64).eps
    up = None if dy is None else numpy.asarray(_to_host(dy), dtype=numpy.float64)
    grad, error = numpy.zeros(x.shape), numpy.zeros(x.shape)
    flat = x.reshape(-1)  # a view: writing into it perturbs x
    for i in range(flat.size):
        old = float(flat[i])
        value, size = {}, 0.0
        for k in offsets:
            flat[i] = old + k * h
            # a copy: f() may return a view of x, which the next perturbation would change
            value[k] = numpy.array(_to_host(f()), dtype=numpy.float64, copy=True)
            terms = value[k] if up is None else value[k] * up
            size = max(size, float(numpy.abs(terms).sum()))
        flat[i] = old

        g_h, g_2h = (_quotient(value, weights, scale, up) / (denominator * scale * h) for scale in (1, 2))
        rounding = ROUNDING_ULPS * eps * size * sum(abs(w) for w in weights.values()) / (denominator * h)
        grad.flat[i], error.flat[i] = g_h, abs(g_h - g_2h) + rounding
    return grad, error


def _quotient(value, weights, scale, up) -> float:
    """The stencil's weighted outputs at steps ``scale * h``, combined point by point, then summed
    (against ``up``, the upstream gradient, when given); not yet divided by the step."""
    diff = sum(w * value[scale * k] for k, w in weights.items())
    return float((diff if up is None else diff * up).sum())


def _floor(error, tol):
    """Each entry's floor: its finite-difference error over ``tol`` (so that two gradients within that
    error pass), and never 0 (two exact zeros agree)."""
    return numpy.maximum(error / tol, numpy.finfo(numpy.float64).tiny)


#: How many units of rounding one evaluation of a loss is allowed, relative to the sum of its terms' magnitudes.
ROUNDING_ULPS = 16


def check_scalar(f, arrays: dict, analytic: dict, *, h: float = 1e-3, order: int = 4,
                 floor: float | None = None, tol: float = 1e-6) -> GradcheckReport:
    """Check gradients of a scalar function ``f()`` of named float64 arrays.

    Parameters
    ----------
    f : callable () -> float or array
        Reads the arrays in ``arrays`` (perturbed in place); returns the
        scalar, or the terms it is the sum of (see
        :func:`numerical_gradient_and_error`).
    arrays : dict[str, array]
        The arrays to differentiate with respect to.
    analytic : dict[str, array]
        The claimed gradients, same keys and shapes.
    h, order :
        Step and stencil of :func:`numerical_gradient_and_error`.
    floor : float, optional
        By default each entry's floor is its own finite-difference error
        estimate divided by ``tol``: an entry is compared relatively where
        the finite differences resolve it, and where they do not (an entry
        near zero, or a loss whose terms cancel), it passes only if the two
        gradients agree to within that error. A number fixes one floor for
        every entry instead (see :func:`rel_error`).
    tol : float
        The report's tolerance.
    """
    report = GradcheckReport({}, tol=tol)
    for name, a in arrays.items():
        _require_float64(name, a)
        numeric, error = numerical_gradient_and_error(f, a, h, order)
        report.errors[name], report.worst[name] = worst_error(
            analytic[name], numeric, _floor(error, tol) if floor is None else floor)
    return report
