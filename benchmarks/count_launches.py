#!/usr/bin/env python
"""How many GPU launches does one training step of ``--backend cupy`` make?

On a GPU a step of a model this small is a few dozen launches of a few
microseconds each, so the count is what decides whether the host stays
ahead of the device. It can be counted without a GPU: the CuPy path is the
same Python code as the NumPy one, and each array operation it issues is one
CuPy kernel (or one cuBLAS call). This script runs the real trainer
(``scratchvae.train.train``) on a backend whose array module is NumPy with
every operation counted, the layers taking the paths they take on CuPy (no
Numba CPU fusions; the loss, reparameterization and Adam kernels counted as
the launches of their ``scratchvae.kernels.cuda`` twins). Counted, per call:

* a ufunc call (``a * b``, ``xp.exp``, ``out += b``, a reduction such as
  ``a.sum(axis=0)``, a matrix product ``a @ b``): one launch;
* ``xp.zeros`` / ``full`` / ``ones`` / ``copyto`` / ``stack`` / ``where`` and
  the other array functions that write memory, ``astype`` and ``copy``, a
  ``reshape`` that has to copy, indexing with an index array (a gather),
  assignment into a slice: one launch each; views (``reshape``, ``.T``,
  slicing) and ``xp.empty`` launch nothing;
* a kernel wrapper: the launches of its CUDA twin (``gaussian_nll`` zeroes
  ``dlog_sigma`` first: two; ``adam_update_many``: one over the flat buffers
  of a model's parameters, else one per parameter).

What it cannot see: CuPy launches more than one kernel for some of these
(a large reduction through CUB takes two; ``mean`` is one kernel where NumPy
needs a sum and a division, so it counts one more than CuPy), and cuBLAS may
split a product. A GPU profiler (``nsys``) gives the exact figure on a
GPU; this one is the number of operations the Python code asks for.

    python benchmarks/count_launches.py [--arch mlp|conv] [--json PATH]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import tempfile
import types

import numpy

try:
    from . import _common as C
except ImportError:  # run as a script
    import _common as C

# array functions that make views or read metadata: no launch
_VIEWS = {"reshape", "ravel", "transpose", "swapaxes", "moveaxis", "broadcast_to", "expand_dims", "squeeze",
          "shape", "ndim", "size", "result_type", "may_share_memory", "shares_memory", "iscomplexobj",
          "empty_like", "atleast_1d", "atleast_2d", "can_cast", "min_scalar_type", "asarray", "asanyarray"}
# creation functions of the module (no array argument, so no __array_function__): launches
_FILLS = {"zeros": 1, "zeros_like": 1, "ones": 1, "ones_like": 1, "full": 1, "full_like": 1, "arange": 1,
          "empty": 0, "asarray": 0, "array": 1, "ascontiguousarray": 0}
# scratchvae.kernels functions -> launches of their kernels.cuda twins (see the module docstring)
_KERNELS = {"bce_with_logits": lambda *a, **k: 1, "gaussian_nll": lambda *a, **k: 2,
            "reparameterize_kl": lambda *a, **k: 1, "reparameterize_kl_backward": lambda *a, **k: 1,
            "adam_update": lambda *a, **k: 1, "adam_update_many": lambda *a, **k: _adam_launches(*a[:4])}


def _adam_launches(params, grads, ms, vs) -> int:
    """As ``kernels.cuda.adam_update_many_into``: one launch when the four lists each tile one
    flat buffer (a model's flat_params/flat_grads, Adam.init's moments), else one per parameter."""
    from scratchvae.backend import contiguous_run
    runs = [contiguous_run(arrays) for arrays in (params, grads, ms, vs)]
    return 1 if all(r is not None for r in runs) and len({r.size for r in runs}) == 1 else len(params)


class Counter:
    """The launches seen, by kind; ``total`` is their sum."""

    def __init__(self):
        self.by_kind = collections.Counter()

    def add(self, kind: str, n: int = 1) -> None:
        if n:
            self.by_kind[kind] += n

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())


COUNTER = Counter()


def _plain(a):
    return a.view(numpy.ndarray) if isinstance(a, CountedArray) else a


def _unwrap(obj):
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o) for o in obj)
    return _plain(obj)


def _wrap(obj):
    if type(obj) is numpy.ndarray or isinstance(obj, numpy.generic):   # CuPy returns 0-d arrays, not scalars
        return numpy.asarray(obj).view(CountedArray)
    if isinstance(obj, tuple):
        return tuple(_wrap(o) for o in obj)
    return obj


def _has_index_array(key) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, (numpy.ndarray, list)) for k in keys)


class CountedArray(numpy.ndarray):
    """A NumPy array whose every operation that would launch a CuPy kernel is counted."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        kind = "matmul" if ufunc is numpy.matmul else ("reduction" if method == "reduce" else "elementwise")
        COUNTER.add(kind)
        if "out" in kwargs:
            kwargs["out"] = tuple(_plain(o) for o in kwargs["out"])
        result = getattr(ufunc, method)(*_unwrap(inputs), **kwargs)
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        if func.__name__ not in _VIEWS:
            COUNTER.add("copy/fill")
        return _wrap(func(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}))

    def __getitem__(self, key):   # views stay CountedArray, so that their base is the counted buffer
        if _has_index_array(key):
            COUNTER.add("gather")
            key = _unwrap(key)
        return _wrap(numpy.ndarray.__getitem__(self, key))

    def __setitem__(self, key, value):
        COUNTER.add("copy/fill")
        numpy.ndarray.__setitem__(self.view(numpy.ndarray), _unwrap(key), _plain(value))

    def astype(self, dtype, *args, **kwargs):
        if numpy.dtype(dtype) != self.dtype or kwargs.get("copy", True):
            COUNTER.add("copy/fill")
        return _wrap(self.view(numpy.ndarray).astype(dtype, *args, **kwargs))

    def copy(self, *args, **kwargs):
        COUNTER.add("copy/fill")
        return _wrap(self.view(numpy.ndarray).copy(*args, **kwargs))

    def fill(self, value):
        COUNTER.add("copy/fill")
        self.view(numpy.ndarray).fill(value)

    def reshape(self, *shape, **kwargs):
        out = numpy.ndarray.reshape(self, *shape, **kwargs)
        if out.size and not numpy.shares_memory(out.view(numpy.ndarray), self.view(numpy.ndarray)):
            COUNTER.add("copy/fill")
        return out


def counting_module() -> types.ModuleType:
    """NumPy's namespace, with the creation functions returning (and counting) CountedArray."""
    xp = types.ModuleType("scratchvae_counted")   # not "numpy": the layers take their CuPy paths
    for name in dir(numpy):
        if not name.startswith("__"):
            setattr(xp, name, getattr(numpy, name))

    def creator(name, launches):
        fn = getattr(numpy, name)

        def make(*args, **kwargs):
            COUNTER.add("copy/fill", launches)
            return _wrap(numpy.asarray(fn(*_unwrap(args), **kwargs)))
        return make

    for name, launches in _FILLS.items():
        setattr(xp, name, creator(name, launches))
    xp.ndarray = numpy.ndarray
    return xp


@contextlib.contextmanager
def counting_backend():
    """Patch (in this process) ``scratchvae.backend.get`` and the kernel functions to count."""
    from scratchvae import backend as backend_mod
    from scratchvae import kernels

    class CountedBackend(backend_mod.Backend):
        def asnumpy(self, a):          # a host copy leaves the counted world
            return numpy.array(_plain(a))

    be = CountedBackend(name="counted", xp=counting_module(), device="cpu (launches counted)")
    saved = {"get": backend_mod.get}
    saved.update({name: getattr(kernels, name) for name in _KERNELS})
    backend_mod.get = lambda name="numpy": be

    def counted(name):
        original = getattr(kernels, name)

        def launch(*args, **kwargs):   # the outputs (allocated by the kernels' own numpy) are counted from here on
            COUNTER.add("fused kernel", _KERNELS[name](*args, **kwargs))
            return _wrap(original(*_unwrap(args), **kwargs))
        return launch

    for name in _KERNELS:
        setattr(kernels, name, counted(name))
    try:
        yield be
    finally:
        backend_mod.get = saved.pop("get")
        for name, fn in saved.items():
            setattr(kernels, name, fn)


def count_step_launches(**config) -> dict:
    """Train a few steps of ``TrainConfig(**config)`` on the counting backend.

    Returns ``{"per_step": launches of a step between checks, "by_kind": {...},
    "check_step": launches of a step that also reads the device (every
    CHECK_EVERY steps), "steps": [launches of each step]}``.
    """
    from scratchvae import train as train_mod
    from scratchvae.config import TrainConfig

    marks, kinds = [], []

    def on_step(step, stats):
        marks.append(COUNTER.total)
        kinds.append(dict(COUNTER.by_kind))

    with tempfile.TemporaryDirectory() as tmp, counting_backend():
        base = dict(epochs=1, limit=config.get("batch_size", 128) * (train_mod.CHECK_EVERY + 4), test_limit=100, figures=False,
                    out=f"{tmp}/run")
        base.update(config)
        train_mod.train(TrainConfig(**base), log=lambda *a, **k: None, on_step=on_step, progress=False)
    steps = [b - a for a, b in zip(marks, marks[1:])]
    per_step = collections.Counter(steps).most_common(1)[0][0]
    i = steps.index(per_step)
    by_kind = {k: kinds[i + 1].get(k, 0) - kinds[i].get(k, 0) for k in kinds[i + 1]}
    return {"per_step": per_step, "by_kind": {k: v for k, v in sorted(by_kind.items()) if v},
            "check_step": max(steps), "steps": steps}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="mlp,conv", help="comma list of mlp, conv (the default model of each)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--json", help="where to write the JSON report "
                                  "(default benchmarks/results/count_launches-<hostname>.json)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    report = {"script": "count_launches", "machine": C.machine_info(), "versions": C.versions(), "configs": []}
    rows = []
    for arch in args.arch.split(","):
        COUNTER.by_kind.clear()
        result = count_step_launches(arch=arch, batch_size=args.batch_size)
        report["configs"].append({"arch": arch, "batch_size": args.batch_size, **result})
        rows.append([arch, args.batch_size, result["per_step"],
                     ", ".join(f"{k} {v}" for k, v in result["by_kind"].items()), result["check_step"]])
    print(C.fmt_table(["model", "B", "launches/step", "by kind", "a checking step"], rows))
    path = C.write_json(args.json or C.default_json_path("count_launches"), report)
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
