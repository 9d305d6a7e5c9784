"""A strict CPU stand-in for CuPy, so that CI (which has no GPU) runs the ``--backend cupy`` path.

It is a test double of the array library, not a mock of scratchvae: every
array lives in host memory as a NumPy array, but behaves as CuPy's does where
a GPU program can go wrong:

* ``numpy.asarray(a)`` (any implicit conversion to NumPy) raises ``TypeError``,
  as CuPy does; ``a.get()`` and :func:`asnumpy` are the explicit copies;
* a NumPy array as an operand of an operation or a function raises
  ``TypeError`` (CuPy accepts them only in :func:`asarray` / :func:`array`);
* reductions and integer indexing return 0-d arrays, never host scalars;
* every device-to-host synchronization (``float(a)``, ``bool(a)``, ``int(a)``,
  ``a.item()``, ``a.tolist()``, ``a.get()``, ``asnumpy``, formatting, a stream
  synchronize) is recorded with its call stack in :data:`SYNCS`;
* it fakes ``STANDIN_GPUS`` devices (default 1): every array belongs to the
  device that was current when it was made, :data:`ALLOCATIONS` counts them by
  device, and an array used while another device is current raises, as CuPy
  does;
* ``cupy.cuda.nccl`` sums over the ranks of the MPI job (mpi4py), and refuses
  two ranks on one device as NCCL does.

Put ``tests/standin`` first on ``sys.path`` (or ``PYTHONPATH``) to use it.
With ``STANDIN_LOG`` set to a folder, each process writes its syncs and
allocations there as ``<pid>.json`` when it exits.
"""
from __future__ import annotations

import atexit
import collections
import ctypes
import json
import os
import sys
import types
import weakref

import numpy as _np

__version__ = "0.0-standin"
STANDIN = True

_DEVICES = int(os.environ.get("STANDIN_GPUS", "1"))
_current = {"device": 0}
SYNCS: list = []                                  # one dict per device-to-host synchronization
ALLOCATIONS: collections.Counter = collections.Counter()   # device -> arrays made there
_HERE = os.path.dirname(os.path.abspath(__file__))


def reset() -> None:
    """Forget the recorded syncs and allocations (the device stays as it is)."""
    SYNCS.clear()
    ALLOCATIONS.clear()


def _stack():
    """The caller's frames outside this package, innermost first: ``(file, line, function)``."""
    frames, f = [], sys._getframe(2)
    while f is not None:
        if not os.path.abspath(f.f_code.co_filename).startswith(_HERE):
            frames.append((f.f_code.co_filename, f.f_lineno, f.f_code.co_name))
        f = f.f_back
    return frames


def _record_sync(what: str) -> None:
    stack = _stack()
    SYNCS.append({"what": what, "site": f"{stack[0][0]}:{stack[0][1]} in {stack[0][2]}" if stack else "?",
                  "functions": [fn for _, _, fn in stack]})


def _write_log():
    folder = os.environ.get("STANDIN_LOG")
    if folder:
        with open(os.path.join(folder, f"{os.getpid()}.json"), "w") as f:
            json.dump({"syncs": SYNCS, "allocations": {str(k): v for k, v in ALLOCATIONS.items()}}, f)


atexit.register(_write_log)


# -- arrays ----------------------------------------------------------------------------------------

_owners: weakref.WeakValueDictionary = weakref.WeakValueDictionary()   # id(numpy owner) -> its ndarray


class ndarray:
    """A device array: a NumPy array that only this module's functions may touch."""

    __slots__ = ("_a", "_device", "__weakref__")
    __hash__ = None

    def __init__(self, a: _np.ndarray, device: int | None = None):
        self._a = a
        self._device = _current["device"] if device is None else device
        if a.base is None:
            ALLOCATIONS[self._device] += 1
            _owners[id(a)] = self

    # -- what CuPy refuses -------------------------------------------------------
    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
                        "a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return getattr(_ufunc(ufunc), method)(*inputs, **kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        return _function(func)(*args, **kwargs)

    # -- device-to-host synchronizations ---------------------------------------------
    def get(self, stream=None, order="C", out=None):
        _record_sync("get")
        return _np.array(self._a, order=order)

    def item(self):
        _record_sync("item")
        return self._a.item()

    def tolist(self):
        _record_sync("tolist")
        return self._a.tolist()

    def __float__(self):
        _record_sync("float")
        return float(self._a)

    def __int__(self):
        _record_sync("int")
        return int(self._a)

    def __index__(self):
        _record_sync("index")
        return self._a.__index__()

    def __bool__(self):
        _record_sync("bool")
        return bool(self._a)

    def __complex__(self):
        _record_sync("complex")
        return complex(self._a)

    def __format__(self, spec):
        _record_sync("format")
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    def __repr__(self):
        _record_sync("repr")
        return f"array({self._a!r}, device={self._device})"

    __str__ = __repr__

    # -- metadata (no sync) ------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    device = property(lambda self: cuda.Device(self._device))
    data = property(lambda self: types.SimpleNamespace(ptr=self._a.__array_interface__["data"][0]))
    T = property(lambda self: _wrap(self._a.T, self._device))

    @property
    def base(self):
        owner = self._a.base
        if owner is None:
            return None
        found = _owners.get(id(owner))
        if found is None or found._a is not owner:
            found = ndarray.__new__(ndarray)
            found._a, found._device = owner, self._device
            _owners[id(owner)] = found
        return found

    @property
    def __cuda_array_interface__(self):
        d = self._a.__array_interface__
        return {"shape": d["shape"], "typestr": d["typestr"], "data": d["data"], "strides": d["strides"],
                "version": 3, "stream": None}

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    # -- indexing ----------------------------------------------------------------------
    def __getitem__(self, key):
        return _wrap(self._use()[_unwrap(key, "indexing")], self._device)

    def __setitem__(self, key, value):
        self._use()[_unwrap(key, "indexing")] = _unwrap(value, "assignment")

    def _use(self):
        if self._device != _current["device"]:
            raise ValueError(f"The device where the array resides ({self._device}) is different from the current "
                             f"device ({_current['device']}).")
        return self._a


def _method(name):
    def method(self, *args, **kwargs):
        return _wrap(getattr(self._use(), name)(*_unwrap(args, name), **_unwrap(kwargs, name)), self._device)
    method.__name__ = name
    return method


for _name in ("reshape", "astype", "copy", "sum", "mean", "max", "min", "fill", "ravel", "transpose", "view",
              "swapaxes", "squeeze", "argmax", "argmin", "any", "all", "clip", "dot", "cumsum", "prod", "std", "var",
              "take", "repeat", "flatten", "round", "nonzero", "sort", "argsort"):
    setattr(ndarray, _name, _method(_name))


def _operator(ufunc_name, reflected=False, inplace=False):
    def op(self, other):
        if isinstance(other, _np.ndarray):
            raise TypeError(f"Unsupported type {type(other)}")
        u = _ufunc(getattr(_np, ufunc_name))
        if inplace:
            return u(self, other, out=self)
        return u(other, self) if reflected else u(self, other)
    return op


for _dunder, _uf in (("add", "add"), ("sub", "subtract"), ("mul", "multiply"), ("truediv", "true_divide"),
                     ("floordiv", "floor_divide"), ("mod", "remainder"), ("pow", "power"), ("matmul", "matmul"),
                     ("and", "bitwise_and"), ("or", "bitwise_or"), ("xor", "bitwise_xor")):
    setattr(ndarray, f"__{_dunder}__", _operator(_uf))
    setattr(ndarray, f"__r{_dunder}__", _operator(_uf, reflected=True))
    if _dunder != "matmul":
        setattr(ndarray, f"__i{_dunder}__", _operator(_uf, inplace=True))
for _dunder, _uf in (("lt", "less"), ("le", "less_equal"), ("gt", "greater"), ("ge", "greater_equal"),
                     ("eq", "equal"), ("ne", "not_equal")):
    setattr(ndarray, f"__{_dunder}__", _operator(_uf))
for _dunder, _uf in (("neg", "negative"), ("pos", "positive"), ("abs", "absolute"), ("invert", "invert")):
    setattr(ndarray, f"__{_dunder}__", (lambda u: lambda self: _ufunc(getattr(_np, u))(self))(_uf))


def _unwrap(x, where):
    """The NumPy value behind an argument; a NumPy array is refused, as CuPy refuses it."""
    if isinstance(x, ndarray):
        return x._use()
    if isinstance(x, _np.ndarray):
        raise TypeError(f"Unsupported type {type(x)} in {where}: pass device arrays (cupy.asarray moves host "
                        "arrays to the device)")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, where) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v, where) for k, v in x.items()}
    return x


def _wrap(r, device=None):
    if isinstance(r, _np.ndarray):
        return ndarray(r, device)
    if isinstance(r, _np.generic):                  # a reduction or an element: a 0-d device array
        return ndarray(_np.asarray(r), device)
    if isinstance(r, tuple):
        return tuple(_wrap(v, device) for v in r)
    if isinstance(r, list):
        return [_wrap(v, device) for v in r]
    return r


class _Ufunc:
    def __init__(self, u):
        self._u = u
        self.__name__ = u.__name__

    def __call__(self, *args, **kwargs):
        return _wrap(self._u(*_unwrap(args, self.__name__), **_unwrap(kwargs, self.__name__)))

    def __getattr__(self, method):    # reduce, accumulate, at, outer
        fn = getattr(self._u, method)
        return lambda *a, **k: _wrap(fn(*_unwrap(a, self.__name__), **_unwrap(k, self.__name__)))


_ufuncs: dict = {}
_functions: dict = {}


def _ufunc(u):
    if u.__name__ not in _ufuncs:
        _ufuncs[u.__name__] = _Ufunc(u)
    return _ufuncs[u.__name__]


def _function(fn):
    if fn not in _functions:
        name = fn.__name__

        def wrapper(*args, **kwargs):
            return _wrap(fn(*_unwrap(args, name), **_unwrap(kwargs, name)))
        wrapper.__name__ = name
        _functions[fn] = wrapper
    return _functions[fn]


def __getattr__(name):
    """Every other NumPy name: ufuncs and functions on device arrays; dtypes and constants as they are."""
    attr = getattr(_np, name)
    if isinstance(attr, _np.ufunc):
        return _ufunc(attr)
    if callable(attr) and not isinstance(attr, type):
        return _function(attr)
    return attr


# -- moving data ---------------------------------------------------------------------------------

def asarray(a, dtype=None, order=None):
    """Host data (a NumPy array, a list, a scalar) to the device; a device array as it is (or cast)."""
    if isinstance(a, ndarray):
        return a if dtype is None or _np.dtype(dtype) == a.dtype else a.astype(dtype)
    return ndarray(_np.array(a, dtype=dtype, order=order or "K", copy=True))


def array(a, dtype=None, copy=True, order="K"):
    if isinstance(a, ndarray):
        return ndarray(_np.array(a._use(), dtype=dtype, copy=True, order=order))
    return ndarray(_np.array(a, dtype=dtype, copy=True, order=order))


def ascontiguousarray(a, dtype=None):
    return _wrap(_np.ascontiguousarray(_unwrap(a, "ascontiguousarray"), dtype=dtype))


def asnumpy(a, stream=None, order="C", out=None):
    if isinstance(a, ndarray):
        return a.get(order=order)
    return _np.asarray(a, order=order)


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else _np


# -- random ------------------------------------------------------------------------------------------

class _Generator:
    """CuPy's generator API (standard_normal, random, integers), drawing on the device."""

    def __init__(self, seed):
        self._g = _np.random.default_rng(seed)

    def standard_normal(self, size=None, dtype=_np.float64):
        return ndarray(_np.asarray(self._g.standard_normal(size, dtype=dtype)))

    def random(self, size=None, dtype=_np.float64):
        return ndarray(_np.asarray(self._g.random(size, dtype=dtype)))

    def integers(self, low, high=None, size=None, dtype=_np.int64):
        return ndarray(_np.asarray(self._g.integers(low, high, size, dtype=dtype)))


random = types.ModuleType("cupy.random")
random.default_rng = _Generator
sys.modules["cupy.random"] = random


# -- cupy.cuda: devices, streams, runtime, NCCL --------------------------------------------------------

cuda = types.ModuleType("cupy.cuda")
cuda.__path__ = []
sys.modules["cupy.cuda"] = cuda


class _Device:
    def __init__(self, device=None):
        self.id = _current["device"] if device is None else int(device)
        if not 0 <= self.id < _DEVICES:
            raise runtime.CUDARuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {self.id}")

    def use(self):
        _current["device"] = self.id

    def __enter__(self):
        self._previous = _current["device"]
        self.use()
        return self

    def __exit__(self, *exc):
        _current["device"] = self._previous

    def __eq__(self, other):
        return isinstance(other, _Device) and other.id == self.id

    __hash__ = None


class _Stream:
    ptr = 0

    def synchronize(self):
        _record_sync("stream.synchronize")


cuda.Device = _Device
cuda.get_current_stream = lambda: _Stream()

runtime = types.ModuleType("cupy.cuda.runtime")


class CUDARuntimeError(RuntimeError):
    pass


runtime.CUDARuntimeError = CUDARuntimeError
runtime.getDeviceCount = lambda: _DEVICES
runtime.getDevice = lambda: _current["device"]
runtime.getDeviceProperties = lambda device: {"name": f"stand-in GPU {device}".encode()}
cuda.runtime = runtime
sys.modules["cupy.cuda.runtime"] = runtime

nccl = types.ModuleType("cupy.cuda.nccl")
nccl.available = os.environ.get("STANDIN_NCCL", "1") == "1"
nccl.NCCL_FLOAT32, nccl.NCCL_FLOAT64, nccl.NCCL_SUM = 7, 8, 0
_NCCL_TYPES = {7: ctypes.c_float, 8: ctypes.c_double}


class NcclError(RuntimeError):
    pass


def _host_view(ptr, count, kind):
    return _np.ctypeslib.as_array((_NCCL_TYPES[kind] * count).from_address(ptr))


class NcclCommunicator:
    """NCCL's all-reduce and broadcast over the MPI job's ranks (the stand-in's memory is the host's)."""

    def __init__(self, ndev, uid, rank):
        from mpi4py import MPI
        self._comm = MPI.COMM_WORLD
        places = self._comm.allgather((MPI.Get_processor_name(), _current["device"]))
        if len(set(places)) != len(places):
            raise NcclError("NCCL_ERROR_INVALID_USAGE: invalid usage (two ranks share one GPU)")
        if ndev != self._comm.Get_size() or rank != self._comm.Get_rank():
            raise NcclError(f"NCCL_ERROR_INVALID_ARGUMENT: ndev {ndev}, rank {rank}")

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        from mpi4py import MPI
        assert sendbuf == recvbuf and op == nccl.NCCL_SUM, "the stand-in sums in place only"
        self._comm.Allreduce(MPI.IN_PLACE, _host_view(recvbuf, count, datatype), op=MPI.SUM)

    def bcast(self, buff, count, datatype, root, stream):
        self._comm.Bcast(_host_view(buff, count, datatype), root=root)


nccl.NcclError = NcclError
nccl.NcclCommunicator = NcclCommunicator
nccl.get_unique_id = lambda: tuple(range(128))
cuda.nccl = nccl
sys.modules["cupy.cuda.nccl"] = nccl
