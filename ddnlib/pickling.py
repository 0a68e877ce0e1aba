"""Pickling of modules with ``torch.nn.utils.parametrize`` parametrisations.

``parametrize`` refuses to pickle a parametrised module (only its ``state_dict``), which breaks
``pickle``, ``torch.save(model)`` and multiprocessing for every node with a learnable, constrained
parameter (a positive ``c``, an ``α`` in an interval, a positive radius). :class:`Picklable`
reduces such a module to its plain class, its state without the parametrisations, and for each
parametrised tensor the chain of parametrisation modules and the exact ``original`` tensor;
unpickling registers the chains again and restores ``original`` bit for bit.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

__all__ = ["Picklable"]


def _rebuild(cls: type, state: dict, chains: list) -> torch.nn.Module:
    module = cls.__new__(cls)
    module.__dict__.update(state)
    for name, chain, original in chains:
        for parametrization in chain:
            parametrize.register_parametrization(module, name, parametrization, unsafe=True)
        with torch.no_grad():
            module.parametrizations[name].original.copy_(original)
    return module


class Picklable:
    """Mixin for ``torch.nn.Module`` subclasses: pickling that survives ``parametrize``."""

    def __reduce_ex__(self, protocol):
        if not parametrize.is_parametrized(self):
            return super().__reduce_ex__(protocol)
        state = dict(self.__dict__)
        modules = dict(state["_modules"])
        entries = modules.pop("parametrizations")
        parameters = dict(state["_parameters"])
        chains = []
        for name, entry in entries.items():
            parameters[name] = entry.original
            chains.append((name, list(entry), entry.original.detach().clone()))
        state["_modules"], state["_parameters"] = modules, parameters
        plain = type(self).__bases__[0]  # parametrize subclasses the module's class once
        return _rebuild, (plain, state, chains)
