"""Griffe extension for the API reference: Sphinx roles in docstrings become cross-references.

Docstrings may name other objects the Sphinx way, ``:class:`~ddnlib.Options``` or
``:meth:`vjp```; mkdocstrings renders Markdown, where those roles would show verbatim. This extension
rewrites each role into an (optional) autorefs link: the name is resolved in the docstring's scope,
``~`` shows only its last component, and a target that is not on the site renders as plain code.
"""

from __future__ import annotations

import html
import re

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([\w.]+)`")


class SphinxRoles(griffe.Extension):
    """Convert ``:role:`target``` to links when griffe loads an object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(lambda m: _link(obj, m[1] == "~", m[2]),
                                            obj.docstring.value)


def _link(obj: griffe.Object, short: bool, name: str) -> str:
    try:
        target = obj.resolve(name)
    except Exception:  # a name griffe cannot place: keep it as code, unlinked
        target = name
    shown = name.rsplit(".", 1)[-1] if short else name
    return (f'<autoref optional identifier="{html.escape(target)}">'
            f"<code>{html.escape(shown)}</code></autoref>")
