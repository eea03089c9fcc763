"""The torch side of the facade: HF parameter names <-> jaxsft parameters.

Two jobs, both driven by the per-family weight tables in ``jaxsft.models.hf_keys``
(the same tables that load and save checkpoints, so names and layouts live in one place):

* :class:`TorchWeightSync` copies a jaxsft model's weights into the torch model the
  user handed in, in place (``trainer.model`` stays the caller's object), so
  ``trainer.model.generate(...)`` between ``step()`` calls sees the trained weights.
* :func:`hf_decay_table` turns the set of HF parameter names a torch optimizer
  decays into the core's decay table over jaxsft's parameter names (for
  ``compat.optimizers.describe_optimizer(decay_mask_fn=...)``).
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from typing import Any, Callable, Optional

import jax
import numpy as np
import torch
from flax import nnx

from jaxsft.models import weights
from jaxsft.models.decoder import CausalLM
from jaxsft.models.hf_export import hf_layout_on_device
from jaxsft.models.hf_io import hf_state_dict, hf_weight_shapes, param_shapes
from jaxsft.models.families import table_for
from jaxsft.models.spec import ModelSpec

# torch dtypes numpy can write into directly (np.copyto into the tensor's own memory).
_NUMPY_WRITABLE = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def hf_parameter_names(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every HF weight name a jaxsft model of ``spec`` fills, with its HF shape (layers expanded)."""
    return hf_weight_shapes(spec)


class TorchWeightSync:
    """Copies jaxsft weights into a torch model's parameters, in place.

    Built once per trainer: it checks that every torch parameter has a jaxsft counterpart of the same
    shape and remembers the parameter objects. Tied weights appear once in ``named_parameters()`` and are
    written once. Parameters keep their dtype and device.

    :meth:`copy_from` does the HF layout change on the accelerator: for every row of the family's weight
    table, the core's compiled ``jaxsft.models.hf_export.hf_layout_on_device`` runs the row's op (``op.to_hf``, the same reshape/transpose that saving
    uses, so the tables in ``jaxsft.models.hf_keys`` stay the only place that knows the layouts) over
    all layers at once and produces the stacked HF-layout array in the torch dtype; its transfer to the
    host starts at once, and at most three rows' outputs are alive at a time; the host then only does
    contiguous copies into the torch tensors. When the torch model sits on the GPU that holds the JAX
    arrays, the copy goes device-to-device through DLPack instead. On the CPU backend the arrays already
    are host memory, and the ops run on them directly with numpy. Multi-host runs, whose arrays a
    process cannot read alone, use :func:`jaxsft.models.hf_io.hf_state_dict` (gathered).
    """

    def __init__(self, torch_model: torch.nn.Module, spec: ModelSpec):
        expected = hf_parameter_names(spec)
        self._spec = spec
        self._targets: list[tuple[str, torch.nn.Parameter]] = []
        unknown, misshaped = [], []
        table = table_for(spec)
        for name, param in torch_model.named_parameters():
            key = table.normalise(name)
            if key not in expected:
                unknown.append(name)
            elif tuple(param.shape) != expected[key]:
                misshaped.append(f"{name} {tuple(param.shape)} vs {expected[key]}")
            else:
                self._targets.append((key, param))
        if unknown or misshaped:
            raise ValueError(
                "the torch model has parameters jaxsft cannot mirror "
                f"({'unknown: ' + ', '.join(unknown[:5]) if unknown else ''}"
                f"{'; ' if unknown and misshaped else ''}"
                f"{'wrong shape: ' + ', '.join(misshaped[:5]) if misshaped else ''}); "
                "pass a plain transformers causal LM of a supported family (no adapters or extra heads)."
            )
        by_key = dict(self._targets)
        self._plans: list[_Plan] = []
        shapes = param_shapes(spec)
        for row in table.active(shapes):
            params = [by_key.get(k) for k in row.keys(shapes)]
            present = [p for p in params if p is not None]
            if not present:
                continue
            on_device = all(p.dtype == present[0].dtype for p in present)
            self._plans.append(_Plan(row, on_device, present[0].dtype, params))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._targets]

    def copy_from(self, model: CausalLM) -> None:
        """Overwrite the torch parameters with ``model``'s current weights."""
        pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        leaves = jax.tree.leaves(pure)
        on_cpu = all(d.platform == "cpu" for x in leaves for d in x.devices())
        if on_cpu or not all(getattr(x, "is_fully_addressable", True) for x in leaves):
            # CPU arrays are host memory already (numpy reads them without a copy) and numpy's transposes
            # beat a second XLA program there; arrays of other hosts must be gathered.
            self.copy_arrays(hf_state_dict(model))
            return
        in_flight: collections.deque = collections.deque()
        on_gpu: list[Any] = []  # DLPack views torch is still copying from
        with torch.no_grad():
            for plan in self._plans:
                if not plan.on_device:
                    continue
                sources = tuple(_lookup(pure, path) for path in plan.row.ours)
                out = hf_layout_on_device(sources, plan.row.op, plan.row.per_layer, _jax_dtype(plan.dtype))
                shard = _same_gpu_shard(out, plan)
                if shard is not None:  # torch lives on the same GPU: device-to-device, no host round trip
                    on_gpu.append(_write_from_gpu(plan, shard))
                    continue
                out.copy_to_host_async()
                in_flight.append((plan, out))
                if len(in_flight) > 3:
                    _write(*in_flight.popleft())
            for plan in self._plans:  # mixed torch dtypes in one row: per tensor on the host
                if not plan.on_device:
                    self._write_on_host(plan, pure)
            while in_flight:
                _write(*in_flight.popleft())
            if on_gpu:
                torch.cuda.synchronize()  # the copies read JAX's buffers: finish before they can be freed

    def copy_arrays(self, tensors: dict[str, np.ndarray]) -> None:
        """Overwrite the torch parameters from HF-named host arrays (``hf_state_dict`` output)."""
        with torch.no_grad():
            for name, param in self._targets:
                _copy_into(param, tensors[name])

    def _write_on_host(self, plan: "_Plan", pure: dict[str, Any]) -> None:
        row = plan.row
        inputs = [np.asarray(_lookup(pure, path)) for path in row.ours]
        for index, param in enumerate(plan.params):
            if param is not None:
                parts = [x[index] for x in inputs] if row.per_layer else inputs
                _copy_into(param, row.op.to_hf(parts))


@dataclasses.dataclass(frozen=True)
class _Plan:
    row: weights.Row
    on_device: bool  # one torch dtype for the whole row: one jitted layout program
    dtype: torch.dtype  # the torch parameters' dtype
    params: list  # one torch parameter (or None) per layer, or a single one


def _lookup(pure: dict[str, Any], path: str) -> Any:
    node = pure
    for key in path.split("/"):
        node = node[key]
    return node


def _jax_dtype(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")


def _same_gpu_shard(out: jax.Array, plan: _Plan) -> Optional[jax.Array]:
    """A whole (replicated) copy of ``out`` on the CUDA device the torch parameters live on, else None."""
    devices = {p.device for p in plan.params if p is not None}
    if len(devices) != 1:
        return None
    (device,) = devices
    if device.type != "cuda":
        return None
    for shard in out.addressable_shards:
        jax_device = shard.device
        ordinal = getattr(jax_device, "local_hardware_id", jax_device.id)
        if jax_device.platform == "gpu" and ordinal == device.index and shard.data.shape == out.shape:
            return shard.data
    return None


def _write_from_gpu(plan: _Plan, array: jax.Array) -> torch.Tensor:
    source = torch.from_dlpack(array)
    if plan.row.per_layer:
        for index, param in enumerate(plan.params):
            if param is not None:
                param.copy_(source[index], non_blocking=True)
    else:
        plan.params[0].copy_(source, non_blocking=True)
    return source


def _write(plan: _Plan, out: jax.Array) -> None:
    host = np.asarray(out)  # waits for this transfer only
    if plan.row.per_layer:
        for index, param in enumerate(plan.params):
            if param is not None:
                _copy_into(param, host[index])
    else:
        _copy_into(plan.params[0], host)


def _copy_into(param: torch.Tensor, array: np.ndarray) -> None:
    """Write ``array`` into ``param`` (same shape), casting to its dtype and moving to its device."""
    if str(array.dtype) == "bfloat16":  # numpy has no bf16 of its own (ml_dtypes' type): hand torch the bits
        param.copy_(_from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16))
        return
    if param.device.type == "cpu" and param.dtype in _NUMPY_WRITABLE and param.is_contiguous():
        np.copyto(param.detach().numpy(), array, casting="same_kind")
        return
    param.copy_(_from_numpy(np.asarray(array)))


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only views of fetched arrays: torch only reads them here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def hf_decay_table(spec: ModelSpec) -> Callable[[frozenset[str]], dict[str, bool]]:
    """``names -> {jaxsft parameter name: decays}``: weight decay on a jaxsft parameter iff its HF weights are decayed.

    The table is data for the core (``OptimizerDescription.decay``), which builds the mask. A jaxsft layer
    parameter is one array stacked over layers, so the torch optimizer must make the same choice for that
    weight in every layer; GPT-2's fused ``c_attn`` fills q/k/v, which then share its choice. Splits that
    cannot be expressed raise ValueError naming the weight.
    """
    table, shapes = table_for(spec), param_shapes(spec)
    rows = table.active(shapes)

    def decay_table(decayed: frozenset[str]) -> dict[str, bool]:
        decayed = frozenset(table.normalise(n) for n in decayed)
        decision: dict[str, bool] = {}
        for row in rows:
            keys = row.keys(shapes)
            flags = {key in decayed for key in keys}
            if len(flags) > 1:
                on = [k for k in keys if k in decayed]
                raise ValueError(
                    f"the optimizer's param groups decay {row.hf.replace('{i}', '*')} in some layers only ({on[:3]}...); "
                    "jaxsft stacks each weight over layers, so all layers must share one weight-decay choice. "
                    "Put that weight of every layer in the same param group."
                )
            flag = flags.pop()
            for path in row.ours:
                if decision.setdefault(path, flag) != flag:
                    raise ValueError(
                        f"the optimizer's param groups give {path.split('/')[-1]} two weight-decay choices; put the HF "
                        "weights that fill it in the same param group."
                    )
        return decision

    return decay_table


__all__ = ["TorchWeightSync", "hf_decay_table", "hf_parameter_names"]
