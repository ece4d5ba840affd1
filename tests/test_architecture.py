"""The package's layering, checked on the source: imports flow one way,

    hybridops API (__init__, network) -> conversion / fusion / bops / losses / online / training / graph
    -> layers / deployed / quant / prune / config / backend -> ops -> kernels

and nothing flows back; kernels read only the op layer's leaf modules (packing, geometry); no
import hides inside a function (the optional Triton kernels and compiled extensions load through
``importlib`` in ``hybridops/ops/backends.py``, where the backend registry reports why one is
missing); and ``import hybridops`` loads neither Triton, the kernels, the tracking app nor
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
    "config": 2, "quant": 2, "prune": 2, "layers": 2, "deployed": 2, "backend": 2,
    "graph": 3, "fusion": 3, "bops": 3, "losses": 3, "online": 3, "conversion": 3, "training": 3,
    "network": 4, "__init__": 5,
}
SAME_RANK_OK = {
    ("layers", "config"), ("layers", "prune"), ("layers", "quant"),  # a layer is built from its quantizer and gate
    ("layers", "backend"),  # eval-mode forwards run the deployed twin on the default backend
    ("conversion", "fusion"),  # deploy_ fuses epilogues after swapping layers
    ("fusion", "graph"),  # fusion reads the traced graph
}
KERNEL_MAY_IMPORT = {"hybridops.kernels.packing", "hybridops.kernels.geometry", "hybridops._C_cpu"}


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


def _imports():
    for path, module in _sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield path, module, node, tree


def test_every_core_module_has_a_rank():
    units = {_unit(m) for _, m in _sources()}
    assert None not in units, "a new module needs a place in RANKS"


def test_imports_flow_one_way():
    bad = []
    for path, module, node, _ in _imports():
        src = _unit(module)
        for name in _imported(node, module):
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


def test_kernels_read_only_the_op_layers_leaf_modules():
    bad = []
    for path, module, node, _ in _imports():
        if _unit(module) != "kernels":
            continue
        for name in _imported(node, module):
            if name.startswith("hybridops") and not name.startswith("hybridops.kernels") \
                    and name not in KERNEL_MAY_IMPORT:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not bad, "\n".join(bad)


def test_no_import_inside_a_function():
    bad = []
    for path, module, node, tree in _imports():
        if not any(node is n or any(node is m for m in ast.walk(n)) for n in tree.body
                   if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))):
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, "function-level imports (load optional dependencies through the registry):\n" + "\n".join(bad)


def test_import_hybridops_loads_no_optional_module():
    code = ("import sys, json; import hybridops; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('triton', 'matplotlib', 'hybridops_tracking', 'cupy') or m.startswith('hybridops.kernels'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("module", ["hybridops.ops.custom_ops", "hybridops.layers", "hybridops.deployed",
                                    "hybridops.conversion", "hybridops.kernels.onednn"])
def test_each_module_imports_first(module):
    """Any module imports first in a fresh interpreter: no cycle that import order hides."""
    out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
