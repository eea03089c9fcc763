"""``step()`` inputs from the torch/TRL world → lists of 1-D int32 numpy arrays (or strings).

Two jobs only. TRL's own checks run first, in TRL's order with TRL's messages
(§3.2 of the reference), so code that relied on them sees the same errors. Then
the inputs are *converted* (torch tensors on any device, JAX arrays, datasets
``Column``s, nested lists → numpy) and handed to ``jaxsft.training.batching``, the one
layer that validates step() inputs (empty lists, mismatched counts and lengths,
float ids, masks that are not 0/1, ...). Labels are optional, as TRL documented:
TRL 0.23.1's "labels must be a list of tensors - got NoneType" on the token path
is a bug not reproduced. Nothing passed in is mutated or aliased.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional, Sequence

import numpy as np

from jaxsft.training import batching
from jaxsft.infra.config import IGNORE_INDEX

BOTH_INPUTS_WARNING = (
    "Both `input_ids` and `texts` argument are provided. `input_ids` will be ignored. "
    "Please provide only one of the two."
)

# A wrong type; also a ValueError, which is what TRL raised for these, so old ``except`` clauses still work.
StepInputTypeError = batching.InputTypeError


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
    """A host copy of any array: torch (any device, with grad; meta/sparse refused by batching), JAX, numpy."""
    return np.array(batching.host_array(x, where), copy=True)


def _tokens(name: str, value: Any) -> Any:
    """TRL's type checks on one token argument (its messages), then a numpy form for ``jaxsft.training.batching``."""
    fix = f"pass {name} as a list of 1-D integer tensors/arrays/lists, or a 2-D [batch, seq] integer tensor"
    if _is_array_like(value):
        return _to_numpy(value, name)
    if not isinstance(value, (list, tuple)):
        raise StepInputTypeError(f"{name} must be a list of tensors - got {type(value)}; {fix}.")
    rows = []
    for index, row in enumerate(value):
        if isinstance(row, (bool, int, np.integer)):
            raise StepInputTypeError(
                f"Elements in {name} must be tensors - got {type(row)}; {name} must be a list of sequences, "
                f"so wrap a single example as [{name}]."
            )
        if _is_array_like(row):
            rows.append(_to_numpy(row, f"{name}[{index}]"))
        elif isinstance(row, (list, tuple)):
            rows.append(list(row))
        else:
            raise StepInputTypeError(
                f"Elements in {name} must be tensors - got {type(row)}; pass 1-D tensors, arrays or lists of int."
            )
    return rows


def _texts(label: str, value: Any) -> list[str]:
    """TRL's string checks, with its quoted names ('text', 'text_labels'), then a fix."""
    argument = "texts" if label == "text" else "texts_labels"
    if not isinstance(value, (list, tuple)):
        raise StepInputTypeError(
            f"'{label}' must be a list of strings - got {type(value)}; pass {argument}=[...] "
            f"(wrap a single string as [text])."
        )
    for item in value:
        if not isinstance(item, str):
            raise StepInputTypeError(
                f"Elements in '{label}' must be strings - got {type(item)}; pass {argument} as list[str]."
            )
    return batching.check_texts(argument, value)


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
    arguments given beside ``texts`` are ignored with TRL's warning. No examples
    (``input_ids=[]``, a 0-row array, ``texts=[]``) is an empty round: passed on
    as such, for the core to check and warn about.
    """
    if input_ids is None and texts is None:
        raise ValueError("Step should include `input_ids` or `texts` as keyword arguments.")
    if input_ids is not None and texts is not None:
        warnings.warn(BOTH_INPUTS_WARNING, UserWarning, stacklevel=2)
        input_ids = None
    input_ids, attention_mask, labels, texts, texts_labels = (
        _materialise(x) for x in (input_ids, attention_mask, labels, texts, texts_labels)
    )
    if batching.is_empty(texts if texts is not None else input_ids):
        # An empty round (a filter that kept nothing): the core warns and trains nothing, as for JAX users.
        if texts is not None:
            return StepInputs(texts=[], texts_labels=texts_labels)
        given = {n: None if v is None else _tokens(n, v) for n, v in (("attention_mask", attention_mask), ("labels", labels))}
        return StepInputs(input_ids=[], texts_labels=texts_labels, **given)
    if labels is None and texts_labels is None and is_encoder_decoder:
        raise ValueError(
            "No 'labels' or 'text_labels' are provided. When using an encoder-decoder architecture, "
            "'labels' or 'text_labels' must be passed."
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
            batching.check_text_pairs(texts, texts_labels)
        return StepInputs(texts=texts, texts_labels=texts_labels)

    if texts_labels is not None:
        warnings.warn(
            "`texts_labels` is ignored without `texts`; pass `labels` for token inputs.", UserWarning, stacklevel=2
        )
    ids = batching.token_rows("input_ids", _tokens("input_ids", input_ids))
    masks = rows = None
    if attention_mask is not None:
        masks = batching.token_rows("attention_mask", _tokens("attention_mask", attention_mask))
        batching.check_aligned("attention_mask", masks, ids)
    if labels is not None:
        rows = batching.token_rows("labels", _tokens("labels", labels))
        if not is_encoder_decoder:  # seq2seq labels are the decoder's own sequences, of any length
            batching.check_aligned("labels", rows, ids)
    return StepInputs(input_ids=ids, attention_mask=masks, labels=rows)


__all__: Sequence[str] = (
    "BOTH_INPUTS_WARNING", "IGNORE_INDEX", "StepInputTypeError", "StepInputs", "convert_step_inputs",
)
