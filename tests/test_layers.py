"""The package's layering, read from its source: imports only point down, never in a cycle, no private
name is imported from another module, and ``import noisynn_kernels`` loads none of the tools.

Layers, bottom up (a module may import its own layer or below): the definitions of a noise
(``errors``, ``quality``, ``reference``, ``config`` and the plain value checks), the argument checks
(``_validate``), the extension loader (``_ext``), the ``@triton.jit`` kernels (``triton/``), the ops
(``ops/``), the public ops (``functional``), the modules (``nn``), the models (``models/``), the package
root, and the tools on top.  Every import statement counts, also those inside functions.
"""

import ast
import os
import subprocess
import sys

import pytest

PKG = "noisynn_kernels"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PKG)

# (layer, module-name prefixes), bottom up.  A module's layer is that of its longest matching prefix.
LAYERS = (
    (0, ("errors", "_version", "_op_codes", "_checks")),
    (1, ("quality",)),
    (2, ("reference",)),
    (3, ("config",)),
    (4, ("_validate",)),
    (5, ("_ext",)),
    (6, ("triton",)),
    (7, ("ops",)),
    (8, ("functional",)),
    (9, ("nn",)),
    (10, ("models",)),
    (11, ("",)),  # the package root (__init__)
    (12, ("analysis", "audit", "bench", "train", "cli", "_progress", "kernel_report")),
)
TOOLS = ("analysis", "audit", "bench", "train", "cli", "_progress", "kernel_report")


def _modules():
    """``{dotted name: path}`` of every module of the package (``''`` for the root)."""
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join(rel)] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _is_package(name):
    return MODULES[name].endswith("__init__.py")


def layer(name):
    best = None
    for rank, prefixes in LAYERS:
        for p in prefixes:
            if name == p or (p and name.startswith(p + ".")) or (not p and name == ""):
                if best is None or len(p) > best[1]:
                    best = (rank, len(p))
    assert best is not None, f"module {name!r} has no layer in LAYERS; add it"
    return best[0]


def _resolve(module, node):
    """The package modules an import statement of ``module`` reads, with the names it takes:
    ``[(target, [names])]``."""
    if isinstance(node, ast.Import):
        return [(a.name[len(PKG) + 1:] if a.name != PKG else "", []) for a in node.names
                if a.name == PKG or a.name.startswith(PKG + ".")]
    if node.level:
        base = module.split(".") if module else []
        if not _is_package(module):
            base = base[:-1]
        base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
        target = ".".join(base + ([node.module] if node.module else []))
    elif node.module == PKG or (node.module or "").startswith(PKG + "."):
        target = node.module[len(PKG) + 1:] if node.module != PKG else ""
    else:
        return []
    target = target.strip(".")
    out, plain = [], []
    for a in node.names:
        sub = f"{target}.{a.name}" if target else a.name
        if sub in MODULES:
            out.append((sub, []))  # `from package import submodule`
        else:
            plain.append(a.name)
    if plain:
        out.append((target, plain))
    return out


def _edges():
    edges = []
    for name, path in MODULES.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, names in _resolve(name, node):
                    if target in MODULES or target == "_C":
                        edges.append((name, target, names, node.lineno))
    return edges


EDGES = _edges()


def _show(name):
    return f"{PKG}.{name}" if name else PKG


def test_every_module_has_a_layer():
    for name in MODULES:
        layer(name)


def test_imports_only_point_down():
    upward = [f"{_show(a)}:{line} imports {_show(b)} (layer {layer(a)} -> {layer(b)})"
              for a, b, _, line in EDGES if b != "_C" and layer(b) > layer(a)]
    assert not upward, "imports that point upward:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = {}
    for a, b, _, _ in EDGES:
        if b in MODULES and a != b:
            graph.setdefault(a, set()).add(b)
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(MODULES):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(map(_show, c)) for c in cycles)


def test_no_private_names_imported_across_modules():
    private = [f"{_show(a)}:{line} imports {n} from {_show(b)}" for a, b, names, line in EDGES
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, "private names imported from another module:\n" + "\n".join(private)


def test_the_checker_sees_upward_imports_and_cycles():
    """The walk above resolves relative imports as Python does (else the tests above could not fail)."""
    assert layer("ops.mix_add_layernorm.cpp") == 7 and layer("bench.runner") == 12 and layer("") == 11
    targets = {(a, b) for a, b, _, _ in EDGES}
    assert ("functional", "ops.mix_add_layernorm") in targets  # `from .ops import mix_add_layernorm as ...`
    assert ("ops.mix_add_layernorm.cpp", "_ext") in targets    # `from ..._ext import ...`
    assert ("models.fused", "functional") in targets
    # an upward import, as ops/mix_add_layernorm/cpp.py would write it, is resolved and flagged
    node = ast.parse("from ...functional import mix_add_layernorm").body[0]
    [(target, names)] = _resolve("ops.mix_add_layernorm.cpp", node)
    assert (target, names) == ("functional", ["mix_add_layernorm"])
    assert layer(target) > layer("ops.mix_add_layernorm.cpp")


def test_import_loads_none_of_the_tools():
    code = ("import sys, noisynn_kernels\n"
            "tools = [m for m in sys.modules if m.split('.')[0] == 'noisynn_kernels' and len(m.split('.')) > 1\n"
            f"         and m.split('.')[1] in {TOOLS!r}]\n"
            "heavy = [m for m in ('matplotlib', 'sklearn') if m in sys.modules]\n"
            "print(tools, heavy)\n"
            "assert not tools and not heavy, (tools, heavy)\n"
            "import noisynn_kernels as nk\n"
            "assert nk.analysis.batch_dependence and 'noisynn_kernels.analysis' in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_tools_stay_reachable():
    import noisynn_kernels as nk

    for tool in ("analysis", "audit", "bench", "train"):
        assert getattr(nk, tool).__name__ == f"{PKG}.{tool}"
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        nk.nonsense  # noqa: B018
