"""``step()`` inputs from the torch/TRL world → lists of 1-D int32 numpy arrays (or strings).

TRL's checks run in TRL's order with TRL's messages (§3.2 of the reference),
so code that relied on them sees the same errors; then the facade accepts more
than TRL did (numpy, JAX, nested lists, 2-D tensors, datasets ``Column``s) and
checks what TRL never did (empty lists, mismatched counts and lengths, float
ids, masks that are not 0/1). Labels are optional, as TRL documented: TRL
0.23.1's "labels must be a list of tensors - got NoneType" on the token path is
a bug not reproduced. Nothing passed in is mutated or aliased.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional, Sequence

import numpy as np

from jaxsft import batching

IGNORE_INDEX = -100
_INT32_MAX = np.iinfo(np.int32).max

BOTH_INPUTS_WARNING = (
    "Both `input_ids` and `texts` argument are provided. `input_ids` will be ignored. "
    "Please provide only one of the two."
)


class StepInputTypeError(TypeError, ValueError):
    """A wrong type. Also a ValueError, which is what TRL raised for these, so old ``except`` clauses still work."""


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """Normalised ``step()`` inputs: either token arrays or texts, never both."""

    input_ids: Optional[list[np.ndarray]] = None
    attention_mask: Optional[list[np.ndarray]] = None
    labels: Optional[list[np.ndarray]] = None
    texts: Optional[list[str]] = None
    texts_labels: Optional[list[str]] = None

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``jaxsft.IterativeSFTTrainer.step``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _is_array_like(x: Any) -> bool:
    """torch / numpy / JAX arrays: things with a dtype and a shape."""
    return hasattr(x, "dtype") and hasattr(x, "shape") and not isinstance(x, (str, bytes))


def _is_column_like(x: Any) -> bool:
    """A datasets ``Column`` or similar lazy sequence: sliceable and sized, but not a list or an array."""
    return (
        not isinstance(x, (list, tuple, str, bytes, dict))
        and not _is_array_like(x)
        and hasattr(x, "__getitem__")
        and hasattr(x, "__len__")
    )


def _materialise(x: Any) -> Any:
    """TRL's ``x = x[:]`` (datasets 4 Column → list), without copying lists and arrays twice."""
    return x[:] if _is_column_like(x) else x


def _to_numpy(x: Any, where: str) -> np.ndarray:
    """A host copy of any array: torch (any device, with grad), JAX, numpy (meta/sparse refused by batching)."""
    return np.array(batching.host_array(x, where), copy=True)


def _int_rows(name: str, value: Any, *, mask: bool) -> list[np.ndarray]:
    """One argument → a list of 1-D int32 arrays, or a TypeError/ValueError naming ``name``."""
    fix = f"pass {name} as a list of 1-D integer tensors/arrays/lists, or a 2-D [batch, seq] integer tensor"
    if _is_array_like(value):
        array = _to_numpy(value, name)
        if array.ndim == 1 and array.dtype == object:
            rows = list(array)
        elif array.ndim == 2:
            rows = list(array)
        else:
            raise ValueError(
                f"{name} is a {array.ndim}-D array of shape {tuple(array.shape)}; {fix} "
                f"(wrap a single example as [{name}])."
            )
    elif isinstance(value, (list, tuple)):
        rows = list(value)
    else:
        raise StepInputTypeError(f"{name} must be a list of tensors - got {type(value)}; {fix}.")
    if not rows:
        raise ValueError(f"{name} is empty; pass at least one example.")
    return [_int_row(name, i, row, mask=mask) for i, row in enumerate(rows)]


def _int_row(name: str, index: int, row: Any, *, mask: bool) -> np.ndarray:
    where = f"{name}[{index}]"
    if isinstance(row, (bool, int, np.integer)):
        raise StepInputTypeError(
            f"Elements in {name} must be tensors - got {type(row)}; {name} must be a list of sequences, "
            f"so wrap a single example as [{name}]."
        )
    dtype = str(getattr(row, "dtype", "")).replace("torch.", "")  # reported as the caller wrote it
    if _is_array_like(row):
        array = _to_numpy(row, where)
    elif isinstance(row, (list, tuple)):
        if not all(isinstance(v, (int, np.integer)) for v in row):  # bool is an int: allowed for masks below
            bad = next(v for v in row if not isinstance(v, (int, np.integer)))
            raise StepInputTypeError(
                f"{where} holds {type(bad).__name__} {bad!r}; token ids and masks must be integers."
            )
        array = np.asarray(row, dtype=np.int64)
        dtype = "int64"
    else:
        raise StepInputTypeError(
            f"Elements in {name} must be tensors - got {type(row)}; pass 1-D tensors, arrays or lists of int."
        )
    if array.ndim != 1:
        raise ValueError(f"{where} has shape {tuple(array.shape)}; each example must be 1-D (one token sequence).")
    if array.size == 0:
        raise ValueError(f"{where} is empty; every example needs at least one token.")
    if array.dtype == np.bool_ or (array.dtype == object and all(isinstance(v, (bool, np.bool_)) for v in array)):
        if not mask:
            raise StepInputTypeError(f"{where} has dtype bool; token ids must be integers (cast with .long()).")
        array = array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise StepInputTypeError(
            f"{where} has dtype {dtype or array.dtype}; {'masks' if mask else 'token ids'} must be integers "
            "(cast with .long() / .astype(int))."
        )
    if array.min() < -_INT32_MAX or array.max() > _INT32_MAX:
        raise ValueError(f"{where} holds values outside int32; token ids must fit the vocabulary.")
    return array.astype(np.int32)


def _check_values(name: str, rows: list[np.ndarray]) -> None:
    for i, row in enumerate(rows):
        if name == "attention_mask":
            bad = np.setdiff1d(row, (0, 1))
            if bad.size:
                raise ValueError(
                    f"attention_mask[{i}] contains {bad[:5].tolist()}; masks must be 0 (padding) or 1 (token)."
                )
        elif name == "labels":
            if np.any((row < 0) & (row != IGNORE_INDEX)):
                raise ValueError(
                    f"labels[{i}] contains negative values other than {IGNORE_INDEX}; use token ids >= 0, "
                    f"or {IGNORE_INDEX} for positions without a loss."
                )
        elif np.any(row < 0):
            raise ValueError(f"input_ids[{i}] contains negative token ids; token ids must be >= 0.")


def _check_aligned(name: str, rows: list[np.ndarray], reference: list[np.ndarray]) -> None:
    if len(rows) != len(reference):
        raise ValueError(
            f"{name} has {len(rows)} examples but input_ids has {len(reference)}; pass one per example."
        )
    for i, (row, ref) in enumerate(zip(rows, reference)):
        if row.shape != ref.shape:
            raise ValueError(
                f"{name}[{i}] has length {row.shape[0]} but input_ids[{i}] has {ref.shape[0]}; they must match."
            )


def _texts(label: str, value: Any) -> list[str]:
    """TRL's string checks, with its quoted names ('text', 'text_labels'), then a fix."""
    argument = "texts" if label == "text" else "texts_labels"
    if not isinstance(value, (list, tuple)):
        raise StepInputTypeError(
            f"'{label}' must be a list of strings - got {type(value)}; pass {argument}=[...] "
            f"(wrap a single string as [text])."
        )
    if not value:
        raise ValueError(f"{argument} is empty; pass at least one string.")
    for item in value:
        if not isinstance(item, str):
            raise StepInputTypeError(
                f"Elements in '{label}' must be strings - got {type(item)}; pass {argument} as list[str]."
            )
    return list(value)


def convert_step_inputs(
    input_ids: Any = None,
    attention_mask: Any = None,
    labels: Any = None,
    texts: Any = None,
    texts_labels: Any = None,
    *,
    is_encoder_decoder: bool = False,
) -> StepInputs:
    """Validate and normalise ``IterativeSFTTrainer.step`` arguments.

    Token path: lists of 1-D tensors/arrays/int lists, 2-D tensors/arrays
    (torch, numpy, JAX; CUDA tensors are copied to the host), or Column-like
    objects (sliced with ``x[:]``). ``attention_mask`` and ``labels`` are
    optional and must match ``input_ids`` example by example. Texts path:
    list[str], with optional ``texts_labels`` of the same count; token
    arguments given beside ``texts`` are ignored with TRL's warning.
    """
    if input_ids is None and texts is None:
        raise ValueError("Step should include `input_ids` or `texts` as keyword arguments.")
    if input_ids is not None and texts is not None:
        warnings.warn(BOTH_INPUTS_WARNING, UserWarning, stacklevel=2)
        input_ids = None
    if labels is None and texts_labels is None and is_encoder_decoder:
        raise ValueError(
            "No 'labels' or 'text_labels' are provided. When using an encoder-decoder architecture, "
            "'labels' or 'text_labels' must be passed."
        )
    input_ids, attention_mask, labels, texts, texts_labels = (
        _materialise(x) for x in (input_ids, attention_mask, labels, texts, texts_labels)
    )

    if texts is not None:
        ignored = [n for n, v in (("attention_mask", attention_mask), ("labels", labels)) if v is not None]
        if ignored:
            warnings.warn(
                f"{' and '.join(ignored)} given together with `texts` are ignored: texts are tokenized afresh. "
                "Use `texts_labels` for targets.",
                UserWarning,
                stacklevel=2,
            )
        texts = _texts("text", texts)
        if texts_labels is not None:
            texts_labels = _texts("text_labels", texts_labels)
            if len(texts_labels) != len(texts):
                raise ValueError(
                    f"texts_labels has {len(texts_labels)} strings but texts has {len(texts)}; pass one per text."
                )
        return StepInputs(texts=texts, texts_labels=texts_labels)

    if texts_labels is not None:
        warnings.warn(
            "`texts_labels` is ignored without `texts`; pass `labels` for token inputs.", UserWarning, stacklevel=2
        )
    ids = _int_rows("input_ids", input_ids, mask=False)
    _check_values("input_ids", ids)
    masks = rows = None
    if attention_mask is not None:
        masks = _int_rows("attention_mask", attention_mask, mask=True)
        _check_aligned("attention_mask", masks, ids)
        _check_values("attention_mask", masks)
    if labels is not None:
        rows = _int_rows("labels", labels, mask=False)
        if not is_encoder_decoder:  # seq2seq labels are the decoder's own sequences, of any length
            _check_aligned("labels", rows, ids)
        _check_values("labels", rows)
    return StepInputs(input_ids=ids, attention_mask=masks, labels=rows)


__all__: Sequence[str] = (
    "BOTH_INPUTS_WARNING", "IGNORE_INDEX", "StepInputTypeError", "StepInputs", "convert_step_inputs",
)
