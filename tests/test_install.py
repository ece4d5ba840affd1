"""The install: every extension the build made imports, every kernels module imports, the build
refuses in one sentence what it cannot do, the console script names a missing extra, and one
fresh-venv install (tests/install_matrix.py's cheapest case) works end to end."""
import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import hybridops
import hybridops.kernels

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import install_matrix  # noqa: E402  (the script beside this file)


def test_every_built_extension_and_kernels_module_imports():
    built = sorted(p.name.split(".")[0] for p in Path(hybridops.__file__).parent.glob("_C*.so"))
    if os.environ.get("HYBRIDOPS_BUILD_CPU", "1") != "0":
        assert "_C_cpu" in built  # required by setup.py: an install without it must have failed
    for name in built:
        importlib.import_module(f"hybridops.{name}")
    modules = [m.name for m in pkgutil.iter_modules(hybridops.kernels.__path__, "hybridops.kernels.")]
    assert "hybridops.kernels.onednn" in modules and "hybridops.kernels.qconv" in modules
    for name in modules:
        importlib.import_module(name)


def _setup_py(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HYBRIDOPS_BUILD_CUDA": "0", **(env or {})})


def test_build_without_torch_refuses_in_one_sentence():
    p = _setup_py("-c", "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
                        "import runpy; runpy.run_path('setup.py', run_name='__main__')")
    assert p.returncode != 0
    assert p.stderr.strip().splitlines()[-1].startswith("hybridops: torch is not importable while building")


def test_a_compiler_that_fails_ends_the_build_naming_the_extension(tmp_path):
    p = _setup_py("setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp",
                  str(tmp_path / "tmp"), env={"CXX": "false", "CC": "false"})
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("hybridops: could not compile hybridops._C_cpu") and "HYBRIDOPS_BUILD_CPU=0" in last
    assert not list((tmp_path / "lib").rglob("*.so"))


def test_console_script_without_the_extra_names_it_in_one_line():
    p = subprocess.run([sys.executable, "-c", "import sys; sys.modules['tqdm'] = None; "
                        "from hybridops_tracking.launcher import main; sys.exit(main(['--help']))"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip() == ("hybridops-track needs the [tracking] extra (tqdm not installed): "
                                "pip install 'hybridops[tracking]'")
    assert "tqdm" not in sys.modules or sys.modules["tqdm"] is not None  # this process untouched


def test_console_script_with_the_extra_runs_the_app(capsys):
    from hybridops_tracking.launcher import main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "synth" in capsys.readouterr().out


def test_fresh_venv_install_cheapest_case(tmp_path):
    """tests/install_matrix.py's 'ci' case: a new venv, setuptools from the machine's index, a
    non-editable --no-build-isolation install of a copy of this tree, imports from elsewhere."""
    result = install_matrix.run_case(next(c for c in install_matrix.CASES if c.name == "ci"), tmp_path)
    assert result.outcome == "ok", result.log[-3000:]
