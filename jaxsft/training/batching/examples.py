"""Examples from token arrays or texts: unpadded, truncated to ``max_length``, labels aligned.

Padding is identified by ``attention_mask``, never by token id: a real EOS that happens to share the pad id
stays in the example and is learned.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from jaxsft.infra import chat
from jaxsft.infra.config import IGNORE_INDEX, TRUNCATION_MODES
from jaxsft.training.batching.inputs import check_aligned, check_text_pairs, check_texts, token_rows


@dataclasses.dataclass(frozen=True)
class Example:
    """One training sequence; ``labels`` is aligned with ``input_ids`` (the shift happens in the loss)."""

    input_ids: np.ndarray  # int32 [n]
    labels: np.ndarray  # int32 [n], -100 = not learned
    # step(example_weights=...): how many times each label token counts (None: a call without weights).
    weight: Optional[float] = None
    truncated: bool = False  # cut to max_length
    lost_all_labels: bool = False  # had label tokens, none left after the cut (keep_start cutting a completion)



def truncate(
    ids: np.ndarray, labels: np.ndarray, max_length: Optional[int], mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """Cut along the sequence axis (TRL's documented intent; 0.23.1 cut the batch axis)."""
    if max_length is None or ids.shape[0] <= max_length:
        return ids, labels
    if mode == "keep_end":
        return ids[-max_length:], labels[-max_length:]
    return ids[:max_length], labels[:max_length]


def check_truncation(max_length: Optional[int], truncation_mode: str) -> None:
    if max_length is not None and (not isinstance(max_length, (int, np.integer)) or max_length < 1):
        raise ValueError(f"max_length={max_length!r} must be None or a positive integer; pass e.g. max_length=512.")
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be either 'keep_end' or 'keep_start', got {truncation_mode}")


def make_example(ids: np.ndarray, labels: np.ndarray, max_length: Optional[int], mode: str) -> Example:
    full = ids.shape[0]
    had_labels = bool(np.any(labels[1:] != IGNORE_INDEX))
    ids, labels = truncate(ids, labels, max_length, mode)
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
    check_truncation(max_length, truncation_mode)
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
        examples.append(make_example(ids, lab, max_length, truncation_mode))
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
    check_truncation(max_length, truncation_mode)
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
        examples.append(make_example(ids, lab, max_length, truncation_mode))
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

