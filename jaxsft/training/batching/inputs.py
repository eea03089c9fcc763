"""Checking ``step()``'s inputs: the one place they are validated (the TRL facade converts, then calls these).

Every check that can reject user input runs here, on the host, before a compiled step sees any data, and
names the argument at fault.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import ml_dtypes
import numpy as np

from jaxsft.infra import chat
from jaxsft.infra.config import IGNORE_INDEX

# step()'s input keywords (token arrays or texts), the one list the core, the facade and eval datasets use.
TOKEN_KEYWORDS = ("input_ids", "attention_mask", "labels")  # step()'s token-array keywords
STEP_KEYWORDS = (*TOKEN_KEYWORDS, "texts", "texts_labels")
_INT32_MAX = np.iinfo(np.int32).max


class InputTypeError(TypeError, ValueError):
    """A wrong type in ``step()`` inputs; also a ValueError, which is what TRL raised, so old handlers still work."""


_KIND = {"input_ids": "ids", "attention_mask": "mask", "labels": "labels"}


def host_array(value: Any, where: str) -> np.ndarray:
    """Any array (numpy, JAX, torch on any device) as a host numpy array, with clear errors for torch
    tensors that hold no data (meta device) or are not dense (sparse layouts)."""
    if type(value).__module__.split(".")[0] == "torch":
        if getattr(value, "is_meta", False):
            raise ValueError(
                f"{where} is a torch tensor on the meta device, which holds no values; pass real data "
                "(build the tensor on the CPU or an accelerator)."
            )
        layout = str(getattr(value, "layout", "torch.strided"))
        if layout != "torch.strided":
            raise ValueError(f"{where} is a sparse torch tensor ({layout}); pass a dense one (tensor.to_dense()).")
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bf16: ml_dtypes' keeps the name for errors
            return value.float().numpy().astype(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def _rows(value: Any, name: str) -> list[Any]:
    """Split a list of 1-D sequences, a 2-D array or a 1-D object array of rows into per-example rows."""
    if not isinstance(value, (np.ndarray, list, tuple)) and hasattr(value, "shape") and hasattr(value, "dtype"):
        value = host_array(value, name)  # a 2-D torch or JAX array
    if isinstance(value, np.ndarray):
        if value.ndim == 1 and value.dtype == object:
            rows = list(value)
        elif value.ndim == 2:
            rows = list(value)
        else:
            hint = (
                f" (to wrap a single example: {name}=[ids]). Wrap a single example in a list even when it is "
                "the only one" if value.ndim == 1 else ""
            )
            raise InputTypeError(
                f"{name} is a {value.ndim}-D array of shape {tuple(value.shape)}; pass a list of 1-D sequences "
                f"or a 2-D [num_examples, length] array{hint}."
            )
    elif isinstance(value, (list, tuple)):
        rows = list(value)
    else:
        raise InputTypeError(
            f"{name} must be a list of 1-D integer sequences or a 2-D numpy array; got {type(value).__name__}. "
            f"Convert it, e.g. {name}=[np.asarray(x) for x in ...]."
        )
    if not rows:
        raise ValueError(f"{name} is empty; pass at least one example.")
    return rows


def _first_non_int(row: Any) -> Any:
    for value in row:
        if not isinstance(value, (int, np.integer)):  # bool is an int: masks may be bool
            return value
    return None


def _token_row(name: str, index: int, row: Any) -> np.ndarray:
    """One example of ``name`` as int32, checked: 1-D, non-empty, integer, in int32, values valid for its kind."""
    where = f"{name}[{index}]"
    kind = _KIND[name]
    if isinstance(row, (list, tuple)):
        try:
            array = np.asarray(row)
        except ValueError:  # ragged nesting
            array = np.asarray(row, dtype=object)
    else:
        array = host_array(row, where)
    if array.ndim != 1:
        raise ValueError(
            f"{where} has shape {tuple(array.shape)}; each example must be 1-D: {where} must be a 1-D sequence "
            "of token ids (one flat sequence per example)."
        )
    if array.size == 0:
        raise ValueError(f"{where} is empty; every example needs at least one token.")
    what = "masks" if kind == "mask" else "token ids"
    if isinstance(row, (list, tuple)) and not np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
        bad = _first_non_int(row)
        if bad is not None:
            raise InputTypeError(
                f"{where} holds {type(bad).__name__} {bad!r}; token ids and masks must be integers, but {where} "
                f"has dtype {array.dtype} (cast it to integers, e.g. np.asarray(x, dtype=np.int32))."
            )
    if array.dtype == np.bool_:
        if kind != "mask":
            raise InputTypeError(f"{where} has dtype bool; token ids must be integers (cast with .long() / .astype(int)).")
        array = array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise InputTypeError(
            f"{where} has dtype {array.dtype}; {what} must be integers (cast with .long() / .astype(int))."
        )
    if int(array.max()) > _INT32_MAX:  # checked before any cast, which would wrap it negative
        raise ValueError(
            f"{where} holds values outside int32: the id {int(array.max())} is beyond int32 ({_INT32_MAX}); token ids "
            "must fit the model's vocabulary. Check the tokenizer, or the dtype the ids were read with."
        )
    if int(array.min()) < -_INT32_MAX:
        raise ValueError(f"{where} holds values outside int32 (down to {int(array.min())}); check how it was built.")
    array = array.astype(np.int64)
    if kind == "ids":
        negative = np.flatnonzero(array < 0)
        if negative.size:
            raise ValueError(
                f"{where} contains the negative id {int(array[negative[0]])} at position {int(negative[0])}: {where} "
                "contains negative token ids, and token ids must be >= 0. Mark ignored positions in labels (-100), "
                "not in input_ids."
            )
    elif kind == "mask":
        bad = np.flatnonzero((array != 0) & (array != 1))
        if bad.size:
            values = np.unique(array[bad])[:5].tolist()
            raise ValueError(
                f"{where} contains {values}; masks must be 0 (padding) or 1 (token): {where} contains "
                f"{int(array[bad[0]])} at position {int(bad[0])}, and its values must be 0 (padding) or 1 (real token)."
            )
    else:
        bad = np.flatnonzero((array < 0) & (array != IGNORE_INDEX))
        if bad.size:
            raise ValueError(
                f"{where} contains negative values other than {IGNORE_INDEX}: {where} contains "
                f"{int(array[bad[0]])} at position {int(bad[0])}; labels must be token ids >= 0, or {IGNORE_INDEX} "
                "for positions without a loss."
            )
    return array.astype(np.int32)


def token_rows(name: str, value: Any) -> list[np.ndarray]:
    """``input_ids`` / ``attention_mask`` / ``labels`` -> a list of checked 1-D int32 arrays (fresh copies).

    Accepts a list or tuple of 1-D sequences (numpy arrays, lists of int), a 2-D array, or a 1-D
    object array of rows. Every problem raises naming the argument, the example and the fix:
    ``InputTypeError`` (also a ValueError) for types, ValueError for values.
    """
    if name not in _KIND:
        raise ValueError(f"token_rows: name={name!r} must be one of {', '.join(_KIND)}.")
    return [_token_row(name, i, row) for i, row in enumerate(_rows(value, name))]


def check_aligned(name: str, rows: Sequence[np.ndarray], input_ids: Sequence[np.ndarray]) -> None:
    """``attention_mask`` / ``labels`` rows must match ``input_ids`` in count and, example by example, in length."""
    if len(rows) != len(input_ids):
        raise ValueError(
            f"{name} has {len(rows)} examples but input_ids has {len(input_ids)}; pass one per example "
            f"(one {name} row per example)."
        )
    for i, (row, ids) in enumerate(zip(rows, input_ids)):
        if row.shape != ids.shape:
            n, m = row.shape[0], ids.shape[0]
            raise ValueError(
                f"{name}[{i}] has length {n} but input_ids[{i}] has {m} tokens; they must match: {name}[{i}] has "
                f"length {n} but input_ids[{i}] has length {m}, and {name} must be aligned token by token with "
                "input_ids."
            )


def check_texts(name: str, value: Any, *, chats: bool = False) -> list[Any]:
    """A list of strings (with ``chats``: or chats, lists of {'role', 'content'} messages), or an error naming ``name``."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise InputTypeError(
            f"{name} must be a list of str; got {type(value).__name__}. Wrap a single text in a list: {name}=[text]."
        )
    if not value:
        raise ValueError(f"{name} is empty; pass at least one string.")
    for i, text in enumerate(value):
        if isinstance(text, str):
            continue
        if chats and isinstance(text, (list, tuple)):
            chat.check_messages(text, f"{name}[{i}]")
            continue
        kinds = "a str or a chat (a list of {'role', 'content'} messages)" if chats else "a str"
        raise InputTypeError(f"{name}[{i}] is a {type(text).__name__}; every element of {name} must be {kinds}.")
    return list(value)


def check_text_pairs(texts: Sequence[str], texts_labels: Sequence[str]) -> None:
    """One completion per text."""
    if len(texts_labels) != len(texts):
        n, m = len(texts_labels), len(texts)
        raise ValueError(
            f"texts_labels has {n} entries but texts has {m}; pass one completion per text (texts_labels has "
            f"{n} strings but texts has {m})."
        )


def is_empty(value: Any) -> bool:
    """A call with no examples (an empty list or array); None and unsized values are not empty."""
    try:
        return value is not None and len(value) == 0
    except TypeError:
        return False


def refuse_tokens_with_texts(inputs: dict[str, Any], fix: str) -> None:
    """step(texts=...) takes no token arrays: name the ones given, then ``fix``."""
    given = [n for n in TOKEN_KEYWORDS if inputs.get(n) is not None]
    if given:
        raise ValueError(f"step() got texts=... together with {', '.join(given)}; {fix}")


def check_empty_call(input_ids=None, attention_mask=None, labels=None, texts=None, texts_labels=None) -> None:
    """A call with no examples must still be a consistent call (nothing else given that needs examples)."""
    if texts is not None:
        refuse_tokens_with_texts(
            {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}, "pass one or the other."
        )
        others = {"texts_labels": texts_labels}
    else:
        if texts_labels is not None:
            raise ValueError("texts_labels was given without texts; pass texts=... with it, or labels=... with input_ids.")
        others = {"attention_mask": attention_mask, "labels": labels}
    for name, value in others.items():
        if value is not None and not is_empty(value):
            raise ValueError(
                f"step() got no examples but {name} has {len(value)} entries; pass one {name} entry per example."
            )


def check_example_weights(weights: Any) -> Optional[np.ndarray]:
    """``example_weights``: None, or a list / 1-D array of finite floats >= 0 (float64), else a clear error."""
    if weights is None:
        return None
    if isinstance(weights, (str, bytes, dict, set)) or not (
        isinstance(weights, (list, tuple, np.ndarray)) or hasattr(weights, "__array__")
    ):
        raise InputTypeError(
            f"example_weights must be a list or 1-D array of floats (one per example), got {type(weights).__name__}."
        )
    try:
        array = np.asarray(host_array(weights, "example_weights") if not isinstance(weights, (list, tuple)) else weights)
    except (TypeError, ValueError) as err:
        raise InputTypeError(f"example_weights must be a flat list of numbers (one per example): {err}") from None
    if array.ndim != 1:
        raise ValueError(
            f"example_weights has shape {tuple(array.shape)}; pass one number per example (a list or 1-D array)."
        )
    if array.size and (array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.integer)
                                                      or np.issubdtype(array.dtype, np.floating))):
        raise InputTypeError(
            f"example_weights has dtype {array.dtype}; pass numbers (floats >= 0), one per example."
        )
    array = array.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(array) | (array < 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"example_weights[{i}] is {array[i]!r}; every weight must be a finite number >= 0 (0 leaves the "
            "example out)."
        )
    return array


def with_weights(examples: list[Any], weights: Optional[np.ndarray]) -> list[Any]:
    """``examples`` carrying their ``example_weights`` (checked), zero-weight ones left out; unchanged without."""
    if weights is None:
        return examples
    if weights.shape[0] != len(examples):
        raise ValueError(
            f"example_weights has {weights.shape[0]} entries but the call has {len(examples)} examples; pass one "
            "weight per example."
        )
    return [dataclasses.replace(ex, weight=float(w)) for ex, w in zip(examples, weights) if w > 0]


def step_inputs_of_dataset(dataset: Any) -> dict[str, Any]:
    """An eval dataset as step() keywords: a dict of them, a ``datasets.Dataset`` (``input_ids`` with optional
    ``attention_mask`` / ``labels``, or ``text``), a list of strings, of token sequences or of dicts with
    ``input_ids``. The one routing the core and the facade share."""
    columns = getattr(dataset, "column_names", None)
    if columns is not None and hasattr(dataset, "__getitem__"):  # datasets.Dataset
        if "input_ids" in columns:
            return {k: dataset[k] for k in TOKEN_KEYWORDS if k in columns}
        for key in ("text", "texts"):
            if key in columns:
                return {"texts": dataset[key]}
        raise ValueError(f"eval_dataset has columns {columns}; it needs input_ids (with optional attention_mask "
                         "and labels) or text.")
    if isinstance(dataset, dict):
        unknown = set(dataset) - set(STEP_KEYWORDS)
        if unknown:
            raise ValueError(f"eval_dataset has unknown keys {sorted(unknown)}; use {', '.join(STEP_KEYWORDS)}.")
        return dict(dataset)
    if isinstance(dataset, (list, tuple)) and dataset:
        if all(isinstance(x, str) for x in dataset):
            return {"texts": list(dataset)}
        if all(isinstance(x, dict) for x in dataset):
            if not all("input_ids" in row for row in dataset):
                raise ValueError("eval_dataset rows must each have an input_ids entry.")
            keys = [k for k in TOKEN_KEYWORDS if k in dataset[0]]
            return {k: [row[k] for row in dataset] for k in keys}
        return {"input_ids": list(dataset)}
    raise TypeError(
        f"eval_dataset must be a dict of step() keywords, a datasets.Dataset, a list of strings, a list of token "
        f"sequences or a list of dicts with input_ids, got {type(dataset).__name__}."
    )
