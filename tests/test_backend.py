"""The backend switch: NumPy always works; CuPy works or says why not."""
import numpy as np
import pytest

from scratchvae import backend


def test_numpy_backend_roundtrip():
    be = backend.get("numpy")
    assert be.name == "numpy" and be.xp is np
    x = be.asarray([1, 2, 3], dtype="float32")
    assert isinstance(x, np.ndarray) and x.dtype == np.float32
    assert be.asnumpy(x) is x
    be.synchronize()
    a = be.rng(3).standard_normal((2, 3), dtype=np.float32)
    b = be.rng(3).standard_normal((2, 3), dtype=np.float32)
    np.testing.assert_array_equal(a, b)  # seeded, no hidden global state
    assert backend.resolve(None) == be and backend.resolve("numpy") == be and backend.resolve(be) is be


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'torch'"):
        backend.get("torch")


def _gpu_usable():
    try:
        backend.get("cupy")
        return True
    except backend.BackendUnavailable:
        return False


@pytest.mark.skipif(_gpu_usable(), reason="a GPU is present: the unavailable path cannot be exercised")
def test_cupy_without_gpu_raises_backend_unavailable():
    with pytest.raises(backend.BackendUnavailable) as info:
        backend.get("cupy")
    assert isinstance(info.value, RuntimeError)
    msg = str(info.value)
    assert "cupy" in msg and "install" in msg  # says why and what to install


def test_cupy_not_installed_raises_backend_unavailable(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    with pytest.raises(backend.BackendUnavailable, match="not installed"):
        backend.get("cupy")


def test_array_module_picks_numpy_for_host_arrays():
    assert backend.array_module(np.zeros(2), 1.0) is np
