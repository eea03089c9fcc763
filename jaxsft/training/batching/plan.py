"""Examples → shuffled, bucketed (or packed), right-padded micro-batches of fixed shapes, grouped into updates.

Fixed shapes are what keep the compiled programs few: lengths round up to a bucket, rows to the micro-batch
size, and packed rows take their segment tables in one fixed width.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from jaxsft.infra.config import IGNORE_INDEX
from jaxsft.training.batching.examples import Example


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


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
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
    label_weights = weights_slab(group, (rows, length))
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


def weights_slab(group: Sequence[Any], shape: tuple[int, int]) -> Optional[np.ndarray]:
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
    row_lengths: tuple[int, ...],
) -> MicroBatch:
    """Lay a group's examples end to end in rows (first-fit, longest first), in the cheapest layout.

    Candidate row lengths are the smallest of ``row_lengths`` that holds the longest example and, with
    ``longer_rows`` (for attention whose cost follows the segments, not the row: cuDNN's ragged kernel),
    the ones above it;
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
    plain_length = bucket_for(max(lengths), buckets)
    plain_tokens = max_rows * plain_length
    shortest = bucket_for(max(lengths), row_lengths)
    layouts: list[tuple[int, int, list[list[int]]]] = []  # (rows, length, bins), one per candidate length
    for length in (b for b in row_lengths if b >= shortest and (longer_rows or b == shortest)):
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
    label_weights = weights_slab(group, (rows, length))
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
    row_lengths: Optional[tuple[int, ...]] = None,
) -> list[MicroBatch]:
    """Shuffle once, cut into groups of ``rows``, pad each group to its smallest fitting bucket.

    A short last group is filled with all-padding rows (mask 0, labels -100)
    so every micro-batch has the compiled shape but the filler carries no weight.
    With ``pack`` each group (the same examples as unpacked, so updates, shuffling and
    losses do not change) is laid end to end into as few rows as fit, a multiple of
    ``row_multiple`` (which must divide ``rows``), of the shortest of ``row_lengths`` (default: ``buckets``; the
    trainer passes a subset, which keeps the shapes of layouts that vary their row count few) that holds its
    longest example or, with ``longer_rows``, of a longer one where that pads less (see :func:`_pack_segments`);
    where packing pads no less than the plain layout at the group's bucket, the plain layout is kept.
    """
    buckets = _checked_buckets(buckets)
    row_lengths = _checked_buckets(row_lengths) if row_lengths else buckets
    if pack and (not isinstance(row_multiple, (int, np.integer)) or row_multiple < 1 or rows % row_multiple):
        raise ValueError(f"row_multiple={row_multiple!r} must be a positive integer dividing rows={rows}.")
    batches = []
    for group in shuffled_groups(examples, rows, rng, shuffle):
        if pack:
            batches.append(_pack_segments(group, rows, buckets, row_multiple, longer_rows, row_lengths))
        else:
            batches.append(_pack(group, rows, bucket_for(max(ex.input_ids.shape[0] for ex in group), buckets)))
    return batches


def _checked_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    buckets = tuple(int(b) for b in buckets)
    if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
        raise ValueError(f"buckets={buckets!r} must be strictly ascending positive integers, e.g. (64, 128, 256).")
    return buckets


def shuffled_groups(examples: Sequence[Any], rows: int, rng: np.random.Generator, shuffle: bool) -> list[list[Any]]:
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
