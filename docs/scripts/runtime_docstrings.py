"""Griffe extension for the API reference: docstrings assigned at import time.

Griffe reads the sources without running them, so a class whose docstring is set by code (the
pooling modules share one template, ``RobustGlobalPool1d.__doc__ = _MODULE_DOC.format(...)``)
would appear without one. For a public class or function without a static docstring this
extension imports the object and takes its runtime ``__doc__``.
"""

from __future__ import annotations

import importlib
import inspect

import griffe


class RuntimeDocstrings(griffe.Extension):
    """Fill missing docstrings of public classes and functions from the imported objects."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None or obj.name.startswith("_") or not (obj.is_class
                                                                       or obj.is_function):
            return
        doc = _runtime_doc(obj.module.path, obj.path[len(obj.module.path) + 1:])
        if doc:
            obj.docstring = griffe.Docstring(doc, parent=obj)


def _runtime_doc(module: str, qualname: str) -> str | None:
    if "__main__" in module.split("."):  # importing it would run the command line
        return None
    try:
        value = importlib.import_module(module)
        for part in qualname.split("."):
            value = getattr(value, part)
    except Exception:  # a module that cannot be imported here keeps its static docstring
        return None
    return inspect.getdoc(value)
