"""Parameter path names: one spelling ("layers/q_proj") for decay masks, weight tables and the facade.

A pytree path is a tuple of entries (dict keys, attributes, indices); each is named the same way
everywhere, so a name written by one module is found by another.
"""

from __future__ import annotations

from typing import Any


def key_name(key: Any) -> str:
    """The name of one pytree path entry (dict key, attribute or index), as used in parameter paths."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(path: tuple) -> str:
    """A whole pytree path as one "/"-joined name."""
    return "/".join(key_name(k) for k in path)
