"""Multi-host glue on JAX's own distributed runtime (knows nothing of training: plain values only).

Each process passes its own examples to ``step()`` (as TRL's ranks do). Before any
collective of a call, :func:`agree` shares every process's validation verdict and
configuration fingerprint through the runtime's key-value store (bounded waits, no
device collective), so a bad input on one process raises the same clear error on all
of them and a dead peer raises ``TimeoutError`` instead of hanging. :func:`allgather`
and :func:`global_sum` combine host values over processes; the training side builds its
micro-batch agreement on them (:mod:`jaxsft.training.agreement`).
"""

from __future__ import annotations

import atexit
import builtins
import ctypes
import itertools
import json
import os
from typing import Optional, Sequence

import jax
import numpy as np


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


def allgather(values: np.ndarray) -> np.ndarray:
    """Stack ``values`` from every process: [num_processes, *values.shape] (a collective: call on every process)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values, tiled=False))


def global_sum(value: int) -> int:
    if jax.process_count() == 1:
        return int(value)
    return int(allgather(np.asarray([value], np.int64)).sum())
