"""Device meshes, the logical-axis rules table, and placement of params and batches.

Every parameter carries logical axis names (``nnx.Param(..., logical_axes=...)``);
this module is the one place that maps them onto mesh axes. GSPMD (jit with
shardings) does all communication: there is no hand-written collective here.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import numbers
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or None = replicated). One row per parameter dimension kind.
LOGICAL_AXIS_RULES: dict[Optional[str], Optional[str]] = {
    "layers": None,  # scanned; never split
    "vocab": "tensor",  # embeddings and lm_head: vocab-parallel
    "embed": "fsdp",  # the hidden dimension of every matrix: FSDP shards it
    "q_heads": "tensor",  # attention heads: Megatron-style tensor parallel
    "kv_heads": "tensor",  # ... and replicated when the tensor axis does not divide them (GQA)
    "head_dim": None,
    "mlp": "tensor",  # MLP width: tensor parallel
    "norm": None,  # norm scales and output biases are small: replicated
    "rel_buckets": None,  # T5 relative-position bias tables [buckets, heads]: heads follow q_heads
    "lora_rank": None,  # LoRA adapters' rank dimension: tiny, replicated (their other dims follow the base weight's)
    None: None,
}

# logical activation axis -> mesh axes. Constraining activations this way makes GSPMD
# gather FSDP-sharded weights before a matmul instead of splitting the matmul's
# contraction over devices (which would all-reduce activations and logits).
ACTIVATION_RULES: dict[Optional[str], Any] = {
    "batch": BATCH_AXES,
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    None: None,
}

# Logical axes that are replicated, instead of refused, when their mesh axis does not divide them.
# KV heads: a GQA model with 2 KV heads (Qwen2.5) still runs on tensor=4; each device keeps
# every KV head and its share of the query heads (as Megatron and vLLM do).
REPLICATE_IF_INDIVISIBLE = frozenset({"kv_heads"})


def _frozen(table: Any) -> tuple:
    items = table.items() if isinstance(table, Mapping) else table
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in items)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Where each logical axis goes on the (data, fsdp, tensor) mesh: one table for parameters,
    one for activations inside jit, and the axes replicated when their mesh axis does not divide them.

    Pass one to ``from_pretrained`` / ``init_model`` / ``IterativeSFTTrainer`` / ``generate``
    (``sharding_rules=``) to change a layout; the default, :data:`DEFAULT_RULES`, is the tables
    above. Hashable (the tables are stored as tuples), so programs can be cached by it.
    """

    params: Any = dataclasses.field(default_factory=lambda: LOGICAL_AXIS_RULES)
    activations: Any = dataclasses.field(default_factory=lambda: ACTIVATION_RULES)
    replicate_if_indivisible: frozenset = REPLICATE_IF_INDIVISIBLE

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", _frozen(self.params))
        object.__setattr__(self, "activations", _frozen(self.activations))
        object.__setattr__(self, "replicate_if_indivisible", frozenset(self.replicate_if_indivisible))
        for table in (self.params, self.activations):
            for _, axes in table:
                names = (axes,) if isinstance(axes, str) else tuple(axes or ())
                unknown = [n for n in names if n not in MESH_AXES]
                if unknown:
                    raise ValueError(f"ShardingRules: mesh axes {unknown} are not among {MESH_AXES}.")

    def param_axis(self, logical: Optional[str], name: str = "") -> Optional[str]:
        table = dict(self.params)
        if logical not in table:
            raise ValueError(f"parameter {name}: logical axis {logical!r} has no row in LOGICAL_AXIS_RULES.")
        return table[logical]

    def activation_axes(self, logical: Optional[str]) -> tuple[str, ...]:
        table = dict(self.activations)
        if logical not in table:
            raise ValueError(f"activation axis {logical!r} has no row in the activation rules ({sorted(map(str, table))}).")
        axes = table[logical]
        return (axes,) if isinstance(axes, str) else tuple(axes or ())


DEFAULT_RULES = ShardingRules()
_ACTIVE_RULES: contextvars.ContextVar[ShardingRules] = contextvars.ContextVar("jaxsft_sharding_rules", default=DEFAULT_RULES)


def active_rules() -> ShardingRules:
    """The rules set by :func:`use_rules` around the code being traced (else :data:`DEFAULT_RULES`)."""
    return _ACTIVE_RULES.get()


@contextlib.contextmanager
def use_rules(rules: Optional[ShardingRules]) -> Iterator[ShardingRules]:
    """Trace under ``rules`` (None: the defaults): ``constrain`` and ``logical_to_spec`` read them."""
    rules = DEFAULT_RULES if rules is None else rules
    if not isinstance(rules, ShardingRules):
        raise TypeError(f"sharding_rules must be a jaxsft.infra.sharding.ShardingRules, got {type(rules).__name__}.")
    token = _ACTIVE_RULES.set(rules)
    try:
        yield rules
    finally:
        _ACTIVE_RULES.reset(token)


def make_mesh(
    data: Optional[int] = None, fsdp: int = 1, tensor: int = 1, devices: Optional[Sequence[Any]] = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: every device of every process).

    One axis may be -1 to take the devices the others leave. ``data`` left out is
    -1 (or 1 when ``fsdp`` or ``tensor`` is -1), so the default, ``make_mesh()``,
    puts every device on the data axis: plain data parallelism, like DDP with a
    per-device batch size; ``make_mesh(fsdp=-1)`` is pure FSDP.
    """
    devices = list(devices) if devices is not None else jax.devices()
    if not devices:
        raise ValueError("make_mesh: devices is empty; pass at least one device (default: jax.devices()).")
    if data is None:
        data = 1 if -1 in (fsdp, tensor) else -1
    sizes = [data, fsdp, tensor]
    for name, size in zip(MESH_AXES, sizes):
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or (size != -1 and size < 1):
            raise ValueError(f"make_mesh: {name}={size!r} must be a positive integer or -1.")
    sizes = [int(s) for s in sizes]
    if sizes.count(-1) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"make_mesh: {len(devices)} devices cannot be split with the fixed axes of size {known}; "
                "choose sizes whose product divides the device count."
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"make_mesh: data*fsdp*tensor = {int(np.prod(sizes))} but {len(devices)} devices were given; "
            "make the product equal the device count (use -1 for one axis)."
        )
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def single_device_mesh(device: Any = None) -> Mesh:
    """A 1x1x1 mesh on one device (default: the first)."""
    return make_mesh(1, 1, 1, devices=[device or jax.devices()[0]])


def logical_to_spec(
    logical_axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh, name: str = "",
    rules: Optional[ShardingRules] = None,
) -> P:
    """Map a parameter's logical axes to a PartitionSpec (``rules``: default the active ones).

    A split that does not divide its dimension is refused, except for the rules' replicable axes
    (KV heads), which are then replicated.
    """
    rules = rules or active_rules()
    spec = []
    for axis_name, dim in zip(logical_axes, shape):
        mesh_axis = rules.param_axis(axis_name, name)
        if mesh_axis is None or mesh.shape[mesh_axis] == 1:
            spec.append(None)
            continue
        size = mesh.shape[mesh_axis]
        if dim % size:
            if axis_name in rules.replicate_if_indivisible:
                spec.append(None)
                continue
            raise ValueError(
                f"parameter {name} (shape {tuple(shape)}): its {axis_name!r} dimension of size {dim} is not "
                f"divisible by the {mesh_axis!r} mesh axis of size {size}; pick a mesh whose {mesh_axis} size "
                f"divides {dim}."
            )
        spec.append(mesh_axis)
    return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Optional[ShardingRules] = None) -> nnx.State:
    """NamedShardings for every variable of an (abstract) nnx State, from its logical axes."""

    def one(path, variable):
        axes = getattr(variable, "logical_axes", None) or (None,) * len(variable.shape)
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return NamedSharding(mesh, logical_to_spec(axes, variable.shape, mesh, name, rules))

    return nnx.map_state(one, state)


def check_model_fits(spec: Any, mesh: Mesh, rules: Optional[ShardingRules] = None) -> None:
    """Refuse a mesh whose tensor axis cannot split the model's heads, MLP or vocabulary, naming the config field.

    Derived from the rules: a dimension is checked when its logical axis goes to the tensor
    axis and is not one the rules replicate instead (KV heads).
    """
    rules = rules or active_rules()
    tensor = mesh.shape["tensor"]
    if tensor == 1:
        return
    dims = (("num_attention_heads", spec.num_heads, "q_heads"), ("num_key_value_heads", spec.num_kv_heads, "kv_heads"),
            ("intermediate_size", spec.intermediate_size, "mlp"), ("vocab_size", spec.vocab_size, "vocab"))
    for what, size, logical in dims:
        if rules.param_axis(logical) == "tensor" and size % tensor and logical not in rules.replicate_if_indivisible:
            raise ValueError(
                f"mesh tensor axis of size {tensor} does not divide the model's {what} ({size}); "
                f"choose a tensor size that divides it (e.g. make_mesh(tensor=1))."
            )


def mesh_of(state: Any, default: Optional[Mesh] = None) -> Mesh:
    """The jaxsft mesh a model state's arrays live on, else ``default`` (else all devices on data)."""
    for leaf in jax.tree.leaves(state):
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        if isinstance(mesh, Mesh) and tuple(mesh.axis_names) == MESH_AXES:
            return mesh
        break
    return default if default is not None else make_mesh()


def place_state(state: nnx.State, mesh: Mesh, rules: Optional[ShardingRules] = None) -> nnx.State:
    """Move a model state onto ``mesh`` per the rules (a no-op when it is already there)."""
    leaves, treedef = jax.tree.flatten(state)
    targets = jax.tree.leaves(state_shardings(state, mesh, rules))  # same order: both walk the State's keys
    if all(x.sharding == t for x, t in zip(leaves, targets)):
        return state
    return treedef.unflatten([jax.device_put(x, t) for x, t in zip(leaves, targets)])


def optimizer_state_shardings(opt_state: Any, params: Any, mesh: Mesh) -> Any:
    """Shardings for an (abstract) optimizer state: a leaf that mirrors a parameter takes its sharding.

    A leaf mirrors a parameter when the parameter's full tree path is a suffix of
    the leaf's path (``...mu['layers']['q_proj'].value`` ends with
    ``['layers']['q_proj'].value``) and the shapes agree; that covers Adam's
    mu/nu, momentum traces and accumulators of any optax chain. Everything else
    (step counts, factored statistics) is replicated. Without this, ``tx.init``
    under jit returns replicated moments (``zeros_like`` drops the input layout),
    which costs two full parameter copies per device.
    """
    by_path = {tuple(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    rep = replicated(mesh)

    def one(path, leaf):
        path = tuple(path)
        for start in range(len(path)):
            param = by_path.get(path[start:])
            if param is not None and tuple(param.shape) == tuple(leaf.shape):
                return param.sharding
        return rep

    return jax.tree_util.tree_map_with_path(one, opt_state)


def check_batch_split_over_processes(mesh: Mesh) -> None:
    """Refuse a multi-process mesh whose batch axes do not give each process its own rows.

    Each process passes its own examples to ``step()`` and contributes
    ``rows / process_count`` rows of every global micro-batch; that only works when
    the data x fsdp axes split the batch so each process owns an equal, disjoint
    set of row blocks (e.g. not a mesh with the processes along the tensor axis).
    """
    if jax.process_count() == 1:
        return
    blocks = batch_rows_multiple(mesh)
    owners: dict[int, set[int]] = {}
    for device, index in batch_sharding(mesh, 1).devices_indices_map((blocks,)).items():
        owners.setdefault(index[0].start or 0, set()).add(device.process_index)
    per_process: dict[int, int] = {}
    for start, procs in owners.items():
        if len(procs) > 1:
            raise ValueError(
                f"mesh {dict(mesh.shape)}: batch rows block {start} is held by processes {sorted(procs)}; every "
                "process must own its own rows. Put the processes along the data/fsdp axes (e.g. "
                "make_mesh(data=jax.process_count(), fsdp=-1)) rather than the tensor axis."
            )
        (proc,) = procs
        per_process[proc] = per_process.get(proc, 0) + 1
    if len(per_process) != jax.process_count() or len(set(per_process.values())) != 1:
        raise ValueError(
            f"mesh {dict(mesh.shape)}: processes own unequal numbers of batch row blocks {per_process}; "
            "use the same number of devices on every process and split data*fsdp across processes."
        )


def place_array(host_array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Put a host array (the same full value on every process) onto its sharding, shard by shard."""
    return jax.make_array_from_callback(host_array.shape, sharding, lambda index: host_array[index])


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows split over the data and FSDP axes; other dimensions replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_rows_multiple(mesh: Mesh) -> int:
    """How many ways a batch's rows are split (its row count must be a multiple of this)."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def place_batch(local_rows: np.ndarray, mesh: Mesh) -> jax.Array:
    """Assemble a global batch from each process's local rows (multi-host safe)."""
    sharding = batch_sharding(mesh, local_rows.ndim)
    return jax.make_array_from_process_local_data(sharding, local_rows)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fetch_to_host(array: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-host sharded) array as numpy, on every process."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def active_mesh() -> Optional[Any]:
    """The (abstract) jaxsft mesh set by ``jax.set_mesh`` around the code being traced, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or tuple(mesh.axis_names) != MESH_AXES:
        return None
    return mesh


def batch_split_axes(batch: int) -> tuple[str, ...]:
    """Mesh axes (of the jaxsft mesh active around tracing) that split ``batch`` rows; () if none do."""
    mesh = active_mesh()
    if mesh is None:
        return ()
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    return axes if ways > 1 and batch % ways == 0 else ()


def activation_spec(logical_axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Any,
                    rules: Optional[ShardingRules] = None, skip: frozenset = frozenset()) -> P:
    """An activation's PartitionSpec per the activation rules; a dimension its axes do not divide stays whole."""
    rules = rules or active_rules()
    spec = []
    for axis_name, dim in zip(logical_axes, shape):
        names = tuple(n for n in rules.activation_axes(axis_name) if mesh.shape[n] > 1 and n not in skip)
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        if not names or dim % size:
            spec.append(None)
        else:
            spec.append(names if len(names) > 1 else names[0])
    return P(*spec)


def constrain(x, logical_axes: Sequence[Optional[str]]):
    """Pin an activation's layout inside jit when a jaxsft mesh is active; a no-op otherwise."""
    mesh = active_mesh()
    if mesh is None:
        return x
    # Inside shard_map the manual axes are already split by hand; constrain only the others.
    manual = frozenset(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Manual)
    return jax.lax.with_sharding_constraint(x, activation_spec(logical_axes, x.shape, mesh, skip=manual))
