"""Install hybridops in fresh virtual environments across pip / setuptools / wheel versions and
check that every backend's compiled part imports.

    python tests/install_matrix.py                 # every case, table to docs/install_matrix.md
    python tests/install_matrix.py --cases ci      # the cheapest case (tests/test_install.py runs it)

Each case makes a venv (``--system-site-packages``, so the installed torch is used and nothing is
downloaded; the venv's own pip, setuptools and wheel shadow the system's), installs the pip /
setuptools / wheel versions of the case from the machine's package index, copies the working tree
(tracked and untracked-but-not-ignored files, so local build outputs are not reused), installs it
the case's way, and then, from another folder, imports ``hybridops``, ``hybridops.kernels`` (every
module), ``hybridops._C_cpu`` and asks the backend registry whether ``onednn`` loads; the console
script must answer ``--help``. A case expected to fail must fail with hybridops's own sentence
(setup.py's ``check_wheel_command``). The CUDA extension is skipped (``HYBRIDOPS_BUILD_CUDA=0``):
its build takes minutes and is covered by the GPU suite.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parent.parent
ENSUREPIP = "ensurepip"  # the venv's bundled pip / setuptools (Python 3.11: pip 23.2.1, setuptools 65.5.0)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    pip: str = ENSUREPIP
    setuptools: str = ENSUREPIP
    wheel: Optional[str] = None
    editable: bool = False
    isolated: bool = False  # build isolation: pip installs pyproject.toml's requirements (torch too)
    # the sentence a case must end with when it cannot work (empty: it must install)
    fails_with: str = ""


# setuptools 65.5 cannot build wheels without the wheel package (setup.py's check_wheel_command).
OLD_SETUPTOOLS = "cannot build wheels without the wheel package"
CASES = [
    Case("ci", setuptools="84.0.0"),
    Case("venv-default", fails_with=OLD_SETUPTOOLS),
    Case("venv-default-editable", editable=True, fails_with=OLD_SETUPTOOLS),
    Case("st65-wheel-editable", wheel="0.46.3", editable=True),
    Case("pip24-st70-editable", pip="24.3.1", setuptools="70.1.0", editable=True),
    Case("pip24-st75-wheel", pip="24.3.1", setuptools="75.8.0", wheel="0.45.1"),
    Case("pip25-st80-editable", pip="25.3", setuptools="80.9.0", editable=True),
    Case("pip25-st84-wheel-editable", pip="25.3", setuptools="84.0.0", wheel="0.48.0", editable=True),
    Case("pip26-st84", pip="26.2.1", setuptools="84.0.0"),
    Case("pip26-st84-editable", pip="26.2.1", setuptools="84.0.0", editable=True),
    Case("pip23-st65-isolated", isolated=True),
]

CHECK = r"""
import importlib, pkgutil, sys
import hybridops, hybridops.kernels, hybridops._C_cpu
from hybridops.backend_selection import backend_unavailable_reason
mods = [m.name for m in pkgutil.iter_modules(hybridops.kernels.__path__, "hybridops.kernels.")]
for m in mods:
    importlib.import_module(m)
reason = backend_unavailable_reason("onednn", "cpu")
assert reason is None, reason
print("from", hybridops.__file__, hybridops.kernels.__file__, hybridops._C_cpu.__file__)
print("kernels modules:", len(mods))
"""


@dataclasses.dataclass
class Result:
    case: Case
    versions: str
    outcome: str
    seconds: float
    log: str


def _run(cmd: List[str], cwd: Path, env: dict, log: List[str]) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    log.append(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}")
    return p


def _copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def run_case(case: Case, work: Path) -> Result:
    t0 = time.perf_counter()
    log: List[str] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["HYBRIDOPS_BUILD_CUDA"] = "0"
    venv, src, elsewhere = work / "venv", work / "src", work / "elsewhere"
    elsewhere.mkdir(parents=True)
    src.mkdir()
    py = str(venv / "bin" / "python")

    def done(outcome: str) -> Result:
        # read from the venv's metadata: importing setuptools there meets the system's distutils hack
        p = subprocess.run([py, "-c", "import importlib.metadata as m\n"
                            "def v(n):\n"
                            "    try: return m.version(n)\n"
                            "    except m.PackageNotFoundError: return 'none'\n"
                            "print(f\"pip {v('pip')}, setuptools {v('setuptools')}, wheel {v('wheel')}\")"],
                           env=env, capture_output=True, text=True, cwd=elsewhere)
        return Result(case, p.stdout.strip() or "?", outcome, time.perf_counter() - t0, "\n".join(log))

    if _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], work, env, log).returncode:
        return done("venv failed")
    tools = [f"{n}=={v}" for n, v in (("pip", case.pip), ("setuptools", case.setuptools), ("wheel", case.wheel))
             if v and v != ENSUREPIP]
    if tools and _run([py, "-m", "pip", "install", "-q", *tools], work, env, log).returncode:
        return done("could not install " + " ".join(tools))
    _copy_tree(src)
    cmd = [py, "-m", "pip", "install", "--no-deps"] + ([] if case.isolated else ["--no-build-isolation"])
    cmd += ["-e", str(src)] if case.editable else [str(src)]
    p = _run(cmd, elsewhere, env, log)
    if p.returncode:
        lines = [ln.strip() for ln in (p.stdout + p.stderr).splitlines()]
        said = [ln.split("hybridops: ", 1)[1] for ln in lines if case.fails_with and case.fails_with in ln]
        if said:
            return done("refused as expected: " + said[-1])
        errors = [ln for ln in lines if ln.startswith("error: ") and "subprocess-exited-with-error" not in ln]
        return done("FAILED: " + (errors or lines or ["?"])[0])
    if case.fails_with:
        return done("FAILED: installed although it was expected to refuse")
    p = _run([py, "-c", CHECK], elsewhere, env, log)
    if p.returncode:
        return done("FAILED import: " + (p.stderr.strip().splitlines() or ["?"])[-1])
    where = p.stdout.split()
    if not all(str(w).startswith((str(venv), str(src))) for w in where[1:4]):
        return done("FAILED: imported another copy: " + " ".join(where[1:4]))
    script = venv / "bin" / "hybridops-track"
    p = _run([str(script), "--help"], elsewhere, env, log)
    if p.returncode:
        return done("FAILED: hybridops-track --help: " + (p.stderr.strip().splitlines() or ["?"])[-1])
    return done("ok")


def table(results: List[Result], header: str) -> str:
    rows = [header, "", "| case | pip, setuptools, wheel | install | result | s |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        how = ("editable" if r.case.editable else "wheel") + (", isolated" if r.case.isolated else
                                                              ", --no-build-isolation")
        rows.append(f"| {r.case.name} | {r.versions} | {how} | {r.outcome} | {r.seconds:.0f} |")
    return "\n".join(rows) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=[c.name for c in CASES],
                    help=f"case names (default: all): {', '.join(c.name for c in CASES)}")
    ap.add_argument("--out", type=Path, help="write the markdown table here")
    ap.add_argument("--log-dir", type=Path, help="keep each case's pip output here")
    args = ap.parse_args(argv)
    by_name = {c.name: c for c in CASES}
    unknown = [n for n in args.cases if n not in by_name]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(by_name)}")
    results = []
    for name in args.cases:
        with tempfile.TemporaryDirectory(prefix=f"hybridops-install-{name}-") as tmp:
            r = run_case(by_name[name], Path(tmp))
        results.append(r)
        print(f"{name}: {r.outcome} ({r.seconds:.0f} s)", flush=True)
        if args.log_dir:
            args.log_dir.mkdir(parents=True, exist_ok=True)
            (args.log_dir / f"{name}.log").write_text(r.log)
    if args.out:
        py = sys.version.split()[0]
        args.out.write_text(table(results, f"Installs by `tests/install_matrix.py` on Python {py}, "
                                           f"{time.strftime('%Y-%m-%d')} (HYBRIDOPS_BUILD_CUDA=0)."))
    return 1 if any(r.outcome.startswith("FAILED") or "failed" in r.outcome for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
