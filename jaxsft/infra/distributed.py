"""Multi-host glue on JAX's own distributed runtime.

Each process passes its own examples to ``step()`` (as TRL's ranks do). Before any
collective of a call, :func:`agree` shares every process's validation verdict and
configuration fingerprint through the runtime's key-value store (bounded waits, no
device collective), so a bad input on one process raises the same clear error on all
of them and a dead peer raises ``TimeoutError`` instead of hanging. Then processes
agree on the number of micro-batches and on each micro-batch's bucket, so every
process runs the same sequence of programs; a process with fewer examples
contributes zero-weight rows.
"""

from __future__ import annotations

import atexit
import builtins
import ctypes
import dataclasses
import itertools
import json
import os
from typing import Optional, Sequence

import jax
import numpy as np

from jaxsft.training import batching


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    local_device_ids: Optional[Sequence[int]] = None,
) -> None:
    """Start JAX's multi-controller runtime (call once per process, before any other jax use).

    Arguments default to ``JAXSFT_COORDINATOR``/``JAXSFT_NUM_PROCESSES``/``JAXSFT_PROCESS_ID``,
    then to whatever ``jax.distributed.initialize`` detects itself (SLURM, TPU pods,
    Open MPI, and its ``JAX_COORDINATOR_ADDRESS``-style variables).
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAXSFT_COORDINATOR")
    if num_processes is None and "JAXSFT_NUM_PROCESSES" in env:
        num_processes = int(env["JAXSFT_NUM_PROCESSES"])
    if process_id is None and "JAXSFT_PROCESS_ID" in env:
        process_id = int(env["JAXSFT_PROCESS_ID"])
    if (num_processes is None) != (process_id is None):
        raise ValueError("initialize(): pass both num_processes and process_id, or neither (auto-detect).")
    # CPU devices need a cross-process collectives backend, or every program that spans
    # processes fails. jax >= 0.5 defaults to gloo; older versions default to none.
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )


_ROUNDS = itertools.count(1)  # every process makes the same sequence of agree() calls


class PeerError(Exception):
    """Mixed into the error raised on processes whose own inputs were fine but a peer's were not."""


def _client():
    """The distributed runtime's client (its key-value store); jax exposes no public accessor yet."""
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("jaxsft.infra.distributed: the JAX distributed runtime is not initialized.")
    return client


def agree(what: str, error: Optional[BaseException], fingerprint: dict, timeout_s: float) -> None:
    """Raise on every process if any process failed its checks or has another fingerprint; else return.

    ``error`` is this process's validation failure (or None); ``fingerprint`` the settings that
    must match everywhere (batch size, accumulation, buckets, mesh, step count). Waits at most
    ``timeout_s`` for each peer; a peer that never arrives (dead, or in another call) gives
    ``TimeoutError``. Single process: raises ``error`` if there is one.
    """
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    client, me, count = _client(), jax.process_index(), jax.process_count()
    round_id = next(_ROUNDS)
    mine = {
        "what": what,
        "fingerprint": fingerprint,
        "error": None if error is None else [type(error).__name__, str(error)],
    }
    client.key_value_set(f"jaxsft/agree/{round_id}/{me}", json.dumps(mine, default=repr))
    verdicts = {}
    for peer in range(count):
        if peer == me:
            verdicts[peer] = mine
            continue
        try:
            text = client.blocking_key_value_get(f"jaxsft/agree/{round_id}/{peer}", int(timeout_s * 1000))
        except Exception as err:  # the runtime raises its own error type on a deadline
            _exit_cleanly_without(peer)
            raise TimeoutError(
                f"{what}: process {peer} did not reach this call (agreement #{round_id}) within {timeout_s:g} s "
                f"(TrainConfig.agreement_timeout_s); it may have died, or the processes are running different "
                f"sequences of step()/evaluate() calls. Nothing was changed on this process. ({type(err).__name__})"
            ) from None
        verdicts[peer] = json.loads(text)
    if round_id > 1:  # every peer has read our previous key by now (it published this round after doing so)
        try:
            client.key_value_delete(f"jaxsft/agree/{round_id - 1}/{me}")
        except Exception:  # best effort: a leftover key costs a few bytes
            pass
    if error is not None:
        raise error
    failed = [(peer, v["error"]) for peer, v in sorted(verdicts.items()) if v["error"] is not None]
    if failed:
        peer, (kind, message) = failed[0]
        base = getattr(builtins, kind, None)
        base = base if isinstance(base, type) and issubclass(base, Exception) else ValueError
        raise type(base.__name__, (base, PeerError), {})(
            f"{what} refused on process {peer} (so on every process; nothing changed anywhere): {message}"
        )
    for peer, verdict in sorted(verdicts.items()):
        if verdict["what"] != what:
            raise RuntimeError(
                f"{what}: process {peer} is in {verdict['what']} at the same point; every process must make the "
                "same sequence of trainer calls."
            )
        differing = sorted(k for k in set(fingerprint) | set(verdict["fingerprint"])
                           if json.dumps(fingerprint.get(k), default=repr) != json.dumps(verdict["fingerprint"].get(k), default=repr))
        if differing:
            key = differing[0]
            raise ValueError(
                f"{what}: process {peer} has {key}={verdict['fingerprint'].get(key)!r} but process {me} has "
                f"{key}={fingerprint.get(key)!r}; every process must build its trainer with the same settings "
                f"(differing: {', '.join(differing)}). Nothing was changed."
            )


_LOST_PEERS: set[int] = set()
_DETACHED: list = []  # the runtime's objects, kept alive (never destroyed) once a peer is lost


def _exit_cleanly_without(peer: int) -> None:
    """Once a peer is lost, make this process's normal interpreter exit skip the runtime's shutdown barrier.

    jax shuts the distributed runtime down at exit with a barrier over every process; with a peer dead
    the barrier fails and the runtime aborts the survivor (SIGABRT, exit code 134) although its own work
    ended well. Registered after jax's exit hook, this one runs first: it takes the runtime's objects out
    of jax's hands (held here, so no destructor runs their shutdown either), and the process exits
    with its own status.
    """
    if not _LOST_PEERS:
        atexit.register(_detach_runtime)
    _LOST_PEERS.add(peer)


def _detach_runtime() -> None:
    from jax._src import distributed as jax_distributed

    state = jax_distributed.global_state
    for name in ("preemption_sync_manager", "client", "service"):
        runtime_object = getattr(state, name, None)
        if runtime_object is not None:
            _DETACHED.append(runtime_object)
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(runtime_object))  # outlives interpreter teardown too
            setattr(state, name, None)


def is_main_process() -> bool:
    return jax.process_index() == 0


def _allgather(values: np.ndarray) -> np.ndarray:
    """Stack ``values`` from every process: [num_processes, *values.shape]."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values, tiled=False))


def global_sum(value: int) -> int:
    if jax.process_count() == 1:
        return int(value)
    return int(_allgather(np.asarray([value], np.int64)).sum())


def agree_on_microbatches(microbatches: list, rows: int, packed: bool = False, weighted: bool = False) -> list:
    """Make every process hold the same number of micro-batches with the same shapes.

    Lengths are agreed per micro-batch (the longest bucket wins); packed micro-batches also
    agree on their row count (the most rows win, the others get filler rows). ``weighted``: the
    call carries example weights, so filler micro-batches carry (zero) ``label_weights`` too.
    """
    if jax.process_count() == 1:
        return microbatches
    counts = _allgather(np.asarray([len(microbatches)], np.int64)).reshape(-1)
    target_count = int(counts.max())
    if target_count == 0:  # no process had examples this call
        return []
    if packed:  # a micro-batch that packing could not shrink keeps the plain layout; give it the packed one
        microbatches = [batching.as_packed(mb, rows) for mb in microbatches]
    shapes = np.zeros((target_count, 2), np.int64)
    if microbatches:  # a process with no examples this call contributes zeros (numpy cannot assign [] to [0, 2])
        shapes[: len(microbatches)] = [mb.input_ids.shape[::-1] for mb in microbatches]
    target = _allgather(shapes).max(axis=0)
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
        labels=np.pad(mb.labels, pad, constant_values=-100),
        **packed_fields,
    )


def empty_microbatch(rows: int, length: int, packed: bool = False, max_examples: int = 0, weighted: bool = False):
    """A micro-batch of filler rows only: it runs the same program and contributes nothing."""
    zeros = np.zeros((rows, length), np.int32)
    return batching.MicroBatch(
        input_ids=zeros,
        attention_mask=zeros,
        labels=np.full((rows, length), -100, np.int32),
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
    return [int(x) for x in _allgather(local).sum(axis=0)]
