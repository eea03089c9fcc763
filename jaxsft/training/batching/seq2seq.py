"""Encoder-decoder (T5, BART) examples and micro-batches: inputs feed the encoder, labels the decoder."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from jaxsft.infra.config import IGNORE_INDEX
from jaxsft.training.batching.examples import check_truncation, truncate
from jaxsft.training.batching.inputs import check_aligned, check_text_pairs, check_texts, token_rows
from jaxsft.training.batching.plan import bucket_for, shuffled_groups, weights_slab


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
    ids, _ = truncate(ids, ids, max_length, mode)
    lab, _ = truncate(lab, lab, max_length, mode)
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
    check_truncation(max_length, truncation_mode)
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
    check_truncation(max_length, truncation_mode)
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
    label_weights = weights_slab(group, (rows, dec_len))
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
    for group in shuffled_groups(examples, rows, rng, shuffle):
        enc_len = bucket_for(max(ex.input_ids.shape[0] for ex in group), buckets)
        dec_len = bucket_for(max(ex.labels.shape[0] for ex in group), buckets)
        batches.append(_pack_seq2seq(group, rows, enc_len, dec_len, decoder_start_token_id, pad_token_id))
    return batches

