"""The trainer's state: the device half (one pytree the programs take and donate whole) and the host half.

:class:`TrainState` holds everything an update changes: the trained parameters, the optimizer state,
the update count (``step``, what ``global_step`` reports), the dropout key the update programs derive each
micro-batch's key from, and the count of non-finite updates in a row. The compiled update programs take it
whole, advance every field inside (:meth:`TrainState.after_update`: pure, under ``jit``) and give it back,
donated; ``IterativeSFTTrainer.state_dict()`` and checkpoints read these fields from it.

:class:`TrainerState` holds what no update touches: the log history and logging position, the token
counts of the planned data (host numpy counts), ``generate()``'s call count. Its ``global_step`` and
``nonfinite_in_a_row`` are host mirrors of the device fields, refreshed from the one host sync of each
``step()`` call (and by ``load_state_dict`` / ``reset``), so reading them never waits on the device.
The shuffling RNG (numpy, used where the host plans micro-batches) stays on the host as well.
The checks here guard ``load_state_dict``; :class:`HostSnapshot` keeps the starting weights for ``reset()``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_DROPOUT_TAG = 0x64726F70  # keeps the dropout key's stream apart from other seeds derived from TrainConfig.seed
_KEY_WORDS = {"threefry2x32": 2, "rbg": 4, "unsafe_rbg": 4}  # uint32 words of a raw key per jax_default_prng_impl


def dropout_key_for(seed: int, step: int = 0) -> np.ndarray:
    """The dropout key a trainer seeded ``seed`` starts from (``step=0``), as raw uint32 key data.

    Drawn on the host (numpy; no program compiles for it, so ``reset()`` compiles nothing): any words are a
    valid key of JAX's bit generators. A state of the layout before the key existed (no ``dropout_key``)
    continues from the key for its ``global_step``: a fresh stream, since that layout drew its dropout seeds
    from the shuffling RNG.
    """
    words = _KEY_WORDS.get(str(jax.config.jax_default_prng_impl), 2)
    return np.random.SeedSequence([seed % (1 << 32), seed >> 32, _DROPOUT_TAG, step]).generate_state(words)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything an update changes, as one pytree the update programs take, advance and donate whole.

    ``step`` (int32) counts applied updates (skipped non-finite ones included, as ``global_step``);
    ``dropout_key`` (raw uint32 key data) gives each micro-batch of an update its key and moves on once per update;
    ``nonfinite_in_a_row`` (int32) counts the updates in a row whose loss or gradient norm was NaN/inf.
    """

    params: Any
    opt_state: Any
    step: Any
    dropout_key: Any
    nonfinite_in_a_row: Any

    @classmethod
    def start(cls, params: Any, opt_state: Any, *, dropout_key: Any, step: int = 0, nonfinite_in_a_row: int = 0,
              sharding: Any) -> "TrainState":
        """A state around placed ``params``/``opt_state`` with its small fields placed by ``sharding`` (replicated)."""
        small = jax.device_put(
            (np.int32(step), np.asarray(dropout_key, np.uint32), np.int32(nonfinite_in_a_row)), sharding
        )
        return cls(params, opt_state, *small)

    @classmethod
    def fresh(cls, params: Any, opt_state: Any, *, seed: int, sharding: Any) -> "TrainState":
        """The state a trainer seeded ``seed`` starts from (and ``reset()`` returns to): step 0, no streak."""
        return cls.start(params, opt_state, dropout_key=dropout_key_for(seed), sharding=sharding)

    @staticmethod
    def microbatch_key(dropout_key: Any, index: Any) -> Any:
        """The dropout key of an update's micro-batch ``index`` under the state's key (pure, inside the programs)."""
        return jax.random.fold_in(jax.random.split(dropout_key)[1], index)

    def next_dropout_key(self) -> Any:
        """The key the state carries on after an update (never one a micro-batch used)."""
        return jax.random.split(self.dropout_key)[0]

    def after_update(self, params: Any, opt_state: Any, metrics: dict[str, Any]) -> "TrainState":
        """The state after one update (pure, inside the compiled program): the count advanced, the key carried
        on, the non-finite streak extended or reset by this update's loss and gradient norm."""
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        streak = jnp.where(finite, jnp.zeros_like(self.nonfinite_in_a_row), self.nonfinite_in_a_row + 1)
        return TrainState(params, opt_state, self.step + 1, self.next_dropout_key(), streak)

    def updated_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """``metrics`` with this (new) state's counters, so the host reads them in the call's one sync."""
        return {**metrics, "global_step": self.step, "nonfinite_in_a_row": self.nonfinite_in_a_row}


@dataclasses.dataclass
class TrainerState:
    """The host half of the trainer's state (HF TrainerState's fields that matter here, plus logging position).

    The trainer is its only writer; :meth:`IterativeSFTTrainer.state_dict` carries it, with the
    device :class:`TrainState` and the shuffling RNG, in and out of checkpoints. ``global_step`` (read-only:
    assigning it raises) and ``nonfinite_in_a_row`` mirror the device state's ``step`` and ``nonfinite_in_a_row``
    (refreshed once per ``step()`` call); state_dict() and checkpoints read the device fields, never these mirrors.
    """

    step_mirror: int = dataclasses.field(default=0, repr=False)  # TrainState.step as of the last step() / load
    log_history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    num_input_tokens_seen: int = 0
    total_label_tokens: int = 0
    last_logged_step: int = 0
    loss_since_log: list[float] = dataclasses.field(default_factory=list)
    # Mirror of TrainState.nonfinite_in_a_row (TrainConfig.max_nonfinite_in_a_row).
    nonfinite_in_a_row: int = 0
    generate_calls: int = 0  # trainer.generate() calls that took the trainer's seed (it advances per call)

    @property
    def global_step(self) -> int:
        """Updates applied so far (as HF's ``TrainerState.global_step``)."""
        return self.step_mirror

    @global_step.setter
    def global_step(self, value: int) -> None:
        # HF lets a script assign it; here the count lives on the device (the schedule and dropout read it
        # there), so an assignment would be silently overwritten by the next step(): refuse it instead.
        raise AttributeError(
            f"trainer.state.global_step is read-only (tried to set it to {value!r}): it mirrors the update count "
            "that the learning-rate schedule and dropout read on the device. To continue from another step, load "
            "a state saved at that step (trainer.load_state_dict(...) or a checkpoint); trainer.reset() goes back to 0."
        )


COUNTER_FIELDS = (
    "num_input_tokens_seen", "total_label_tokens", "last_logged_step", "loss_since_log", "nonfinite_in_a_row",
    "generate_calls",
)
# state_dict()'s keys; the layout before the device TrainState held the dropout key lacked "dropout_key"
# (its dropout seeds came from the shuffling RNG): such a state still loads, its dropout stream restarting.
STATE_KEYS = ("params", "opt_state", "global_step", "dropout_key", "rng", "counters", "log_history")
LEGACY_STATE_KEYS = tuple(k for k in STATE_KEYS if k != "dropout_key")


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
    key = None
    if "dropout_key" in state:
        want = np.asarray(current["dropout_key"])
        try:
            key = np.asarray(state["dropout_key"])
            fits = key.shape == want.shape and np.array_equal(key, key.astype(np.uint32)) and (key >= 0).all()
        except (TypeError, ValueError):
            fits = False
        if not fits:
            raise bad("dropout_key", f"{want.size} uint32 words (raw key data)")
        key = key.astype(np.uint32)
    return {
        "global_step": int(step),
        "dropout_key": key,  # None: the legacy layout (the trainer derives one from its seed and the step)
        "counters": {k: (list(map(float, v)) if isinstance(v, list) else int(v)) for k, v in counters.items()},
        "log_history": [dict(entry) for entry in logs],
    }


def state_dict_of(state: TrainState, host: TrainerState, rng: np.random.Generator) -> dict[str, Any]:
    """``IterativeSFTTrainer.state_dict()``: the device state's fields (its small ones read to the host here, an
    edge), the host counters and log history, the shuffling generator's state."""
    step, key, streak = jax.device_get((state.step, state.dropout_key, state.nonfinite_in_a_row))
    counters = {name: plain(getattr(host, name)) for name in COUNTER_FIELDS}
    counters["nonfinite_in_a_row"] = int(streak)
    return {
        "params": nnx.to_pure_dict(state.params),
        "opt_state": state.opt_state,
        "global_step": int(step),
        "dropout_key": [int(word) for word in np.asarray(key).ravel()],
        "rng": rng.bit_generator.state,
        "counters": counters,
        "log_history": [dict(entry) for entry in host.log_history],
    }


def checked_state(
    state: Any, current: dict[str, Any], params: Any, *, copy: bool = True, seed: int, uses_dropout: bool,
    replicated: jax.sharding.Sharding,
) -> tuple[TrainState, np.random.Generator, dict[str, Any]]:
    """A state dict (``state_dict()``'s form) checked against the trainer's ``current`` one and placed like it.

    Returns (the device :class:`TrainState`, its ``params`` being a copy of the trainer's nnx state with the
    given arrays; the shuffling RNG; the host fields); on any mismatch a ``ValueError`` names it (a checkpoint
    of another layout, model or optimizer is refused whole). A state of the previous layout
    (:data:`LEGACY_STATE_KEYS`: no ``dropout_key``) is accepted: its key is derived from ``seed`` and its step,
    with a warning when the trainer ``uses_dropout`` (its masks then differ from an unbroken run's).
    """
    if not isinstance(state, dict) or set(state) not in (set(STATE_KEYS), set(LEGACY_STATE_KEYS)):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"load_state_dict: state must have the keys {sorted(STATE_KEYS)} (or, from before the dropout key "
            f"joined the device state, {sorted(LEGACY_STATE_KEYS)}), got {got} (a checkpoint of another jaxsft "
            "layout, or not a trainer state); nothing was changed."
        )
    for key in ("params", "opt_state"):
        check_same_arrays(key, state[key], current[key])
    host = checked_host_state(state, current)
    dropout_key = host["dropout_key"]
    if dropout_key is None:
        dropout_key = dropout_key_for(seed, host["global_step"])
        if uses_dropout:
            warnings.warn(
                "load_state_dict: this state has the layout from before the dropout key joined the trainer's state "
                "(no 'dropout_key'; e.g. a checkpoint of format 3): it was restored, but its dropout masks continue "
                "from a key derived from TrainConfig.seed and global_step, not the ones an unbroken run would have "
                "drawn. Everything else resumes exactly.",
                stacklevel=3,
            )
    shardings = jax.tree.map(lambda x: x.sharding, {"params": current["params"], "opt_state": current["opt_state"]})
    arrays = {"params": state["params"], "opt_state": state["opt_state"]}
    placed = jax.device_put(arrays, shardings, may_alias=False if copy else None)
    params = jax.tree.map(lambda x: x, params)  # fresh containers: the caller's model keeps its own
    nnx.replace_by_pure_dict(params, placed["params"])
    new = TrainState.start(
        params, placed["opt_state"], dropout_key=dropout_key, step=host["global_step"],
        nonfinite_in_a_row=host["counters"]["nonfinite_in_a_row"], sharding=replicated,
    )
    rng = np.random.default_rng()
    rng.bit_generator.state = state["rng"]
    return new, rng, host
