"""The package's layering, checked on the source: imports flow one way,

    hybridops API (__init__, network) -> conversion / fusion / bops / losses / online / training / graph
    -> layers / deployed / quant / prune / config / backend_selection -> ops -> kernels

and nothing flows back: kernels import nothing from the package but the compiled CPU kernels
(the format, geometry and derived-tensor cache they share with the op layer live in
``kernels/``); no import hides inside a function; an ``importlib.import_module`` of a literal name
(how ``hybridops/ops/registry.py`` loads the optional Triton kernels and compiled extensions on
first use) counts as an import and follows the same rules, and no other module imports by
string; no module plugs a function into another through a module global (a hidden upward edge);
and ``import hybridops`` loads neither Triton, a backend's kernels, the tracking app nor
matplotlib.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# rank of each module of the core (package-relative dotted name); a module may import modules of
# a lower rank, and of its own rank only where listed in SAME_RANK_OK
RANKS = {
    "kernels": 0,
    "ops": 1,
    "config": 2, "quant": 2, "prune": 2, "layers": 2, "deployed": 2, "backend_selection": 2, "attention": 2,
    "graph": 3, "fusion": 3, "bops": 3, "losses": 3, "online": 3, "conversion": 3, "training": 3, "thin": 3,
    "network": 4, "__init__": 5,
}
SAME_RANK_OK = {
    ("layers", "config"), ("layers", "prune"), ("layers", "quant"),  # a layer is built from its quantizer and gate
    ("layers", "backend_selection"),  # eval-mode forwards run the deployed twin on the default backend
    ("layers", "deployed"),  # a trainable layer packs itself into its deployed twin (deploy_layer)
    ("attention", "quant"), ("attention", "backend_selection"),  # the attention products' quantizers and kernels
    ("conversion", "fusion"),  # deploy_ fuses epilogues after swapping layers
    ("fusion", "graph"),  # fusion reads the traced graph
    ("thin", "graph"),  # the thin pruned network is a rewrite of the traced graph
    ("bops", "thin"),  # counting runs a thin network's layers whole (their hooks count)
}
KERNEL_MAY_IMPORT = {"hybridops._C_cpu"}
# the modules of kernels/ that import hybridops loads (pure PyTorch: the format, the geometry, the
# one cache); the backends' launchers load on first use
KERNEL_LEAVES = {"hybridops.kernels", "hybridops.kernels.packing", "hybridops.kernels.geometry",
                 "hybridops.kernels.derived"}
# the backend registrations and the cuda backend's loader of its compiled extensions
STRING_IMPORTS_OK = {"hybridops.ops.registry", "hybridops.ops.cuda_ext"}


def _sources():
    for path in sorted((ROOT / "hybridops").rglob("*.py")):
        rel = path.relative_to(ROOT / "hybridops").with_suffix("")
        yield path, "hybridops." + ".".join(rel.parts)
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        rel = path.relative_to(ROOT / "kernels").with_suffix("")
        yield path, "hybridops.kernels." + ".".join(rel.parts)


COMPILED = {"hybridops._C", "hybridops._C_cpu"}


def _is_module(name: str) -> bool:
    modules = {m for _, m in _sources()}
    return name in COMPILED or name in modules or f"{name}.__init__" in modules


def _imported(node: ast.AST, module: str):
    """Absolute names of the modules an import statement reads (``from . import x`` -> ``pkg.x``
    when x is a module, ``from .m import f`` -> ``pkg.m``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    pkg = module.split(".")[:-1]  # the package the module is in (for __init__: the package itself)
    base = ".".join(pkg[: len(pkg) - node.level + 1]) if node.level else ""
    mod = ".".join(p for p in (base, node.module or "") if p)
    subs = [f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}")]
    return subs if len(subs) == len(node.names) else [mod] + subs


def _unit(name: str):
    """The layering unit of an absolute hybridops module name, or None outside the core."""
    parts = name.split(".")
    if parts[0] != "hybridops" or len(parts) == 1:
        return "__init__" if name == "hybridops" else None
    if parts[1] in ("kernels", "ops"):
        return parts[1]
    return parts[1] if parts[1] in RANKS else None


def _string_import(node: ast.AST):
    """The module name of ``importlib.import_module("name")`` / ``import_module("name")``, "" for
    a call with a computed name, None for any other node."""
    if not isinstance(node, ast.Call):
        return None
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name not in ("import_module", "__import__"):
        return None
    arg = node.args[0] if node.args else None
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else ""


def _imports():
    """(path, module, node, tree, imported names) for every import statement and every
    import_module call of a literal name."""
    for path, module in _sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield path, module, node, tree, _imported(node, module)
            elif _string_import(node):
                yield path, module, node, tree, [_string_import(node)]


def test_every_core_module_has_a_rank():
    units = {_unit(m) for _, m in _sources()}
    assert None not in units, "a new module needs a place in RANKS"


def test_imports_flow_one_way():
    bad = []
    for path, module, node, _, names in _imports():
        src = _unit(module)
        for name in names:
            dst = _unit(name)
            if dst is None or dst == src:
                continue
            if name in COMPILED:
                continue  # compiled kernels: the bottom layer
            if src == "kernels" and name in KERNEL_MAY_IMPORT:
                continue  # shared leaf modules (format and geometry), see the next test
            if RANKS[dst] > RANKS[src] or (RANKS[dst] == RANKS[src] and (src, dst) not in SAME_RANK_OK):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} ({src}) imports {name} ({dst})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_kernels_import_nothing_from_the_package():
    bad = []
    for path, module, node, _, names in _imports():
        if _unit(module) != "kernels":
            continue
        for name in names:
            if name.startswith("hybridops") and not name.startswith("hybridops.kernels") \
                    and name not in KERNEL_MAY_IMPORT:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not bad, "\n".join(bad)


def test_no_import_inside_a_function():
    bad = []
    for path, module, node, tree, _ in _imports():
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if not any(node is n or any(node is m for m in ast.walk(n)) for n in tree.body
                   if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))):
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, "function-level imports (load optional dependencies through the registry):\n" + "\n".join(bad)


def test_string_imports_only_where_backends_load():
    """Importing by string hides an edge from a reader: only the backend registrations may, with a
    literal name (checked by the tests above); nothing imports a computed name."""
    bad = []
    for path, module in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = _string_import(node)
            if name is not None and (name == "" or module not in STRING_IMPORTS_OK):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, "imports by string:\n" + "\n".join(bad)


def test_no_module_global_plugs():
    """A module global that a function rebinds (``global f``) and that the module then calls is a
    plug: another module fills it at import time, an upward edge no import shows."""
    bad = []
    for path, module in _sources():
        tree = ast.parse(path.read_text(), str(path))
        rebound = {n for node in ast.walk(tree) if isinstance(node, ast.Global) for n in node.names}
        called = {node.func.id for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        bad += [f"{path.relative_to(ROOT)}: {n}" for n in sorted(rebound & called)]
    assert not bad, "module-global plugs:\n" + "\n".join(bad)


def test_the_plug_detector_sees_one(tmp_path):
    tree = ast.parse("_f = None\ndef register(f):\n    global _f\n    _f = f\ndef use(x):\n    return _f(x)\n")
    rebound = {n for node in ast.walk(tree) if isinstance(node, ast.Global) for n in node.names}
    called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert rebound & called == {"_f"}
    assert _string_import(ast.parse("importlib.import_module(name)").body[0].value) == ""
    assert _string_import(ast.parse("importlib.import_module('a.b')").body[0].value) == "a.b"


def test_import_hybridops_loads_no_optional_module():
    code = ("import sys, json; import hybridops; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('triton', 'matplotlib', 'hybridops_tracking', 'cupy') or m.startswith('hybridops.kernels'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert set(json.loads(out.stdout.strip().splitlines()[-1])) <= KERNEL_LEAVES


@pytest.mark.parametrize("module", ["hybridops.ops.custom_ops", "hybridops.ops.layer_op", "hybridops.layers",
                                    "hybridops.deployed", "hybridops.conversion", "hybridops.kernels.onednn"])
def test_each_module_imports_first(module):
    """Any module imports first in a fresh interpreter: no cycle that import order hides."""
    out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
