"""Not part of ddnlib: the repository root, seen as a package when Python runs in its parent folder.

A clone named ``ddnlib`` (``git clone … ddnlib``) sits in its parent folder as ``./ddnlib``. From
there, ``import ddnlib`` would find this folder first and import it as an empty namespace package,
hiding the installed library (``cannot import name 'DeclarativeNode' from 'ddnlib' (unknown
location)``): an editable install's import hook only runs after the search of ``sys.path``. This
file makes the folder a regular package whose import loads the real one, ``ddnlib/`` beside it,
under the same name; the install's hook then finds ``ddnlib.nodes`` as usual. It is not installed
(``pyproject.toml`` lists the packages), and a clone under another name is left inert.
"""

import importlib.util
import os
import sys

if __name__ == "ddnlib":  # a clone under another name stays an inert folder
    _package = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddnlib")
    _spec = importlib.util.spec_from_file_location(
        __name__, os.path.join(_package, "__init__.py"), submodule_search_locations=[_package])
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
