"""Atomic checkpoints of the whole trainer state, and resuming from them.

A checkpoint is a folder ``checkpoint-<global_step>`` holding the parameters and optimizer state
(``arrays/``, written by orbax, shard by shard from every process, so nothing is gathered onto
one host) and ``trainer_state.json`` (step counters, log history, the shuffling RNG, the model's
architecture). It is written under a temporary name and renamed into place only when every part
is on disk, so a crash mid-save leaves the previous checkpoint as the newest complete one.
Non-finite weights or optimizer moments are refused before anything is written: a poisoned state
never replaces a good checkpoint.

Resuming restores everything ``step()`` depends on, so a run that saves, stops and resumes takes
the same updates, in the same order, as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import TYPE_CHECKING, Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

if TYPE_CHECKING:  # pragma: no cover
    from jaxsft.trainer import IterativeSFTTrainer

FORMAT = "jaxsft-trainer-checkpoint/1"
STATE_FILE = "trainer_state.json"
ARRAYS_DIR = "arrays"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_path(directory: str, global_step: int) -> str:
    return os.path.join(directory, f"checkpoint-{global_step}")


def latest_checkpoint(directory: str) -> Optional[str]:
    """The complete checkpoint with the highest step in ``directory``, or None (temporary folders never count)."""
    if not os.path.isdir(directory):
        return None
    steps = [int(m.group(1)) for name in os.listdir(directory) if (m := _NAME.match(name))]
    steps = [s for s in steps if os.path.isfile(os.path.join(checkpoint_path(directory, s), STATE_FILE))]
    return checkpoint_path(directory, max(steps)) if steps else None


def save(trainer: "IterativeSFTTrainer", directory: str) -> str:
    """Write ``trainer``'s whole state to ``directory/checkpoint-<global_step>`` atomically; returns that path.

    Every process must call this (each writes its own shards); process 0 writes the JSON and renames.
    An existing checkpoint of the same step is replaced only after the new one is complete.
    """
    import orbax.checkpoint as ocp

    _refuse_non_finite(trainer)
    final = checkpoint_path(directory, trainer.state.global_step)
    staging = os.path.join(directory, f".staging-checkpoint-{trainer.state.global_step}")
    if jax.process_index() == 0:
        os.makedirs(directory, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by a save that crashed
        os.makedirs(staging)
    _barrier("jaxsft-checkpoint-staging")
    arrays = {"params": nnx.to_pure_dict(trainer._params), "opt_state": trainer._opt_state}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(os.path.join(staging, ARRAYS_DIR)), arrays)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(staging, STATE_FILE), "w") as f:
            json.dump(_host_state(trainer), f, indent=1)
        if os.path.exists(final):
            retired = final + ".retired"
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired)
        else:
            os.replace(staging, final)
    _barrier("jaxsft-checkpoint-done")
    return final


def restore(trainer: "IterativeSFTTrainer", path: str) -> None:
    """Load a checkpoint written by :func:`save` into ``trainer`` (any mesh); every check runs before any change."""
    import orbax.checkpoint as ocp

    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise FileNotFoundError(
            f"restore_checkpoint: {path!r} is not a complete jaxsft checkpoint (no {STATE_FILE}); pass a "
            "checkpoint-<step> folder written by save_checkpoint, e.g. jaxsft.checkpoint.latest_checkpoint(dir)."
        )
    with open(state_file) as f:
        saved = json.load(f)
    if saved.get("format") != FORMAT:
        raise ValueError(f"restore_checkpoint: {path!r} has format {saved.get('format')!r}, expected {FORMAT!r}.")
    ours = _as_json(dataclasses.asdict(trainer.spec))
    if saved["model_spec"] != ours:
        diff = sorted(k for k in ours if saved["model_spec"].get(k) != ours[k])
        raise ValueError(
            f"restore_checkpoint: {path!r} was saved from a different architecture (differs in {diff}); build the "
            "trainer from the same model family and shape before restoring."
        )
    target = {
        "params": nnx.to_pure_dict(_abstract(trainer._params)),
        "opt_state": _abstract(trainer._opt_state),
    }
    try:
        arrays = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(path, ARRAYS_DIR)), target)
    except Exception as err:  # orbax: structure or shape mismatch (e.g. another optimizer)
        raise ValueError(
            f"restore_checkpoint: the arrays in {path!r} do not fit this trainer's parameters and optimizer state "
            f"({type(err).__name__}: {str(err)[:400]}); restore with the optimizer the checkpoint was trained with."
        ) from None

    # Nothing above changed the trainer; from here on it is assignment only.
    params = trainer._params
    nnx.replace_by_pure_dict(params, arrays["params"])
    trainer._params = params
    trainer._opt_state = arrays["opt_state"]
    host = saved["trainer"]
    trainer.state.global_step = int(host["global_step"])
    trainer.state.log_history = list(host["log_history"])
    trainer.state.num_input_tokens_seen = int(host["num_input_tokens_seen"])
    trainer.state.total_label_tokens = int(host["total_label_tokens"])
    trainer._rng.bit_generator.state = host["rng"]
    trainer._last_logged_step = int(host["last_logged_step"])
    trainer._loss_since_log = [float(x) for x in host["loss_since_log"]]
    trainer._params_version += 1
    nnx.update(trainer._user_model, trainer._params)


# ---------------------------------------------------------------------------------------- helpers
def _host_state(trainer: "IterativeSFTTrainer") -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model_spec": _as_json(dataclasses.asdict(trainer.spec)),
        "config": _as_json(dataclasses.asdict(trainer.config)),
        "mesh": dict(trainer.mesh.shape),
        "trainer": {
            "global_step": trainer.state.global_step,
            "log_history": trainer.state.log_history,
            "num_input_tokens_seen": trainer.state.num_input_tokens_seen,
            "total_label_tokens": trainer.state.total_label_tokens,
            "rng": trainer._rng.bit_generator.state,
            "last_logged_step": trainer._last_logged_step,
            "loss_since_log": list(trainer._loss_since_log),
        },
    }


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, odd objects their repr), for comparisons."""
    return json.loads(json.dumps(value, default=repr))


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]) if leaves else jnp.ones((0,), bool)


def _refuse_non_finite(trainer: "IterativeSFTTrainer") -> None:
    """The NaN guard: raise, naming the first bad array, if any weight or optimizer value is NaN or inf."""
    named = []
    for prefix, tree in (("params", trainer._params), ("opt_state", trainer._opt_state)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if jnp.issubdtype(leaf.dtype, jnp.inexact):
                named.append((prefix + jax.tree_util.keystr(path), leaf))
    flags = np.asarray(jax.device_get(_finite_flags([leaf for _, leaf in named])))
    bad = [name for (name, _), ok in zip(named, flags) if not ok]
    if bad:
        raise FloatingPointError(
            f"save_checkpoint: refusing to save a non-finite state ({len(bad)} arrays hold NaN or inf, first "
            f"{bad[0]}); the checkpoints already on disk are untouched. Restore the latest one "
            "(jaxsft.checkpoint.latest_checkpoint) and lower the learning rate or enable clipping."
        )


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
