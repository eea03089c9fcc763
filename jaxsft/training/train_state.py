"""The trainer's state: the device half (one pytree the programs take and donate whole) and the host half.

:class:`TrainState` holds the arrays an update replaces (trained parameters, optimizer state); the
compiled programs take it and give it back whole, donated. :class:`TrainerState` holds the host
counters (step, logging position, log history). ``IterativeSFTTrainer.state_dict()`` joins both, with the
shuffling RNG, into the one pytree checkpoints read and write; the checks here guard ``load_state_dict``.
:class:`HostSnapshot` keeps the starting weights on the host for ``reset()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """What an update replaces, as one pytree: the trained parameters and the optimizer state."""

    params: Any
    opt_state: Any


@dataclasses.dataclass
class TrainerState:
    """The host half of the trainer's state (HF TrainerState's fields that matter here, plus logging position).

    The trainer is its only writer; :meth:`IterativeSFTTrainer.state_dict` carries it, with the
    device arrays and the shuffling RNG, in and out of checkpoints.
    """

    global_step: int = 0
    log_history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    num_input_tokens_seen: int = 0
    total_label_tokens: int = 0
    last_logged_step: int = 0
    loss_since_log: list[float] = dataclasses.field(default_factory=list)
    # Updates in a row whose loss or gradient norm was NaN/inf (TrainConfig.max_nonfinite_in_a_row).
    nonfinite_in_a_row: int = 0
    generate_calls: int = 0  # trainer.generate() calls that took the trainer's seed (it advances per call)


COUNTER_FIELDS = (
    "num_input_tokens_seen", "total_label_tokens", "last_logged_step", "loss_since_log", "nonfinite_in_a_row",
    "generate_calls",
)



@dataclasses.dataclass(frozen=True)
class HostSnapshot:
    """A pytree of sharded arrays copied to this process's host memory, and back onto the same devices.

    Only this process's shards are kept (one copy per distinct shard, so replicated arrays are held
    once): it works on several processes, where no process can read a whole FSDP-sharded array.
    """

    treedef: Any
    leaves: tuple  # per leaf: (shape, dtype, sharding, {shard index: numpy}, [(device, shard index)])

    @classmethod
    def of(cls, tree: Any) -> "HostSnapshot":
        flat, treedef = jax.tree.flatten(tree)
        leaves = []
        for array in flat:
            data: dict[str, np.ndarray] = {}
            placement = []
            for shard in array.addressable_shards:
                key = repr(shard.index)
                if key not in data:
                    data[key] = np.array(shard.data)
                placement.append((shard.device, key))
            leaves.append((array.shape, array.dtype, array.sharding, data, placement))
        return cls(treedef, tuple(leaves))

    def restore(self) -> Any:
        arrays = [
            jax.make_array_from_single_device_arrays(
                shape, sharding, [jax.device_put(data[key], device) for device, key in placement]
            )
            for shape, _dtype, sharding, data, placement in self.leaves
        ]
        return jax.tree.unflatten(self.treedef, arrays)


def plain(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def check_same_arrays(key: str, given: Any, current: Any) -> None:
    """Refuse (naming the first difference) a tree whose structure, shapes or dtypes differ from ours."""
    try:
        given_leaves = jax.tree_util.tree_flatten_with_path(given)[0]
        same_structure = jax.tree.structure(given) == jax.tree.structure(current)
    except Exception:  # an unflattenable object
        same_structure = False
    if not same_structure:
        raise ValueError(
            f"load_state_dict: state[{key!r}] has another structure than this trainer's {key} (another model or "
            "optimizer?); pass a state from a trainer built the same way."
        )
    for (path, got), want in zip(given_leaves, jax.tree.leaves(current)):
        if not hasattr(got, "shape") or tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            what = f"{getattr(got, 'dtype', type(got).__name__)}{list(getattr(got, 'shape', []))}"
            raise ValueError(
                f"load_state_dict: state[{key!r}]{jax.tree_util.keystr(path)} is {what}, expected "
                f"{want.dtype}{list(want.shape)}."
            )


def checked_host_state(state: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The host fields of ``state``, type-checked and copied (never aliased into the trainer)."""
    def bad(field: str, expected: str) -> ValueError:
        return ValueError(f"load_state_dict: state[{field!r}] must be {expected}, got {state[field]!r:.80}.")

    step = state["global_step"]
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
        raise bad("global_step", "an integer >= 0")
    rng = state["rng"]
    if not isinstance(rng, dict) or rng.get("bit_generator") != current["rng"]["bit_generator"]:
        raise bad("rng", f"a {current['rng']['bit_generator']} bit_generator state dict")
    try:
        np.random.default_rng().bit_generator.state = rng
    except (TypeError, ValueError, KeyError):
        raise bad("rng", "a valid numpy bit_generator state") from None
    counters = state["counters"]
    if not isinstance(counters, dict) or set(counters) != set(COUNTER_FIELDS):
        raise bad("counters", f"a dict with the keys {list(COUNTER_FIELDS)}")
    for name in COUNTER_FIELDS:
        value = counters[name]
        ok = (isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)) if name == "loss_since_log" \
            else (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0)
        if not ok:
            raise ValueError(f"load_state_dict: state['counters'][{name!r}] has the wrong type or value: {value!r:.80}.")
    logs = state["log_history"]
    if not isinstance(logs, list) or not all(isinstance(entry, dict) for entry in logs):
        raise bad("log_history", "a list of dicts")
    return {
        "global_step": int(step),
        "counters": {k: (list(map(float, v)) if isinstance(v, list) else int(v)) for k, v in counters.items()},
        "log_history": [dict(entry) for entry in logs],
    }


def checked_state(state: Any, current: dict[str, Any], *, copy: bool = True):
    """A state dict (``state_dict()``'s form) checked against the trainer's ``current`` one and placed like it.

    Returns (params as a pure dict, optimizer state, the shuffling RNG, host fields); on any mismatch a
    ``ValueError`` names it (a checkpoint of another layout, model or optimizer is refused whole).
    """
    if not isinstance(state, dict) or set(state) != set(current):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"load_state_dict: state must have the keys {sorted(current)}, got {got} (a checkpoint of another "
            "jaxsft layout, or not a trainer state); nothing was changed."
        )
    for key in ("params", "opt_state"):
        check_same_arrays(key, state[key], current[key])
    host = checked_host_state(state, current)
    shardings = jax.tree.map(lambda x: x.sharding, {"params": current["params"], "opt_state": current["opt_state"]})
    arrays = {"params": state["params"], "opt_state": state["opt_state"]}
    placed = jax.device_put(arrays, shardings, may_alias=False if copy else None)
    rng = np.random.default_rng()
    rng.bit_generator.state = state["rng"]
    return placed["params"], placed["opt_state"], rng, host
