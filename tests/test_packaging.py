"""Packaging: the built wheel installs ``nodes/`` as ``ddnlib.nodes`` (package-dir mapping); a
fresh clone named ``ddnlib``, installed editable as the README says, imports from its parent
folder too (where the clone's root would otherwise shadow the install as a namespace package);
and a quick benchmark run leaves the clone's ``git status`` clean."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(out)],
        check=True, capture_output=True, text=True,
    )
    (path,) = out.glob("ddnlib-*.whl")
    return path


def test_wheel_contains_the_nodes_subpackage(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "ddnlib/nodes/__init__.py" in names
    assert not any(n.startswith("nodes/") for n in names)
    bundled = {p.name for p in (ROOT / "nodes").glob("*.py")}
    assert bundled <= {Path(n).name for n in names if n.startswith("ddnlib/nodes/")}


def test_nodes_import_from_the_installed_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, text=True)
    code = ("import ddnlib, ddnlib.nodes; "
            "assert ddnlib.__file__.startswith(%r), ddnlib.__file__; "
            "print(len(ddnlib.nodes.__all__))" % str(target))
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- a fresh clone named ddnlib, next to the user's own scripts --------------------------------

def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.org",
                           *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, Path]:
    """``(parent, python)``: ``parent/ddnlib``, a git repository of this working tree's files
    (tracked and new, as a clone made from it would hold), installed editable, without
    dependencies or network, into a venv that sees this environment's packages."""
    parent = tmp_path_factory.mktemp("work")
    repo = parent / "ddnlib"
    listed = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT)
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    _git("init", "-q", cwd=repo)
    _git("add", "-A", cwd=repo)
    _git("commit", "-q", "-m", "clone", cwd=repo)
    venv = parent / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "-e", str(repo)], check=True, capture_output=True, text=True)
    return parent, python


def _run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


_IMPORTS = ("import ddnlib, ddnlib.nodes, ddnlib.testing\n"
            "from ddnlib import DeclarativeNode\n"
            "from ddnlib.nodes import L2Sphere\n"
            "print(ddnlib.__file__, ddnlib.nodes.__file__, DeclarativeNode.__module__)\n")


def test_the_clone_imports_from_its_parent_folder_in_a_script_and_with_python_m(clone):
    parent, python = clone
    repo = parent / "ddnlib"
    (parent / "my_script.py").write_text(_IMPORTS)
    result = _run(python, "my_script.py", cwd=parent)
    assert result.returncode == 0, result.stderr
    package, nodes, module = result.stdout.split()
    assert package == str(repo / "ddnlib" / "__init__.py")
    assert nodes == str(repo / "nodes" / "__init__.py") and module == "ddnlib.node"
    result = _run(python, "-m", "ddnlib", "gradcheck", "--help", cwd=parent)
    assert result.returncode == 0 and "package.module:NodeClass" in result.stdout, result.stderr


def test_a_quick_benchmark_run_leaves_the_clone_clean(clone):
    parent, python = clone
    repo = parent / "ddnlib"
    result = _run(python, "-m", "benchmarks", "unrolled", "--quick", "--repeats", "1", cwd=repo)
    assert result.returncode == 0, result.stderr
    assert (repo / "build" / "benchmarks" / "results.json").is_file()
    assert _git("status", "--porcelain", "--untracked-files=all", cwd=repo) == ""


@pytest.mark.parametrize("argv", [["--quick", "--docs"], ["unrolled", "--docs"]])
def test_docs_are_only_written_from_a_full_run(argv, capsys):
    from benchmarks.run import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "--docs publishes a full run of every case" in capsys.readouterr().err
