"""Every ``xp.`` name the engine uses must exist in CuPy's real namespace.

CuPy installs and imports without a GPU, so ``dir(cupy)`` is the truth. The
audit walks the engine's source with ``ast``: every attribute chain rooted at
a name or attribute called ``xp`` (``xp.linalg.norm``, ``self.xp.zeros``) is
resolved against ``cupy``, and every method called on a backend generator (a
name ending in ``rng``) against ``cupy.random.Generator``.

Host-only modules (data loading, figures, checkpoint files) work on NumPy
arrays by design and are not audited.
"""
import ast
import pathlib

import pytest
import scratchvae.kernels

import scratchvae

cupy = pytest.importorskip("cupy", reason="the audit needs CuPy's namespace (pip install cupy-cuda12x)")

HOST_ONLY = {"datasets.py", "figures.py", "analysis.py", "checkpoint.py", "train.py", "cli.py"}


def engine_files():
    roots = [pathlib.Path(scratchvae.__file__).parent, pathlib.Path(scratchvae.kernels.__file__).parent]
    files = []
    for root in roots:
        files += [p for p in sorted(root.rglob("*.py")) if p.name not in HOST_ONLY]
    return files


def _chain(node):
    """Attribute chain as a list of names, e.g. self.xp.random.default_rng -> [self, xp, random, default_rng]."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return None


def xp_uses(tree):
    """(chain after xp, line) for the longest attribute chains through ``xp``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain = _chain(node)
            if chain and "xp" in chain[:-1]:
                found.append((tuple(chain[chain.index("xp") + 1:]), node.lineno))
    return found


def rng_method_uses(tree):
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            chain = _chain(node.func)
            if chain and len(chain) >= 2 and chain[-2].endswith("rng"):
                found.append((chain[-1], node.lineno))
    return found


def missing_in_cupy(source: str):
    tree = ast.parse(source)
    missing = []
    for chain, line in xp_uses(tree):
        obj = cupy
        for i, name in enumerate(chain):
            if not hasattr(obj, name):
                missing.append(f"line {line}: xp.{'.'.join(chain[:i + 1])}")
                break
            obj = getattr(obj, name)
    for method, line in rng_method_uses(tree):
        if not hasattr(cupy.random.Generator, method):
            missing.append(f"line {line}: rng.{method}")
    return missing


def test_the_audit_sees_the_engine():
    files = engine_files()
    names = {p.name for p in files}
    assert {"backend.py", "vae.py", "dense.py", "conv.py"} <= names
    total = sum(len(xp_uses(ast.parse(p.read_text()))) for p in files)
    assert total > 20, "the audit found suspiciously few xp. uses"


@pytest.mark.parametrize("path", engine_files(), ids=lambda p: p.name)
def test_every_xp_name_exists_in_cupy(path):
    assert missing_in_cupy(path.read_text()) == [], f"{path} uses names CuPy lacks"


@pytest.mark.parametrize("snippet, bad", [
    ("def f(xp):\n    with xp.errstate(over='ignore'):\n        pass\n", "xp.errstate"),
    ("def f(self, x):\n    return self.xp.ma.masked_invalid(x)\n", "xp.ma"),
    ("def f(rng):\n    return rng.normal(0, 1, 3)\n", "rng.normal"),
    ("def f(self):\n    return self.rng.permutation(10)\n", "rng.permutation"),
])
def test_audit_fails_on_numpy_only_names(snippet, bad):
    missing = missing_in_cupy(snippet)
    assert missing and bad in missing[0]


def test_audit_accepts_cupy_names():
    ok = "def f(xp, rng, x):\n    return xp.linalg.norm(xp.maximum(x, 0)) + rng.standard_normal((2,), dtype=xp.float32)\n"
    assert missing_in_cupy(ok) == []
