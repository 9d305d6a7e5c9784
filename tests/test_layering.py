"""The floors of the engine, checked on its source: lower floors never import upper ones.

* nothing under ``scratchvae/layers/`` imports the model, its builders or the trainer;
* the fused kernels (``scratchvae.kernels``) are imported in one place, ``scratchvae/fused.py``;
* ``optim.py`` imports nothing from ``layers``;
* no module imports another module's private (``_``) name;
* imports inside functions are only the documented lazy ones (optional or heavy dependencies).
"""
import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "scratchvae").rglob("*.py"), *(REPO / "kernels").rglob("*.py")])
UPPER = ("scratchvae.model_base", "scratchvae.vae", "scratchvae.autoencoder", "scratchvae.models", "scratchvae.build",
         "scratchvae.train", "scratchvae.reload", "scratchvae.cli", "scratchvae.distributed")
# (module, imported name) of imports inside functions, each for an optional or heavy dependency
LAZY = {("scratchvae/fused.py", "scratchvae.kernels"),                   # Numba: optional (fused=False)
        ("kernels/__init__.py", "scratchvae.kernels.cuda"),             # numba-cuda: only for CuPy arrays
        ("scratchvae/datasets/__init__.py", "scratchvae.datasets.download"),   # urllib: only to download
        ("scratchvae/datasets/__init__.py", "scratchvae.datasets.images"),     # Pillow: only for images
        ("scratchvae/datasets/images.py", "scratchvae.datasets.download"),
        ("scratchvae/train.py", "scratchvae.figures")}                   # matplotlib: only at a run's end


def module_name(path):
    rel = path.relative_to(REPO)
    parts = list(rel.with_suffix("").parts)
    if parts[0] == "kernels":
        parts = ["scratchvae", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts), path.name == "__init__.py"


def imports(path):
    """(absolute module, imported names, inside a function) of every scratchvae import in ``path``."""
    name, is_package = module_name(path)
    package = name if is_package else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            if not module.startswith("scratchvae"):
                continue
            for alias in node.names:
                full = f"{module}.{alias.name}"
                target = full if any(full == module_name(p)[0] for p in SOURCES) else module
                yield target, alias.name, id(node) in functions
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("scratchvae"):
                    yield alias.name, alias.name, id(node) in functions


def test_layers_never_import_the_model_or_the_trainer():
    for path in (REPO / "scratchvae" / "layers").rglob("*.py"):
        for module, _, _ in imports(path):
            assert not module.startswith(UPPER), (path.name, module)


def test_every_function_of_the_trainer_fits_on_a_screen():
    """train() and every function of the trainer's modules at most 60 lines (a job that grows gets a module)."""
    trainer = ("train.py", "run_data.py", "build.py", "reload.py", "evaluation.py", "streams.py", "stop_signals.py")
    long = [(name, f.name, f.end_lineno - f.lineno + 1) for name in trainer
            for f in ast.walk(ast.parse((REPO / "scratchvae" / name).read_text()))
            if isinstance(f, ast.FunctionDef) and f.end_lineno - f.lineno + 1 > 60]
    assert long == []


def test_the_kernels_are_imported_in_one_place():
    importers = {str(p.relative_to(REPO)) for p in SOURCES for module, _, _ in imports(p)
                 if module == "scratchvae.kernels" and not str(p.relative_to(REPO)).startswith("kernels/")}
    assert importers == {"scratchvae/fused.py"}


def test_optim_imports_nothing_from_layers():
    assert not [m for m, _, _ in imports(REPO / "scratchvae" / "optim.py") if m.startswith("scratchvae.layers")]


def test_no_module_imports_another_modules_private_name():
    private = [(str(p.relative_to(REPO)), m, n) for p in SOURCES for m, n, _ in imports(p)
               if n.startswith("_") and not n.startswith("__")]
    assert private == []


def test_imports_inside_functions_are_only_the_documented_lazy_ones():
    lazy = {(str(p.relative_to(REPO)), m) for p in SOURCES for m, _, inside in imports(p) if inside}
    assert lazy <= LAZY, sorted(lazy - LAZY)


def module_graph():
    """{module: the scratchvae modules it imports at load time} (imports inside functions are not edges)."""
    graph = {}
    for path in SOURCES:
        name, _ = module_name(path)
        graph[name] = {target for target, _, inside in imports(path) if not inside and target != name}
    return graph


def import_cycles(graph):
    """Every cycle a depth-first walk of ``graph`` meets, as a list of modules (the first repeated last)."""
    found, state, stack = [], {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def test_no_import_cycle():
    """No module imports, at load time, a module that imports it back (the model and its builders, the
    optimizer and the kernels, a package and its loaders were such pairs)."""
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]   # the check sees one
    assert import_cycles(module_graph()) == []


def walk_of_one_step(fused):
    """(files, functions) of scratchvae's own code that one training step of the default MLP VAE calls."""
    import re
    import sys

    import numpy as np

    from scratchvae.models import mlp_vae
    from scratchvae.optim import Adam
    model, opt = mlp_vae(fused=fused), Adam(fused=fused)
    state = opt.init(model.params)
    x = (np.random.default_rng(0).random((16, 784)) < 0.3).astype(np.float32)
    rng = model.backend.rng(0)

    def step():
        model.zero_grad()
        model.loss_and_grad(x, rng=rng, check_data=False)
        opt.step(model.params, model.grads, state)
    step()                                        # compile and import first: the walk is a warm step's
    seen, root = set(), str(REPO) + "/"

    def trace(frame, event, arg):
        name = frame.f_code.co_filename
        if event == "call" and name.startswith(root) and re.match(r"(scratchvae|kernels)/", name[len(root):]):
            seen.add((name[len(root):], frame.f_code.co_name))
    sys.settrace(trace)
    try:
        step()
    finally:
        sys.settrace(None)
    return {f for f, _ in seen}, seen


def test_the_readme_counts_the_walk_of_a_step():
    """README and docs/reading.md say how many files and functions a plain and a default (fused) step walk;
    they are these."""
    for doc in ("README.md", "docs/reading.md"):
        text = " ".join((REPO / doc).read_text().split())
        for fused, what in ((False, "the plain step walks"), (True, "the default (fused) step")):
            files, functions = walk_of_one_step(fused)
            claim = f"{len(files)} files and {len(functions)} functions"
            assert claim in " ".join(text.split(what, 1)[1].split()[:6]), (doc, what, claim, sorted(files))
