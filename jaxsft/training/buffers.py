"""One trainer per set of live buffers.

A trainer donates its parameter buffers to every update, and the model it was built from is pointed at
the new ones. A second trainer built on that model (or on ``trainer.model``) would otherwise take the
first trainer's live buffers as its own, and its first update would delete them under the first
trainer ("Array has been deleted"). :func:`exclusive` gives the second trainer its own copy instead.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

import jax


class HoldsParams(Protocol):
    """A trainer, as far as buffer ownership goes: the arrays its updates donate."""

    @property
    def params(self) -> Any: ...


_LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()  # every constructed trainer still referenced somewhere


def _buffer_ids(tree: Any) -> set[int]:
    """Where each array's first local shard lives (deleted or foreign leaves are skipped)."""
    out = set()
    for leaf in jax.tree.leaves(tree):
        try:
            out.add(leaf.addressable_data(0).unsafe_buffer_pointer())
        except Exception:  # a deleted array, a non-array leaf, a backend without raw pointers
            continue
    return out


def exclusive(params: Any, owner: HoldsParams) -> Any:
    """``params``, copied if any of its buffers is one another live trainer's updates will donate; then
    ``owner`` is registered as the holder of what it returns. The copy keeps every array's sharding."""
    mine = _buffer_ids(params)
    held = set()
    for other in list(_LIVE):
        if other is not owner:
            held |= _buffer_ids(other.params)
    if mine & held:
        params = jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), params)
    _LIVE.add(owner)
    return params
