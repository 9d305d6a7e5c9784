"""Array backends: NumPy on the CPU, CuPy on an NVIDIA GPU.

A :class:`Backend` bundles the array module ``xp`` with the few operations
that differ between the two libraries (random generators, host transfers,
synchronization).  There is no global "current backend": every layer and
model holds the backend it was built with, and pure functions pick ``xp``
from their array arguments with :func:`array_module`, Chainer-style. The
flat buffers of a model's parameters, gradients and Adam moments
(:func:`flat_views`, found again by :func:`contiguous_run`) live here too:
they are about memory, not about layers.

Examples
--------
>>> from scratchvae import backend
>>> be = backend.get("numpy")
>>> x = be.asarray([1.0, 2.0], dtype="float32")
>>> be.asnumpy(x * 2)
array([2., 4.], dtype=float32)
"""
from __future__ import annotations

import dataclasses
import types

import numpy

from .choices import BACKENDS

__all__ = ["Backend", "BackendUnavailable", "get", "gpu_count", "resolve", "array_module", "contiguous_run",
           "flat_views"]

NAMES = BACKENDS


class BackendUnavailable(RuntimeError):
    """Raised when a requested backend cannot run on this machine.

    The message says why (package missing, no GPU, driver error) and what to
    install. scratchvae never silently falls back to NumPy.
    """


@dataclasses.dataclass(frozen=True)
class Backend:
    """One array backend.

    Attributes
    ----------
    name : str
        ``"numpy"`` or ``"cupy"``.
    xp : module
        The array module (``numpy`` or ``cupy``).
    device : str
        A human-readable description of where arrays live.
    """

    name: str
    xp: types.ModuleType = dataclasses.field(repr=False, compare=False)
    device: str = dataclasses.field(default="cpu", compare=False)

    def rng(self, seed=None):
        """A random generator that produces arrays on this backend.

        Both generators offer ``standard_normal(size, dtype=)``,
        ``random(size, dtype=)`` and ``integers``; use only those (CuPy's
        generator has no ``normal`` or ``permutation``).
        """
        return self.xp.random.default_rng(seed)

    def asarray(self, a, dtype=None):
        """Move ``a`` (host or device array, list, scalar) to this backend."""
        if dtype is not None:
            dtype = numpy.dtype(dtype)
        return self.xp.asarray(a, dtype=dtype)

    def asnumpy(self, a):
        """Copy ``a`` to a host ``numpy.ndarray`` (no copy if already one)."""
        if isinstance(a, numpy.ndarray):
            return a
        if self.name == "cupy":
            return self.xp.asnumpy(a)
        return numpy.asarray(a)

    def synchronize(self):
        """Block until all queued device work is done (a no-op on NumPy)."""
        if self.name == "cupy":
            self.xp.cuda.get_current_stream().synchronize()

    def is_array(self, a) -> bool:
        """True when ``a`` is an array of this backend."""
        return isinstance(a, self.xp.ndarray)


def _numpy_backend() -> Backend:
    return Backend(name="numpy", xp=numpy, device="cpu")


_HINT = "install the GPU extra with `pip install scratchvae[gpu]` (cupy-cuda12x) on a machine with an NVIDIA GPU and driver"


def gpu_count() -> int:
    """The number of CUDA GPUs CuPy sees (nothing is allocated on any of them).

    Raises :class:`BackendUnavailable` when CuPy is missing or finds none.
    """
    try:
        import cupy
    except ImportError as err:
        raise BackendUnavailable(f"backend 'cupy' needs CuPy, which is not installed ({err}); {_HINT}") from err
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CUDARuntimeError, driver missing, ...
        raise BackendUnavailable(
            f"backend 'cupy': CuPy is installed but no usable CUDA GPU was found ({err}); {_HINT}") from err
    if count < 1:
        raise BackendUnavailable(f"backend 'cupy': CuPy is installed but no CUDA GPU is visible; {_HINT}")
    return count


def _cupy_backend(device: int | None = None) -> Backend:
    hint = _HINT
    count = gpu_count()
    import cupy
    if device is not None:
        if not 0 <= device < count:
            raise BackendUnavailable(f"backend 'cupy': GPU {device} was asked for and this machine has {count}")
        cupy.cuda.Device(device).use()    # before the first allocation: nothing lands on another GPU
    try:
        device_id = cupy.cuda.runtime.getDevice()
        props = cupy.cuda.runtime.getDeviceProperties(device_id)
        name = props["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        cupy.zeros(1).sum().item()  # a real round trip: fails early on a broken driver
    except Exception as err:
        raise BackendUnavailable(f"backend 'cupy': the GPU could not run a first kernel ({err}); {hint}") from err
    return Backend(name="cupy", xp=cupy, device=f"cuda:{device_id} ({name})")


def get(name: str = "numpy", device: int | None = None) -> Backend:
    """Return the backend called ``name`` (``"numpy"`` or ``"cupy"``).

    ``device`` (``"cupy"`` only): the GPU to make current before anything is
    allocated (default: CuPy's current one).

    Raises
    ------
    BackendUnavailable
        For ``"cupy"`` when CuPy is not installed or no GPU is usable.
    ValueError
        For an unknown name.
    """
    if not isinstance(name, str) or name.lower() not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    return _numpy_backend() if name.lower() == "numpy" else _cupy_backend(device)


def resolve(backend=None) -> Backend:
    """Accept ``None`` (NumPy), a name, or a :class:`Backend`."""
    if backend is None:
        return _numpy_backend()
    if isinstance(backend, Backend):
        return backend
    return get(backend)


def array_module(*arrays):
    """The array module (``numpy`` or ``cupy``) that owns ``arrays``.

    Returns ``numpy`` unless one of them is a CuPy array.  CuPy is never
    imported here, so this works on machines without it.
    """
    for a in arrays:
        module = type(a).__module__
        if module.startswith("cupy"):
            import cupy
            return cupy
    return numpy


def _address(a) -> int:
    """The device or host address of ``a``'s first element."""
    data = a.data
    return data.ptr if hasattr(data, "ptr") else a.__array_interface__["data"][0]


def contiguous_run(arrays):
    """The 1-D array that ``arrays`` tile back to back, in order; None if they do not.

    That is the case when every array is a C-contiguous view of one 1-D
    buffer (their common ``base``), each starting where the previous one
    ends: the parameters, gradients and Adam moments of a model, which
    :func:`scratchvae.layers.base.flat_views` lays out so. A kernel can then
    sweep all of them in one launch.
    """
    arrays = list(arrays)
    if not arrays:
        return None
    base = arrays[0].base
    if base is None or base.ndim != 1 or not base.flags.c_contiguous or base.dtype != arrays[0].dtype:
        return None
    origin, item = _address(base), base.itemsize
    start = end = _address(arrays[0]) - origin
    for a in arrays:
        if a.base is not base or not a.flags.c_contiguous or _address(a) - origin != end:
            return None
        end += a.size * item
    return base[start // item:end // item]


def flat_views(xp, like: dict, *, copy: bool = True):
    """One 1-D buffer and, per entry of ``like``, a view of it with that entry's shape.

    The views tile the buffer back to back in the order of ``like`` (so that
    :func:`scratchvae.backend.contiguous_run` finds them), in the dtype of the
    first entry. ``copy=True`` copies each entry's values into its view;
    ``copy=False`` (for gradients and moments) zeroes the buffer instead.

    Returns
    -------
    flat : array, shape (sum of the sizes,)
    views : dict, the keys of ``like``, each an array shaped like its entry
    """
    arrays = list(like.values())
    dtype = arrays[0].dtype if arrays else numpy.float32
    total = sum(int(a.size) for a in arrays)
    flat = xp.empty(total, dtype=dtype) if copy else xp.zeros(total, dtype=dtype)
    views, offset = {}, 0
    for key, a in like.items():
        views[key] = flat[offset:offset + a.size].reshape(a.shape)
        if copy:
            views[key][...] = a
        offset += int(a.size)
    return flat, views
