"""Examples → shuffled, bucketed, right-padded micro-batches (pure numpy, no jax).

Everything here runs on the host before a compiled step sees any data, so every
check that can reject user input lives here and names the argument at fault.
Padding is identified by ``attention_mask``, never by token id: a real EOS that
happens to share the pad id stays in the example and is learned.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import ml_dtypes
import numpy as np

from jaxsft.infra import chat
from jaxsft.infra.config import IGNORE_INDEX, TRUNCATION_MODES

# step()'s input keywords (token arrays or texts), the one list the core, the facade and eval datasets use.
TOKEN_KEYWORDS = ("input_ids", "attention_mask", "labels")  # step()'s token-array keywords
STEP_KEYWORDS = (*TOKEN_KEYWORDS, "texts", "texts_labels")
_INT32_MAX = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class Example:
    """One training sequence; ``labels`` is aligned with ``input_ids`` (the shift happens in the loss)."""

    input_ids: np.ndarray  # int32 [n]
    labels: np.ndarray  # int32 [n], -100 = not learned
    # step(example_weights=...): how many times each label token counts (None: a call without weights).
    weight: Optional[float] = None
    truncated: bool = False  # cut to max_length
    lost_all_labels: bool = False  # had label tokens, none left after the cut (keep_start cutting a completion)


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """A fixed-shape slab for one compiled step.

    ``num_label_tokens`` counts the targets the *shifted* loss uses: label
    positions 1..n-1 of each row that are not -100. The label at position 0 of
    a row is never predicted (nothing precedes it), so counting it would skew
    the per-token mean the trainer forms across micro-batches.
    """

    input_ids: np.ndarray  # int32 [rows, length], right-padded with 0
    attention_mask: np.ndarray  # int32 [rows, length], 1 = real token
    labels: np.ndarray  # int32 [rows, length], -100 at padding and filler rows
    num_examples: int  # real examples; the rest of the rows (or row tails) are zero-weight filler
    num_label_tokens: int
    # Packed micro-batches only (None otherwise): several examples share a row, end to end.
    segment_ids: Optional[np.ndarray] = None  # int32 [rows, length]: 1, 2, ... per example in its row, 0 = padding
    positions: Optional[np.ndarray] = None  # int32 [rows, length]: each example counts from 0
    # int32 [rows, max_examples + 1]: each row's segment lengths in order, its padding tail as a last
    # segment, then zeros (what segment-aware attention kernels take instead of ids).
    segment_lengths: Optional[np.ndarray] = None
    # Weighted calls only: float32 [rows, length], each label position's example weight (0 at padding).
    label_weights: Optional[np.ndarray] = None

    @property
    def packed(self) -> bool:
        return self.segment_ids is not None


# ---------------------------------------------------------------------------
# input checking: the one place step() inputs are validated (the TRL facade converts, then calls these)


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


def _truncate(
    ids: np.ndarray, labels: np.ndarray, max_length: Optional[int], mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """Cut along the sequence axis (TRL's documented intent; 0.23.1 cut the batch axis)."""
    if max_length is None or ids.shape[0] <= max_length:
        return ids, labels
    if mode == "keep_end":
        return ids[-max_length:], labels[-max_length:]
    return ids[:max_length], labels[:max_length]


def _check_truncation(max_length: Optional[int], truncation_mode: str) -> None:
    if max_length is not None and (not isinstance(max_length, (int, np.integer)) or max_length < 1):
        raise ValueError(f"max_length={max_length!r} must be None or a positive integer; pass e.g. max_length=512.")
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be either 'keep_end' or 'keep_start', got {truncation_mode}")


def _make_example(ids: np.ndarray, labels: np.ndarray, max_length: Optional[int], mode: str) -> Example:
    full = ids.shape[0]
    had_labels = bool(np.any(labels[1:] != IGNORE_INDEX))
    ids, labels = _truncate(ids, labels, max_length, mode)
    truncated = ids.shape[0] < full
    return Example(
        input_ids=ids.astype(np.int32), labels=labels.astype(np.int32), truncated=truncated,
        lost_all_labels=truncated and had_labels and not np.any(labels[1:] != IGNORE_INDEX),
    )


def truncation_warning(examples: Sequence[Any], max_length: Optional[int], mode: str) -> Optional[str]:
    """The one warning a call's cut examples deserve (None when nothing was cut)."""
    cut = sum(ex.truncated for ex in examples)
    if not cut:
        return None
    message = (
        f"step(): {cut} of {len(examples)} examples were longer than max_length={max_length} tokens and were cut "
        f"(truncation_mode={mode!r} keeps the {'first' if mode == 'keep_start' else 'last'} {max_length})."
    )
    lost = sum(ex.lost_all_labels for ex in examples)
    if lost:
        message += (
            f" {lost} of them lost every label token (their whole completion lay beyond the cut), so nothing is "
            "learned from them; raise max_length, shorten the prompts, or use truncation_mode='keep_end'."
        )
    else:
        message += " Raise max_length to train on whole examples."
    return message


# ---------------------------------------------------------------------------
# public constructors


def examples_from_tokens(
    input_ids: Any,
    attention_mask: Any = None,
    labels: Any = None,
    *,
    max_length: Optional[int],
    truncation_mode: str,
) -> list[Example]:
    """Turn (possibly padded) token data into unpadded examples.

    Positions where ``attention_mask`` is 0 are dropped, wherever they sit (left
    or right padding, holes). Labels default to ``input_ids``; given labels are
    kept as they are. Truncation keeps the last (``keep_end``) or first
    (``keep_start``) ``max_length`` tokens of each example.
    """
    _check_truncation(max_length, truncation_mode)
    id_rows = token_rows("input_ids", input_ids)
    mask_rows = None if attention_mask is None else token_rows("attention_mask", attention_mask)
    label_rows = None if labels is None else token_rows("labels", labels)
    for name, rows in (("attention_mask", mask_rows), ("labels", label_rows)):
        if rows is not None:
            check_aligned(name, rows, id_rows)

    examples = []
    for i, ids in enumerate(id_rows):
        lab = ids if label_rows is None else label_rows[i]
        if mask_rows is not None:
            keep = mask_rows[i] == 1
            ids, lab = ids[keep], lab[keep]
        if ids.shape[0] == 0:
            raise ValueError(
                f"input_ids[{i}] is empty after dropping positions where attention_mask is 0; "
                f"remove that example or fix its attention_mask."
            )
        examples.append(_make_example(ids, lab, max_length, truncation_mode))
    return examples


def _prompts_and_replies(
    tokenizer: Any, texts: list[Any], texts_labels: Optional[list[str]]
) -> tuple[list[str], list[bool], Optional[list[str]]]:
    """(prompt strings, which are chat-formatted, completion strings or None).

    A chat prompt is formatted as ``generate`` formats it; its completion is the assistant turn the
    template writes for ``texts_labels[i]``, or for the chat's own last message when that is the
    assistant's and no ``texts_labels`` are given.
    """
    if not any(chat.is_chat(t) for t in texts):
        return texts, [False] * len(texts), texts_labels
    if texts_labels is None and not all(chat.is_chat(t) for t in texts):
        raise ValueError(
            "texts mixes chats ending in an assistant message with plain strings and no texts_labels; pass "
            "texts_labels for every text, or make every text a chat."
        )
    prompts, is_chat, replies = [], [], []
    for i, text in enumerate(texts):
        if not chat.is_chat(text):
            prompts.append(text)
            is_chat.append(False)
            replies.append(texts_labels[i] if texts_labels is not None else None)
            continue
        messages = list(text)
        if texts_labels is not None:
            reply = texts_labels[i]
        elif messages[-1]["role"] == "assistant" and len(messages) > 1:
            messages, reply = messages[:-1], messages[-1]["content"]
        else:
            raise ValueError(
                f"texts[{i}] is a chat whose last message is from {messages[-1]['role']!r} (or its only message is the "
                "assistant's), and no texts_labels were "
                "given; pass texts_labels=[reply, ...] (learned as the assistant turn) or end the chat with an "
                "assistant message."
            )
        prompts.append(chat.prompt_text(tokenizer, messages, f"texts[{i}]"))
        is_chat.append(True)
        replies.append(chat.assistant_turn(tokenizer, messages, reply, f"texts[{i}]"))
    return prompts, is_chat, replies


def _tokenize_prompts(tokenizer: Any, prompts: list[str], is_chat: list[bool]) -> list[np.ndarray]:
    """Plain strings with the tokenizer's special tokens; chat-formatted ones without (the template has them)."""
    out: list[Any] = [None] * len(prompts)
    for flag in (False, True):
        idx = [i for i, c in enumerate(is_chat) if c == flag]
        if idx:
            ids = tokenizer([prompts[i] for i in idx], add_special_tokens=not flag)["input_ids"]
            for i, row in zip(idx, ids):
                out[i] = np.asarray(row, dtype=np.int64)
    return out


def examples_from_texts(
    tokenizer: Any,
    texts: Sequence[Any],
    texts_labels: Optional[Sequence[str]] = None,
    *,
    max_length: Optional[int],
    truncation_mode: str,
    eos_token_id: Optional[int] = None,
) -> list[Example]:
    """Tokenize texts for causal-LM training.

    Without ``texts_labels`` every token is learned. With them, example i is
    ``texts[i]`` (tokenized with the tokenizer's default special tokens, e.g. a
    BOS) followed by ``texts_labels[i]`` (no special tokens, so no BOS lands
    mid-sequence), and only the completion tokens are learned. A text may be a
    chat (list of messages): it is formatted with the chat template as
    ``generate`` formats a prompt, and its completion is the assistant turn (see
    :mod:`jaxsft.infra.chat`). ``eos_token_id``: appended to every completion that does
    not already end with it, so the model learns to stop. Each list is tokenized
    in one batched call because per-text calls dominate host time.
    """
    if tokenizer is None:
        raise ValueError("texts were given but no tokenizer; pass processing_class=<a tokenizer> to the trainer.")
    _check_truncation(max_length, truncation_mode)
    texts = check_texts("texts", texts, chats=True)
    if texts_labels is not None:
        texts_labels = check_texts("texts_labels", texts_labels)
        check_text_pairs(texts, texts_labels)
    prompt_texts, is_chat, replies = _prompts_and_replies(tokenizer, texts, texts_labels)
    prompts = _tokenize_prompts(tokenizer, prompt_texts, is_chat)
    if replies is None:
        completions = [np.zeros(0, np.int64)] * len(prompts)
    else:
        encoded = tokenizer(list(replies), add_special_tokens=False)["input_ids"]
        completions = [np.asarray(x, dtype=np.int64) for x in encoded]
        if eos_token_id is not None:
            eos = np.asarray([eos_token_id], np.int64)
            completions = [c if c.size and c[-1] == eos_token_id else np.concatenate([c, eos]) for c in completions]

    examples = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids = np.concatenate([prompt, completion])
        if ids.shape[0] == 0:
            raise ValueError(f"texts[{i}] tokenizes to no tokens; remove it or give it some text.")
        if ids.min() < 0:
            raise ValueError(f"texts[{i}] tokenized to a negative id ({int(ids.min())}); check the tokenizer.")
        if replies is None:
            lab = ids
        else:
            lab = np.concatenate([np.full(prompt.shape, IGNORE_INDEX, np.int64), completion])
        examples.append(_make_example(ids, lab, max_length, truncation_mode))
    return examples


def validate_vocab(examples: Sequence[Example], vocab_size: int) -> None:
    """Reject ids the embedding table cannot hold (XLA would silently clamp or fill them)."""
    for i, ex in enumerate(examples):
        for name, values in (("input_ids", ex.input_ids), ("labels", ex.labels[ex.labels != IGNORE_INDEX])):
            bad = values[values >= vocab_size]
            if bad.size:
                raise ValueError(
                    f"{name}[{i}] contains the id {int(bad[0])}, but the model's vocabulary has {vocab_size} entries "
                    f"(ids 0..{vocab_size - 1}); use the tokenizer that belongs to this model."
                )


# ---------------------------------------------------------------------------
# planning


def _bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    for size in buckets:
        if size >= length:
            return size
    raise ValueError(
        f"an example has {length} tokens but the largest length bucket is {buckets[-1]}; "
        f"set max_length so examples are truncated to at most {buckets[-1]} tokens."
    )


def _pack(group: list[Example], rows: int, length: int) -> MicroBatch:
    input_ids = np.zeros((rows, length), np.int32)
    attention_mask = np.zeros((rows, length), np.int32)
    labels = np.full((rows, length), IGNORE_INDEX, np.int32)
    label_weights = _weights_slab(group, (rows, length))
    for r, ex in enumerate(group):
        n = ex.input_ids.shape[0]
        input_ids[r, :n] = ex.input_ids
        attention_mask[r, :n] = 1
        labels[r, :n] = ex.labels
        if label_weights is not None:
            label_weights[r, :n] = ex.weight
    num_label_tokens = int(np.count_nonzero(labels[:, 1:] != IGNORE_INDEX))
    return MicroBatch(
        input_ids, attention_mask, labels, num_examples=len(group), num_label_tokens=num_label_tokens,
        label_weights=label_weights,
    )


def _weights_slab(group: Sequence[Any], shape: tuple[int, int]) -> Optional[np.ndarray]:
    """Zeros of ``shape`` for a weighted call's per-token weights, or None for an unweighted one."""
    return None if group[0].weight is None else np.zeros(shape, np.float32)


def _first_fit(lengths: Sequence[int], room: int) -> list[list[int]]:
    """Indices into ``lengths`` binned first-fit, longest first, into rows of ``room`` tokens."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        target = next((b for b, left in enumerate(free) if left >= lengths[i]), None)
        if target is None:
            bins.append([])
            free.append(room)
            target = len(bins) - 1
        bins[target].append(i)
        free[target] -= lengths[i]
    return bins


def _pack_segments(
    group: list[Example],
    max_rows: int,
    buckets: tuple[int, ...],
    row_multiple: int,
    longer_rows: bool,
) -> MicroBatch:
    """Lay a group's examples end to end in rows (first-fit, longest first), in the cheapest layout.

    Candidate row lengths are the longest example's bucket and, with ``longer_rows`` (for attention
    whose cost follows the segments, not the row: cuDNN's ragged kernel), the buckets above it;
    each needs as many rows as first-fit makes, rounded up to ``row_multiple`` (every device gets
    whole rows). The fewest row x length tokens wins (a tie goes to longer rows: fewer distinct
    shapes). When packing does not beat one example per row, the plain layout is kept: its
    attention needs no segment tables (the causal cuDNN kernel is a little faster than the
    ragged one).

    Each example keeps its own positions (from 0) and segment id; its first label is set to -100,
    because in a packed row the token before it belongs to another example (unpacked, position 0
    is never a target either), so the shifted loss never crosses a boundary and the label count
    is unchanged.
    """
    lengths = [int(ex.input_ids.shape[0]) for ex in group]
    plain_length = _bucket_for(max(lengths), buckets)
    plain_tokens = max_rows * plain_length
    layouts: list[tuple[int, int, list[list[int]]]] = []  # (rows, length, bins), one per candidate length
    for length in (b for b in buckets if b >= plain_length and (longer_rows or b == plain_length)):
        bins = _first_fit(lengths, length)
        layouts.append((-(-len(bins) // row_multiple) * row_multiple, length, bins))
        if len(bins) == 1:
            break  # longer rows only add padding
    rows, length, bins = min(layouts, key=lambda lay: (lay[0] * lay[1], -lay[1]))
    if rows * length >= plain_tokens:
        return _pack(group, max_rows, plain_length)
    input_ids = np.zeros((rows, length), np.int32)
    attention_mask = np.zeros((rows, length), np.int32)
    labels = np.full((rows, length), IGNORE_INDEX, np.int32)
    segment_ids = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    label_weights = _weights_slab(group, (rows, length))
    for r, members in enumerate(bins):
        start = 0
        for segment, i in enumerate(sorted(members), start=1):  # in group order within a row
            ex = group[i]
            n = ex.input_ids.shape[0]
            span = slice(start, start + n)
            input_ids[r, span] = ex.input_ids
            attention_mask[r, span] = 1
            labels[r, span] = ex.labels
            labels[r, start] = IGNORE_INDEX
            segment_ids[r, span] = segment
            positions[r, span] = np.arange(n, dtype=np.int32)
            if label_weights is not None:
                label_weights[r, span] = ex.weight
            start += n
    num_label_tokens = int(np.count_nonzero(labels != IGNORE_INDEX))
    return MicroBatch(
        input_ids, attention_mask, labels, num_examples=len(group), num_label_tokens=num_label_tokens,
        segment_ids=segment_ids, positions=positions, segment_lengths=segment_table(segment_ids, max_rows),
        label_weights=label_weights,
    )


def as_packed(mb: MicroBatch, max_examples: int) -> MicroBatch:
    """The packed form of a plain micro-batch (one example per row), so programs agree in structure."""
    if mb.packed:
        return mb
    segment_ids = mb.attention_mask.astype(np.int32)  # right-padded: real tokens are segment 1, the tail 0
    positions = (np.cumsum(segment_ids, axis=1) - 1).clip(min=0).astype(np.int32) * segment_ids
    labels = mb.labels.copy()
    labels[:, 0] = IGNORE_INDEX  # never a target in either layout
    return dataclasses.replace(
        mb, labels=labels, segment_ids=segment_ids, positions=positions,
        segment_lengths=segment_table(segment_ids, max_examples),
    )


def segment_table(segment_ids: np.ndarray, max_examples: int) -> np.ndarray:
    """[rows, max_examples + 1]: each row's segment lengths (ids 1..k), its padding tail, then zeros.

    Padding (id 0) only ever ends a row, so counting ids recovers the layout.
    """
    table = np.zeros((segment_ids.shape[0], max_examples + 1), np.int32)
    for r, row in enumerate(segment_ids):
        counts = np.bincount(row, minlength=1)
        k = len(counts) - 1
        table[r, :k] = counts[1:]
        if counts[0]:
            table[r, k] = counts[0]
    return table


def plan_microbatches(
    examples: Sequence[Example],
    *,
    rows: int,
    buckets: tuple[int, ...],
    rng: np.random.Generator,
    shuffle: bool = True,
    pack: bool = False,
    row_multiple: int = 1,
    longer_rows: bool = False,
) -> list[MicroBatch]:
    """Shuffle once, cut into groups of ``rows``, pad each group to its smallest fitting bucket.

    A short last group is filled with all-padding rows (mask 0, labels -100)
    so every micro-batch has the compiled shape but the filler carries no weight.
    With ``pack`` each group (the same examples as unpacked, so updates, shuffling and
    losses do not change) is laid end to end into as few rows as fit, a multiple of
    ``row_multiple`` (which must divide ``rows``), of its bucket's length or, with
    ``longer_rows``, of a longer bucket where that pads less (see :func:`_pack_segments`).
    """
    buckets = _checked_buckets(buckets)
    if pack and (not isinstance(row_multiple, (int, np.integer)) or row_multiple < 1 or rows % row_multiple):
        raise ValueError(f"row_multiple={row_multiple!r} must be a positive integer dividing rows={rows}.")
    batches = []
    for group in _shuffled_groups(examples, rows, rng, shuffle):
        if pack:
            batches.append(_pack_segments(group, rows, buckets, row_multiple, longer_rows))
        else:
            batches.append(_pack(group, rows, _bucket_for(max(ex.input_ids.shape[0] for ex in group), buckets)))
    return batches


def _checked_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    buckets = tuple(int(b) for b in buckets)
    if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
        raise ValueError(f"buckets={buckets!r} must be strictly ascending positive integers, e.g. (64, 128, 256).")
    return buckets


def _shuffled_groups(examples: Sequence[Any], rows: int, rng: np.random.Generator, shuffle: bool) -> list[list[Any]]:
    """One shuffle (one RNG draw) of the call's examples, cut into consecutive groups of ``rows``."""
    if not isinstance(rows, (int, np.integer)) or rows < 1:
        raise ValueError(f"rows={rows!r} must be a positive integer (the per-device batch size times devices).")
    if not examples:
        raise ValueError("examples is empty; there is nothing to train on.")
    order = rng.permutation(len(examples)) if shuffle else np.arange(len(examples))
    ordered = [examples[int(i)] for i in order]
    return [ordered[start : start + rows] for start in range(0, len(ordered), rows)]


def group_into_updates(microbatches: Sequence[MicroBatch], gradient_accumulation_steps: int) -> list[list[MicroBatch]]:
    """Consecutive groups of ``gradient_accumulation_steps`` micro-batches, one per optimizer update.

    A leftover group with fewer micro-batches still forms an update: its loss is
    normalised by its own token count, so the short update is not down-weighted
    and no example of the step is dropped.
    """
    ga = gradient_accumulation_steps
    if not isinstance(ga, (int, np.integer)) or ga < 1:
        raise ValueError(f"gradient_accumulation_steps={ga!r} must be a positive integer.")
    return [list(microbatches[i : i + ga]) for i in range(0, len(microbatches), ga)]


# ---------------------------------------------------------------------------
# encoder-decoder (T5, BART): inputs feed the encoder, labels the decoder


@dataclasses.dataclass(frozen=True)
class Seq2SeqExample:
    """One encoder-decoder example: encoder ``input_ids`` and decoder targets ``labels`` (-100 = ignored)."""

    input_ids: np.ndarray  # int32 [n]
    labels: np.ndarray  # int32 [m]
    weight: Optional[float] = None  # as Example.weight
    truncated: bool = False  # encoder input or target cut to max_length
    lost_all_labels: bool = False


@dataclasses.dataclass(frozen=True)
class Seq2SeqMicroBatch:
    """Encoder and decoder slabs, each padded to its own length bucket.

    ``decoder_input_ids`` are the labels shifted right with the decoder start token
    (:func:`shift_right`); the loss scores every position against ``labels``
    unshifted, so ``num_label_tokens`` counts every label that is not -100.
    """

    input_ids: np.ndarray  # int32 [rows, enc_len]
    attention_mask: np.ndarray  # int32 [rows, enc_len]
    decoder_input_ids: np.ndarray  # int32 [rows, dec_len]
    labels: np.ndarray  # int32 [rows, dec_len], -100 at padding and filler rows
    num_examples: int
    num_label_tokens: int
    label_weights: Optional[np.ndarray] = None  # as MicroBatch.label_weights, over the decoder positions

    packed = False  # encoder-decoder micro-batches are never packed


def shift_right(labels: np.ndarray, decoder_start_token_id: int, pad_token_id: int) -> np.ndarray:
    """Decoder inputs from labels as transformers' ``shift_tokens_right``: start token first, -100 -> pad."""
    labels = np.asarray(labels)
    shifted = np.empty_like(labels)
    shifted[..., 1:] = labels[..., :-1]
    shifted[..., 0] = decoder_start_token_id
    return np.where(shifted == IGNORE_INDEX, pad_token_id, shifted).astype(labels.dtype)


def _seq2seq_example(ids: np.ndarray, lab: np.ndarray, max_length: Optional[int], mode: str) -> Seq2SeqExample:
    sizes = (ids.shape[0], lab.shape[0])
    ids, _ = _truncate(ids, ids, max_length, mode)
    lab, _ = _truncate(lab, lab, max_length, mode)
    return Seq2SeqExample(
        input_ids=ids.astype(np.int32), labels=lab.astype(np.int32), truncated=(ids.shape[0], lab.shape[0]) != sizes,
    )


def _strip_label_padding(lab: np.ndarray) -> np.ndarray:
    """Drop trailing -100s (right padding); they sit after every real target, so the loss is unchanged."""
    real = np.nonzero(lab != IGNORE_INDEX)[0]
    return lab[: int(real[-1]) + 1] if real.size else lab[:1]


def seq2seq_examples_from_tokens(
    input_ids: Any, attention_mask: Any, labels: Any, *, max_length: Optional[int], truncation_mode: str
) -> list[Seq2SeqExample]:
    """Token data for an encoder-decoder: ``input_ids``/``attention_mask`` for the encoder, ``labels`` for the decoder.

    Encoder positions where the mask is 0 are dropped; labels are their own sequences
    (any length), right padding with -100 is dropped. Both are truncated to ``max_length``.
    """
    _check_truncation(max_length, truncation_mode)
    id_rows = token_rows("input_ids", input_ids)
    mask_rows = None if attention_mask is None else token_rows("attention_mask", attention_mask)
    label_rows = token_rows("labels", labels)
    if mask_rows is not None:
        check_aligned("attention_mask", mask_rows, id_rows)
    if len(label_rows) != len(id_rows):
        raise ValueError(
            f"labels has {len(label_rows)} examples but input_ids has {len(id_rows)}; pass one labels row per example."
        )
    examples = []
    for i, ids in enumerate(id_rows):
        if mask_rows is not None:
            ids = ids[mask_rows[i] == 1]
        if ids.shape[0] == 0:
            raise ValueError(f"input_ids[{i}] is empty (after dropping masked positions); remove that example.")
        examples.append(_seq2seq_example(ids, _strip_label_padding(label_rows[i]), max_length, truncation_mode))
    return examples


def seq2seq_examples_from_texts(
    tokenizer: Any, texts: Sequence[str], texts_labels: Sequence[str], *, max_length: Optional[int], truncation_mode: str
) -> list[Seq2SeqExample]:
    """``texts`` are the encoder inputs and ``texts_labels`` the targets, each tokenized with the tokenizer's
    default special tokens (T5 ends both with ``</s>``, as ``tokenizer(text, text_target=...)`` does)."""
    if tokenizer is None:
        raise ValueError("texts were given but no tokenizer; pass processing_class=<a tokenizer> to the trainer.")
    _check_truncation(max_length, truncation_mode)
    texts = check_texts("texts", texts)
    texts_labels = check_texts("texts_labels", texts_labels)
    check_text_pairs(texts, texts_labels)
    sources = tokenizer(texts)["input_ids"]
    targets = tokenizer(texts_labels)["input_ids"]
    examples = []
    for i, (src, tgt) in enumerate(zip(sources, targets)):
        src, tgt = np.asarray(src, np.int64), np.asarray(tgt, np.int64)
        if src.shape[0] == 0:
            raise ValueError(f"texts[{i}] tokenizes to no tokens; remove it or give it some text.")
        if tgt.shape[0] == 0:
            raise ValueError(f"texts_labels[{i}] tokenizes to no tokens; give every example a target.")
        if min(int(src.min()), int(tgt.min())) < 0:
            raise ValueError(f"texts[{i}] or texts_labels[{i}] tokenized to a negative id; check the tokenizer.")
        examples.append(_seq2seq_example(src, tgt, max_length, truncation_mode))
    return examples


def _pack_seq2seq(group, rows: int, enc_len: int, dec_len: int, start: int, pad: int) -> Seq2SeqMicroBatch:
    input_ids = np.full((rows, enc_len), pad, np.int32)
    attention_mask = np.zeros((rows, enc_len), np.int32)
    labels = np.full((rows, dec_len), IGNORE_INDEX, np.int32)
    label_weights = _weights_slab(group, (rows, dec_len))
    for r, ex in enumerate(group):
        n, m = ex.input_ids.shape[0], ex.labels.shape[0]
        input_ids[r, :n] = ex.input_ids
        attention_mask[r, :n] = 1
        labels[r, :m] = ex.labels
        if label_weights is not None:
            label_weights[r, :m] = ex.weight
    return Seq2SeqMicroBatch(
        input_ids, attention_mask, shift_right(labels, start, pad), labels, num_examples=len(group),
        num_label_tokens=int(np.count_nonzero(labels != IGNORE_INDEX)), label_weights=label_weights,
    )


def plan_seq2seq_microbatches(
    examples: Sequence[Seq2SeqExample],
    *,
    rows: int,
    buckets: tuple[int, ...],
    rng: np.random.Generator,
    decoder_start_token_id: int,
    pad_token_id: int,
    shuffle: bool = True,
) -> list[Seq2SeqMicroBatch]:
    """As :func:`plan_microbatches`, with encoder and decoder lengths bucketed independently."""
    buckets = tuple(int(b) for b in buckets)
    batches = []
    for group in _shuffled_groups(examples, rows, rng, shuffle):
        enc_len = _bucket_for(max(ex.input_ids.shape[0] for ex in group), buckets)
        dec_len = _bucket_for(max(ex.labels.shape[0] for ex in group), buckets)
        batches.append(_pack_seq2seq(group, rows, enc_len, dec_len, decoder_start_token_id, pad_token_id))
    return batches


def concat_padded(parts: Sequence[Any]) -> Any:
    """Concatenate per-batch arrays along axis 0, padding axis 1 with -100 (HF's ``nested_concat``).

    Tuples or lists of arrays (a model's several outputs) are concatenated element-wise.
    """
    if isinstance(parts[0], (tuple, list)):
        return type(parts[0])(concat_padded(list(group)) for group in zip(*parts))
    parts = [np.asarray(p) for p in parts]
    if parts[0].ndim < 2:
        return np.concatenate(parts, axis=0)
    width = max(p.shape[1] for p in parts)
    padded = []
    for p in parts:
        if p.shape[1] < width:
            pad = [(0, 0)] * p.ndim
            pad[1] = (0, width - p.shape[1])
            p = np.pad(p, pad, constant_values=IGNORE_INDEX)
        padded.append(p)
    return np.concatenate(padded, axis=0)
