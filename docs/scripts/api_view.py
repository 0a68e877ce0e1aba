"""MkDocs hook: lay out the installed package for mkdocstrings as Python sees it.

The bundled nodes live in the top-level folder ``nodes/`` and are installed as ``ddnlib.nodes``
(a package-dir mapping). Griffe, which reads the sources for mkdocstrings, finds packages by their
folders and would not see ``ddnlib.nodes``. Before the build this hook writes ``build/api-view/``
with a copy of ``ddnlib/`` and of ``nodes/`` inside it as ``ddnlib/nodes`` (copies, not links:
griffe resolves links to their targets); ``mkdocs.yml`` points the Python handler's ``paths`` there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VIEW = ROOT / "build" / "api-view"


def write_view() -> None:
    package = VIEW / "ddnlib"
    if VIEW.exists():
        shutil.rmtree(VIEW)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "ddnlib", package, ignore=ignore)
    shutil.copytree(ROOT / "nodes", package / "nodes", ignore=ignore)


# Written when MkDocs loads this hook, i.e. while it reads mkdocs.yml: mkdocstrings resolves its
# ``paths`` in its own ``on_config``, which runs before a hook's, and drops a folder that does not
# exist yet (a fresh clone has no build/).
write_view()


def on_config(config, **kwargs):
    write_view()  # again for `mkdocs serve` rebuilds, so the view follows edited sources
    return config
