"""HF-layout weights on the device: what the torch weight sync needs from the core.

A weight-table row's op (``jaxsft.models.weights``) is the same reshape / transpose that
saving uses; :func:`hf_layout_on_device` runs it over all layers at once in one compiled
program, so a stacked weight leaves the accelerator already in HF's layout and dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("op", "per_layer", "dtype"))
def hf_layout_on_device(xs: tuple, op: Any, per_layer: bool, dtype: str) -> jax.Array:
    """The row's HF layout of ``xs`` (stacked over layers for a per-layer row), cast to ``dtype`` by name."""
    return op.to_hf([x.astype(jnp.dtype(dtype)) for x in xs], lead=1 if per_layer else 0)
