"""Multi-process agreement on a call's micro-batches, so every process runs the same sequence of programs.

Processes agree on the number of micro-batches and on each one's bucket (and, packed, its row count);
a process with fewer examples contributes filler rows of zero weight. Built on
:func:`jaxsft.infra.distributed.allgather` (the infrastructure knows nothing of micro-batches).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from jaxsft.infra import distributed
from jaxsft.infra.config import IGNORE_INDEX
from jaxsft.training import batching


def agree_on_microbatches(microbatches: list, rows: int, packed: bool = False, weighted: bool = False) -> list:
    """Make every process hold the same number of micro-batches with the same shapes.

    Lengths are agreed per micro-batch (the longest bucket wins); packed micro-batches also
    agree on their row count (the most rows win, the others get filler rows). ``weighted``: the
    call carries example weights, so filler micro-batches carry (zero) ``label_weights`` too.
    """
    if jax.process_count() == 1:
        return microbatches
    counts = distributed.allgather(np.asarray([len(microbatches)], np.int64)).reshape(-1)
    target_count = int(counts.max())
    if target_count == 0:  # no process had examples this call
        return []
    if packed:  # a micro-batch that packing could not shrink keeps the plain layout; give it the packed one
        microbatches = [batching.as_packed(mb, rows) for mb in microbatches]
    shapes = np.zeros((target_count, 2), np.int64)
    if microbatches:  # a process with no examples this call contributes zeros (numpy cannot assign [] to [0, 2])
        shapes[: len(microbatches)] = [mb.input_ids.shape[::-1] for mb in microbatches]
    target = distributed.allgather(shapes).max(axis=0)
    agreed = []
    for i, (length, mb_rows) in enumerate(target):
        mb_rows = int(mb_rows) if packed else rows
        if i < len(microbatches):
            agreed.append(repad(microbatches[i], int(length), mb_rows))
        else:
            agreed.append(empty_microbatch(mb_rows, int(length), packed, max_examples=rows, weighted=weighted))
    return agreed


def repad(mb, length: int, rows: Optional[int] = None):
    """Right-pad a micro-batch to a longer bucket and more rows (zero weight on what is added)."""
    extra = length - mb.input_ids.shape[1]
    extra_rows = 0 if rows is None else rows - mb.input_ids.shape[0]
    if extra == 0 and extra_rows == 0:
        return mb
    pad = ((0, extra_rows), (0, extra))
    packed_fields = {}
    if mb.packed:
        segment_ids = np.pad(mb.segment_ids, pad)
        packed_fields = {
            "segment_ids": segment_ids,
            "positions": np.pad(mb.positions, pad),
            "segment_lengths": batching.segment_table(segment_ids, mb.segment_lengths.shape[1] - 1),
        }
    if mb.label_weights is not None:
        packed_fields["label_weights"] = np.pad(mb.label_weights, pad)
    return dataclasses.replace(
        mb,
        input_ids=np.pad(mb.input_ids, pad),
        attention_mask=np.pad(mb.attention_mask, pad),
        labels=np.pad(mb.labels, pad, constant_values=IGNORE_INDEX),
        **packed_fields,
    )


def empty_microbatch(rows: int, length: int, packed: bool = False, max_examples: int = 0, weighted: bool = False):
    """A micro-batch of filler rows only: it runs the same program and contributes nothing."""
    zeros = np.zeros((rows, length), np.int32)
    return batching.MicroBatch(
        input_ids=zeros,
        attention_mask=zeros,
        labels=np.full((rows, length), IGNORE_INDEX, np.int32),
        num_examples=0,
        num_label_tokens=0,
        segment_ids=zeros if packed else None,
        positions=zeros if packed else None,
        segment_lengths=batching.segment_table(zeros, max_examples) if packed else None,
        label_weights=np.zeros((rows, length), np.float32) if weighted else None,
    )


def global_label_counts(updates: list[list]) -> list[int]:
    """Label tokens per update summed over processes (an update with none is skipped everywhere)."""
    local = np.asarray([sum(mb.num_label_tokens for mb in update) for update in updates], np.int64)
    if jax.process_count() == 1:
        return [int(x) for x in local]
    return [int(x) for x in distributed.allgather(local).sum(axis=0)]
