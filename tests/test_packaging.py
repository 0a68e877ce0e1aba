"""The built wheel installs ``nodes/`` as ``ddnlib.nodes`` (package-dir mapping)."""

from __future__ import annotations

import os
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
