"""Declarative weight tables: Hugging Face tensor names <-> jaxsft parameter paths, and the one
place that reads and writes checkpoints through them.

The format
----------
A family's table is a :class:`WeightTable` of rows ``W(hf_name, our_path, op)``:

* ``hf_name``: the checkpoint key; ``{i}`` marks a per-layer row (``model.layers.{i}.mlp.up_proj.weight``).
* ``our_path``: the parameter's path in the model's state, ``/``-separated (``"embed"``,
  ``"layers/up_proj"``), or a tuple of paths when one HF tensor fills several parameters
  (GPT-2's fused ``c_attn`` fills q, k and v). A per-layer row's parameters are stacked over
  layers on their leading axis; the layer count is that axis's size.
* ``op``: how the HF layout becomes ours, as ``"hf axes -> our axes"`` in einops notation
  restricted to reshapes and transposes: ``"(n d) h -> h n d"`` says the HF tensor is
  ``[n*d, h]`` and ours ``[h, n, d]``. ``""`` means the same layout. With several parameters the
  our side starts with ``parts``, the axis that enumerates them: ``"h (parts n d) -> parts h n d"``.
  A ``1`` on the HF side is an axis of size one that we drop (BART's ``final_logits_bias`` is
  ``[1, V]`` in HF files and ``[V]`` here: ``"1 v -> v"``).
  Every size comes from our parameter shapes, so a row needs no code.

Options: ``tied_to=`` on a row names the parameter that replaces it when the model ties it
away (``lm_head`` tied to ``embed``: a checkpoint's copy is then skipped). ``optional=True``
marks a tensor some checkpoints lack (BART's ``final_logits_bias`` buffer): when absent its
parameters load as zeros; it is always written. The table's ``ignore`` patterns list buffers and
tied copies some checkpoints carry (rotary ``inv_freq``, T5's per-stack ``embed_tokens``);
``aliases`` rewrites old key spellings first (original GPT-2 files lack the ``transformer.`` prefix).

A row is active when all its parameters exist in the model, so optional weights (biases,
QK-norm) need no condition of their own: the model's parameter set is the condition. Each
parameter must be filled by exactly one active row; a family whose variants spell one parameter
differently (T5's ``wi`` or ``wi_1``) has one table per variant.

A per-layer row's layer count is its parameters' leading axis, so stacks of different depths
(an encoder's ``encoder/q_proj`` and a decoder's ``decoder/q_proj``) need nothing special.

Everything else is derived from the table and the model's parameter shapes: the expected HF
name and shape of every tensor (:meth:`WeightTable.hf_shapes`), strict checks of a checkpoint
from its headers alone (:func:`check`), streaming import one row at a time (:func:`stream`),
export (:func:`export`), and the layout change on the device (``op.to_hf`` runs on jax arrays
too). :func:`expand` is the one place a ``{i}`` pattern becomes concrete keys.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Callable, Collection, Iterator, Mapping, Optional, Protocol, Sequence, Union

import numpy as np

Shapes = Mapping[str, tuple[int, ...]]  # our path -> full parameter shape (layers axis included)


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: missing, extra or mis-shaped weights."""


# ---------------------------------------------------------------------------- ops
def _axes(text: str) -> list[tuple[str, ...]]:
    """``"(n d) h"`` -> [("n", "d"), ("h",)]."""
    groups, tokens = [], re.findall(r"\(|\)|[A-Za-z_][A-Za-z0-9_]*|\d+", text)
    current: Optional[list[str]] = None
    for token in tokens:
        if token == "(":
            if current is not None:
                raise ValueError(f"weight op {text!r}: nested parentheses")
            current = []
        elif token == ")":
            if not current:
                raise ValueError(f"weight op {text!r}: empty or unbalanced parentheses")
            groups.append(tuple(current))
            current = None
        elif token.isdigit() and token != "1":
            raise ValueError(f"weight op {text!r}: the only number an op may name is 1 (a size-one HF axis)")
        elif current is not None:
            current.append(token)
        else:
            groups.append((token,))
    if current is not None:
        raise ValueError(f"weight op {text!r}: unbalanced parentheses")
    return groups


def _xp(x: Any):
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np
    import jax.numpy as jnp

    return jnp


@dataclasses.dataclass(frozen=True)
class Op:
    """A reshape/transpose between one HF tensor and one or more of our parameters (see the module doc)."""

    text: str = ""

    def __post_init__(self) -> None:
        if not self.text.strip():
            return
        if self.text.count("->") != 1:
            raise ValueError(f"weight op {self.text!r}: write it as 'hf axes -> our axes'")
        hf, ours = (part.strip() for part in self.text.split("->"))
        hf_groups, our_groups = _axes(hf), _axes(ours)
        if any(len(g) != 1 for g in our_groups):
            raise ValueError(f"weight op {self.text!r}: only the HF side may group axes")
        if any(g == ("1",) for g in our_groups):
            raise ValueError(f"weight op {self.text!r}: only the HF side may have size-one axes (1)")
        flat = [a for g in hf_groups for a in g if a != "1"]
        mine = [g[0] for g in our_groups]
        if sorted(flat) != sorted(mine) or len(set(flat)) != len(flat):
            raise ValueError(f"weight op {self.text!r}: both sides must name the same axes, once each")

    @property
    def identity(self) -> bool:
        return not self.text.strip()

    def _parsed(self, rank: int) -> tuple[list[tuple[str, ...]], list[str]]:
        if self.identity:
            names = [f"a{k}" for k in range(rank)]
            return [(n,) for n in names], names
        hf, ours = (part.strip() for part in self.text.split("->"))
        return _axes(hf), [g[0] for g in _axes(ours)]

    @property
    def parts(self) -> bool:
        return not self.identity and self._parsed(0)[1][0] == "parts"

    def _sizes(self, our_shapes: Sequence[tuple[int, ...]]) -> tuple[list[tuple[str, ...]], list[str], dict[str, int]]:
        rank = len(our_shapes[0]) + (1 if self.parts else 0)
        hf_groups, ours = self._parsed(rank)
        names = ours[1:] if self.parts else ours
        if any(len(s) != len(names) for s in our_shapes) or len(set(our_shapes)) != 1:
            raise ValueError(f"weight op {self.text!r} does not fit our shapes {list(our_shapes)}")
        sizes = dict(zip(names, our_shapes[0]), **{"1": 1})
        if self.parts:
            sizes["parts"] = len(our_shapes)
        return hf_groups, ours, sizes

    def hf_shape(self, our_shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        """The HF tensor's shape given our parameters' (per-layer) shapes."""
        hf_groups, _, sizes = self._sizes(our_shapes)
        return tuple(int(np.prod([sizes[a] for a in g])) for g in hf_groups)

    def to_ours(self, x: Any, our_shapes: Sequence[tuple[int, ...]], lead: int = 0) -> tuple[Any, ...]:
        """HF tensor (with ``lead`` leading batch axes, e.g. layers) -> our arrays, one per parameter."""
        hf_groups, ours, sizes = self._sizes(our_shapes)
        xp, head = _xp(x), tuple(x.shape[:lead])
        flat = [a for g in hf_groups for a in g if a != "1"]
        y = x.reshape(head + tuple(sizes[a] for a in flat))
        perm = tuple(range(lead)) + tuple(lead + flat.index(a) for a in ours)
        if perm != tuple(range(len(perm))):
            y = xp.transpose(y, perm)
        if not self.parts:
            return (y,)
        return tuple(y[(slice(None),) * lead + (k,)] for k in range(sizes["parts"]))

    def to_hf(self, ys: Sequence[Any], lead: int = 0) -> Any:
        """Our arrays (with ``lead`` leading batch axes) -> the HF tensor; the inverse of :meth:`to_ours`."""
        our_shapes = [tuple(y.shape[lead:]) for y in ys]
        hf_groups, ours, sizes = self._sizes(our_shapes)
        xp, head = _xp(ys[0]), tuple(ys[0].shape[:lead])
        y = xp.stack(list(ys), axis=lead) if self.parts else ys[0]
        flat = [a for g in hf_groups for a in g if a != "1"]
        perm = tuple(range(lead)) + tuple(lead + ours.index(a) for a in flat)
        if perm != tuple(range(len(perm))):
            y = xp.transpose(y, perm)
        return y.reshape(head + tuple(int(np.prod([sizes[a] for a in g])) for g in hf_groups))


# ---------------------------------------------------------------------------- rows and tables
@dataclasses.dataclass(frozen=True)
class Row:
    hf: str
    ours: tuple[str, ...]
    op: Op = Op()
    tied_to: Optional[str] = None
    optional: bool = False  # may be absent from a checkpoint: its parameters then load as zeros

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def keys(self, shapes: Shapes) -> list[str]:
        """The concrete HF keys of this row for a model with these parameter shapes."""
        return [key for _, key in expand(self.hf, layer_count(self, shapes))]

    def param_shapes(self, shapes: Shapes) -> list[tuple[int, ...]]:
        """Our parameters' shapes as one HF tensor sees them (without the layers axis for per-layer rows)."""
        return [tuple(shapes[p][1:]) if self.per_layer else tuple(shapes[p]) for p in self.ours]


def W(
    hf: str, ours: Union[str, Sequence[str]], op: str = "", *, tied_to: Optional[str] = None, optional: bool = False
) -> Row:
    """One table row: ``W("model.layers.{i}.self_attn.q_proj.weight", "layers/q_proj", "(n d) h -> h n d")``."""
    return Row(hf, (ours,) if isinstance(ours, str) else tuple(ours), Op(op), tied_to, optional)


def expand(pattern: str, layers: Optional[int]) -> list[tuple[Optional[int], str]]:
    """``(layer index or None, key)`` for every concrete key of ``pattern`` (the only ``{i}`` expansion)."""
    if "{i}" not in pattern:
        return [(None, pattern)]
    return [(i, pattern.replace("{i}", str(i))) for i in range(int(layers or 0))]


def layer_count(row: Row, shapes: Shapes) -> Optional[int]:
    if not row.per_layer:
        return None
    counts = {shapes[p][0] for p in row.ours}
    if len(counts) != 1:
        raise ValueError(f"weight row {row.hf}: its parameters {row.ours} have different layer counts {counts}")
    return counts.pop()


@dataclasses.dataclass(frozen=True)
class WeightTable:
    """One family's rows plus the keys to skip and the old spellings to rewrite."""

    family: str
    rows: tuple[Row, ...]
    ignore: tuple[str, ...] = ()  # regexes (full match) of checkpoint buffers that are not weights
    aliases: Optional[Callable[[str], str]] = None  # old key spelling -> table spelling

    def active(self, shapes: Shapes) -> list[Row]:
        """The rows whose parameters all exist in a model with these shapes."""
        out = [row for row in self.rows if all(p in shapes for p in row.ours)]
        filled = [p for row in out for p in row.ours]
        twice = sorted(p for p, n in collections.Counter(filled).items() if n > 1)
        if twice:
            raise ValueError(f"weight table {self.family!r} fills parameters {twice} from more than one row")
        unfilled = sorted(set(shapes) - set(filled))
        if unfilled:
            raise ValueError(f"weight table {self.family!r} has no row for parameters {unfilled}")
        return out

    def normalise(self, key: str) -> str:
        return self.aliases(key) if self.aliases is not None else key

    def hf_shapes(self, shapes: Shapes) -> dict[str, tuple[int, ...]]:
        """Every concrete HF key the model fills, with its expected shape (table order)."""
        out = {}
        for row in self.active(shapes):
            shape = row.op.hf_shape(row.param_shapes(shapes))
            for key in row.keys(shapes):
                out[key] = shape
        return out

    def absent_optional(self, shapes: Shapes, present: Collection[str]) -> set[str]:
        """The keys of optional rows a checkpoint lacks entirely (all of the row's keys, so a row is
        loaded whole or zero-filled whole; a partly present one counts as missing keys)."""
        out: set[str] = set()
        for row in self.active(shapes):
            keys = row.keys(shapes)
            if row.optional and not any(key in present for key in keys):
                out.update(keys)
        return out

    def ignorable(self, key: str, shapes: Shapes) -> bool:
        for row in self.rows:
            if row.tied_to is not None and row.hf == key and not all(p in shapes for p in row.ours):
                return True  # tied away: the model reads its tied_to parameter instead
        return any(re.fullmatch(pattern, key) for pattern in self.ignore)


# ---------------------------------------------------------------------------- reading
class TensorSource(Protocol):
    """What :func:`check` and :func:`stream` read: keys and headers first, data one tensor at a time."""

    def keys(self) -> Sequence[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def is_float(self, key: str) -> tuple[bool, str]: ...  # (floating point?, dtype name)

    def read(self, key: str) -> np.ndarray: ...


class ArraySource:
    """A mapping of arrays as a :class:`TensorSource` (numpy arrays, or anything ``convert`` turns into one)."""

    def __init__(self, tensors: Mapping[str, Any], convert: Callable[[Any], np.ndarray] = np.asarray):
        self._tensors, self._convert = tensors, convert

    def keys(self) -> Sequence[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def is_float(self, key: str) -> tuple[bool, str]:
        dtype = self._tensors[key].dtype
        name = str(dtype).replace("torch.", "")
        floating = getattr(dtype, "is_floating_point", None)
        if floating is None:
            floating = np.issubdtype(np.dtype(dtype), np.floating) or name == "bfloat16"
        return bool(floating), name

    def read(self, key: str) -> np.ndarray:
        return self._convert(self._tensors[key])


def _normalised(table: WeightTable, source: TensorSource) -> dict[str, str]:
    return {table.normalise(k): k for k in source.keys()}


def check(table: WeightTable, shapes: Shapes, source: TensorSource, what: str) -> None:
    """Every key present, floating point and exactly the expected shape, none unexpected; from headers only.

    All problems are reported together, in one :class:`CheckpointError`, before any data is read.
    """
    names = _normalised(table, source)
    expected = table.hf_shapes(shapes)
    optional = table.absent_optional(shapes, names)
    missing = [k for k in expected if k not in names and k not in optional]
    wrong = []
    for key, shape in expected.items():
        if key not in names:
            continue
        got = tuple(source.shape(names[key]))
        floating, dtype = source.is_float(names[key])
        if got != shape:
            wrong.append(f"{key} has shape {got}, expected {shape}")
        elif not floating:
            wrong.append(f"{key} has dtype {dtype}, expected a floating-point tensor")
    extra = sorted(k for k in names if k not in expected and not table.ignorable(k, shapes))
    if missing or extra or wrong:
        parts = []
        for label, items in (("missing weights", missing), ("unexpected weights", extra), ("wrong weights", wrong)):
            if items:
                sep = "; " if label == "wrong weights" else ", "
                parts.append(f"{label}: {sep.join(items[:8])}{' ...' if len(items) > 8 else ''}")
        raise CheckpointError(
            f"checkpoint does not match its {what} config ({'; '.join(parts)}); "
            "check that config.json belongs to these weights."
        )


def stream(table: WeightTable, shapes: Shapes, source: TensorSource) -> Iterator[tuple[str, np.ndarray]]:
    """``(our path, full parameter)`` one row at a time, so host memory holds one parameter, not a checkpoint.

    Call :func:`check` first: this assumes every key is present and well shaped, but for optional
    rows the checkpoint lacks entirely, which yield zeros.
    """
    names = _normalised(table, source)
    absent = table.absent_optional(shapes, names)
    for row in table.active(shapes):
        per_param = row.param_shapes(shapes)
        keys = row.keys(shapes)
        if row.optional and keys and keys[0] in absent:
            for path in row.ours:
                yield path, np.zeros(shapes[path], np.float32)
            continue
        layers: list[tuple[np.ndarray, ...]] = []
        for _, key in expand(row.hf, layer_count(row, shapes)):
            layers.append(row.op.to_ours(source.read(names[key]), per_param))
        for k, path in enumerate(row.ours):
            if row.per_layer:
                yield path, np.stack([parts[k] for parts in layers])
            else:
                yield path, np.asarray(layers[0][k])
        del layers


def export(table: WeightTable, params: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """``(HF key, tensor)`` for every row, from our arrays by path (numpy in, numpy out)."""
    shapes = {path: tuple(x.shape) for path, x in params.items()}
    for row in table.active(shapes):
        for i, key in expand(row.hf, layer_count(row, shapes)):
            arrays = [params[p] if i is None else params[p][i] for p in row.ours]
            yield key, row.op.to_hf(arrays)


__all__ = [
    "CheckpointError", "Op", "Row", "W", "WeightTable", "TensorSource", "ArraySource", "expand", "layer_count",
    "check", "stream", "export",
]
