"""The tracker is an application of hybridops (``apps/tracking``, imported as
``hybridops_tracking``): the core must not import it or its plotting/progress dependencies, and
the application may use only the core's public API."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import hybridops
import hybridops_tracking

APP_DIR = Path(hybridops_tracking.__file__).parent


def _modules_after(code: str) -> set:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True, cwd="/")
    return set(out.stdout.split())


def test_core_import_pulls_in_no_tracking_code_or_app_dependencies():
    core = _modules_after("import hybridops")
    assert not {m for m in core if m.startswith(("hybridops_tracking", "hybridops.tracking"))}
    assert not {m for m in core if m.split(".")[0] == "matplotlib"}
    # torch itself may import tqdm; hybridops must add nothing of it beyond what torch loads.
    torch_only = _modules_after("import torch")
    assert {m for m in core if m.split(".")[0] == "tqdm"} <= torch_only


def test_core_has_no_tracking_subpackage():
    assert not (Path(hybridops.__file__).parent / "tracking").exists()
    assert APP_DIR.name == "tracking" and APP_DIR.parent.name == "apps"


def test_app_uses_only_the_public_core_api():
    """Every ``ho.<name>`` and ``from hybridops import <name>`` in the app is in ``hybridops.__all__``,
    and no module below ``hybridops`` (e.g. ``hybridops.conversion``) is imported directly."""
    public = set(hybridops.__all__)
    used, private_imports = set(), []
    for path in sorted(APP_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ho":
                used.add(node.attr)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hybridops"):
                if node.module != "hybridops":
                    private_imports.append(f"{path.name}: from {node.module}")
                used.update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                private_imports += [f"{path.name}: import {a.name}" for a in node.names
                                    if a.name.startswith("hybridops.")]
    assert used, "the app should use the core API somewhere"
    assert not private_imports, private_imports
    assert used <= public, sorted(used - public)
