"""Lazy re-exports for package ``__init__`` modules (PEP 562).

A package lists its public names and the submodule defining each; a name is
imported on first access, so ``import musepayne`` (and the command line tool)
costs only what a code path uses, while ``dir()``, ``help()`` and
``from musepayne import X`` see every public name.
"""

from __future__ import annotations

import importlib


def attach(package: str, exports: dict[str, list[str]]):
    """Return ``(__getattr__, __dir__, __all__)`` for a package.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    exports : dict of str to list of str
        Submodule name (relative to ``package``) -> public names it defines.

    Returns
    -------
    getattr_ : callable
        Module-level ``__getattr__`` that imports a name on first access.
    dir_ : callable
        Module-level ``__dir__`` listing the public names.
    all_ : list of str
        The package's ``__all__``.
    """
    where = {name: mod for mod, names in exports.items() for name in names}
    all_ = sorted(where)

    def getattr_(name):
        mod = where.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{mod}"), name)

    def dir_():
        return list(all_)

    return getattr_, dir_, all_
