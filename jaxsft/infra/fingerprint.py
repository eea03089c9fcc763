"""What must be equal on every process, as values ``jaxsft.infra.distributed.agree`` can compare.

A trainer's processes each build their own trainer; if one was given another learning rate or
optimizer, SPMD programs would still run and report the same loss while the "replicated" weights
drift apart. So every process's update-relevant configuration, model spec and a cheap digest of its
initial parameters are compared before training (and the checkpoint's host checksum at restore).
The array digests are also the checkpoints' per-array checksums.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

# TrainConfig fields that change nothing any process computes (display, sinks, waiting): may differ.
LOCAL_FIELDS = ("disable_tqdm", "report_to", "logging_dir", "agreement_timeout_s", "logging_steps", "compilation_cache",
                "compilation_cache_dir")


def as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, odd objects their repr), for comparisons."""
    return json.loads(json.dumps(value, default=repr))


def of_training(config: Any, spec: Any, run_options: Any = None) -> dict[str, Any]:
    """The configuration that shapes every update (all TrainConfig fields but ``LOCAL_FIELDS``, flattened
    to their names, so a difference is reported by field) and the model's architecture."""
    fields = {}
    for name, value in dataclasses.asdict(config).items():
        if isinstance(value, dict) and name in ("optimization", "precision", "performance"):
            fields.update(value)
        else:
            fields[name] = value
    out = {f"config.{k}": v for k, v in as_json(fields).items() if k not in LOCAL_FIELDS}
    out["model_spec"] = as_json(dataclasses.asdict(spec))
    if run_options is not None:
        out["model_options"] = repr(run_options)
    return out


def of_state(params: Any, opt_state: Any, learning_rate_at: Callable[[int], Optional[float]]) -> dict[str, Any]:
    """A trainer's initial state: per-array digests of the parameters (multi-process only: a compiled
    reduction; this process's own copy of each replicated array), the optimizer state's structure
    (adamw against sgd) and the learning rate at a few steps."""
    leaves = jax.tree.leaves(params)
    return {
        "initial_params": array_digests(leaves) if jax.process_count() > 1 else len(leaves),
        "optimizer_state": str(jax.tree.structure(opt_state)),
        "learning_rates": [learning_rate_at(k) for k in (0, 1, 10, 100, 1000)],
    }


def _as_words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (16- and 8-bit types widened), for an order-free checksum."""
    width = jnp.dtype(x.dtype).itemsize
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


@jax.jit
def _digest_arrays(leaves: list[jax.Array]) -> jax.Array:
    """Two wrapping uint32 sums per array: plain and position-weighted. Integer sums are exact in any
    reduction order, so the digest is the same on any mesh (a checkpoint resumes onto another one)."""
    out = []
    for x in leaves:
        words = _as_words(x)
        index = jnp.arange(words.shape[0], dtype=jnp.uint32)
        mixed = (words ^ (index * jnp.uint32(0x9E3779B9))) * (index * jnp.uint32(2) + jnp.uint32(1))
        out.append(jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(mixed, dtype=jnp.uint32)]))
    return jnp.stack(out) if out else jnp.zeros((0, 2), jnp.uint32)


def array_digests(leaves: list[jax.Array]) -> list[list[int]]:
    return [[int(a), int(b)] for a, b in np.asarray(jax.device_get(_digest_arrays(leaves)))]


