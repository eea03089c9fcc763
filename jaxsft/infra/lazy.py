"""Submodules imported on first attribute access (PEP 562), so importing a package stays light.

``jaxsft``'s packages used to import their parts eagerly; now ``import jaxsft.infra.config`` needs no JAX
(the facade's config reads its constants where only torch and transformers are installed) and
``jaxsft.infra.distributed`` after ``import jaxsft`` still works: the package's ``__getattr__`` calls this.
"""

from __future__ import annotations

import importlib
from typing import Any


def submodule(package: str, name: str) -> Any:
    """``package.name`` imported, or the ``AttributeError`` a missing attribute gives (a missing dependency of
    an existing submodule is raised as the ``ImportError`` it is)."""
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{package}.{name}":
                raise
    raise AttributeError(f"module {package!r} has no attribute {name!r}")
