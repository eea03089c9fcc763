"""Atomic checkpoints of the whole trainer state, on orbax's ``CheckpointManager``.

A checkpoint is a folder ``checkpoint-<global_step>`` holding two orbax items: ``arrays``
(parameters and optimizer state, written shard by shard from every process, so nothing is
gathered onto one host) and ``trainer_state`` (JSON: step counters, the dropout key, log history, the shuffling
RNG, the model's architecture and one checksum per array). orbax writes it under a temporary
name and renames it into place once every part is on disk (its atomic commit), so a crash
mid-save leaves the previous checkpoint as the newest complete one; the temporary folders of
failed saves are removed at the next save. ``keep_last`` (``save_total_limit``) keeps the newest
k. Non-finite weights or optimizer moments are refused before anything is written.

Re-saving a step that is already on disk writes the new checkpoint beside it first and then
swaps the two, so at every instant one complete checkpoint of that step can be found
(:func:`latest_checkpoint` also recognises the ``.previous`` name the old one holds for a moment).

Restore reads and checks everything (JSON fields, architecture, shapes, dtypes, checksums,
finiteness) before it calls the trainer's ``load_state_dict``: all or nothing.

This module knows the trainer only through the :class:`Checkpointable` protocol
(``state_dict`` / ``load_state_dict`` and a few public attributes), so it imports no trainer.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
from typing import Any, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.infra import distributed, fingerprint

FORMAT = "jaxsft-trainer-checkpoint/4"  # /4: the trainer fields hold the device state's dropout key
# Still restored: /3 (no dropout key: the trainer derives one and says so when it uses dropout) and /2 (nor a
# host checksum to verify).
_OLDER_FORMATS = ("jaxsft-trainer-checkpoint/3", "jaxsft-trainer-checkpoint/2")
_UNCHECKSUMMED_FORMATS = ("jaxsft-trainer-checkpoint/2",)
HOST_CHECKSUM = "host_checksum"
ARRAYS_ITEM = "arrays"
STATE_ITEM = "trainer_state"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_PREVIOUS = re.compile(r"^checkpoint-(\d+)\.previous$")
_RESAVE_PREFIX = ".jaxsft-resave-"
_TMP_MARK = ".orbax-checkpoint-tmp"
HOST_FIELDS = ("global_step", "dropout_key", "rng", "counters", "log_history")
LEGACY_HOST_FIELDS = ("global_step", "rng", "counters", "log_history")  # formats /2 and /3
SAVE = "save_checkpoint()"
RESTORE = "restore_checkpoint()"


class Checkpointable(Protocol):
    """What a checkpoint needs from a trainer (``jaxsft.IterativeSFTTrainer`` is one)."""

    spec: Any
    config: Any
    mesh: jax.sharding.Mesh

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], *, copy: bool = True) -> None: ...


def checkpoint_path(directory: str, global_step: int) -> str:
    return os.path.join(directory, f"checkpoint-{global_step}")


def _state_file(path: str) -> str:
    return os.path.join(path, STATE_ITEM, "metadata")


def _is_complete(path: str) -> bool:
    return os.path.isfile(_state_file(path)) and os.path.isdir(os.path.join(path, ARRAYS_ITEM))


def list_checkpoints(directory: str) -> dict[int, str]:
    """Complete checkpoints in ``directory`` by step (temporary and staging folders never count)."""
    if not os.path.isdir(directory):
        return {}
    found: dict[int, str] = {}
    names = os.listdir(directory)
    for pattern in (_PREVIOUS, _NAME):  # a finished checkpoint-N wins over its .previous twin
        for name in names:
            m = pattern.match(name)
            path = os.path.join(directory, name)
            if m and _is_complete(path):
                found[int(m.group(1))] = path
    return found


def latest_checkpoint(directory: str) -> Optional[str]:
    """The complete checkpoint with the highest step in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[max(found)] if found else None


# ---------------------------------------------------------------------------------------------- save
def save(trainer: Checkpointable, directory: str, *, keep_last: Optional[int] = None) -> str:
    """Write ``trainer``'s whole state to ``directory/checkpoint-<global_step>`` atomically; returns that path.

    Every process must call this (each writes its own shards; orbax coordinates the commit).
    ``keep_last=k`` deletes all but the newest k checkpoints after a successful save.
    An error from the file system (disk full included) is raised as ``OSError``.
    """
    state = trainer.state_dict()
    step = int(state["global_step"])
    error: Optional[BaseException] = None
    try:  # local checks only: every process learns every verdict before the first collective
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(
                f"save_checkpoint: directory={directory!r} must be a folder path (str or os.PathLike); pass e.g. "
                "trainer.save_checkpoint('checkpoints')."
            )
        if keep_last is not None and (not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1):
            raise ValueError(f"save_checkpoint: keep_last={keep_last!r} must be None or an integer >= 1.")
        directory = os.path.abspath(os.fspath(directory))
    except Exception as err:  # any type: shared, so all processes raise together
        error = err
    timeout = _timeout(trainer)
    distributed.agree(SAVE, error, {"directory": str(directory), "global_step": step, "keep_last": keep_last}, timeout)
    arrays = {"params": state["params"], "opt_state": state["opt_state"]}
    named = _named_leaves(arrays)
    _refuse_non_finite(named)  # a collective, identical verdict everywhere
    host = _host_json(trainer, state, named)
    final = checkpoint_path(directory, step)
    error = None
    if jax.process_index() == 0:
        try:
            os.makedirs(directory, exist_ok=True)
            _clean_debris(directory)
        except OSError as err:
            error = OSError(err.errno, f"save_checkpoint: cannot write {directory}: {err}")
    distributed.agree(SAVE + " (folder ready)", error, {}, timeout)
    try:
        if os.path.isdir(final) or os.path.isdir(final + ".previous"):
            staging_root = os.path.join(directory, f"{_RESAVE_PREFIX}{step}")
            _orbax_save(staging_root, step, arrays, host, None)
            if jax.process_index() == 0:
                _swap_in(checkpoint_path(staging_root, step), final)
            distributed.agree(SAVE + " (swapped in)", None, {}, timeout)
        else:
            _orbax_save(directory, step, arrays, host, keep_last)
    except Exception as err:
        # orbax / tensorstore wrap file-system failures in other types, or (depending on which of their
        # threads meets the failure first) let the plain OSError through: both get the same message.
        text, code = str(err), getattr(err, "errno", None)
        if code == errno.ENOSPC or "No space left" in text or "ENOSPC" in text:
            raise OSError(errno.ENOSPC, f"save_checkpoint: the disk is full while writing {final}: {text[:300]}") from err
        if code in (errno.EACCES, errno.EROFS) or "Permission denied" in text or "Read-only file system" in text:
            raise OSError(errno.EACCES, f"save_checkpoint: cannot write {final}: {text[:300]}") from err
        raise
    if keep_last is not None and jax.process_index() == 0:
        for old_step, path in sorted(list_checkpoints(directory).items())[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    distributed.agree(SAVE + " (done)", None, {}, timeout)
    return final


def _orbax_save(root: str, step: int, arrays: Any, host: dict, keep_last: Optional[int]) -> None:
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep_last,
        step_name_format=_step_names(),
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
        save_root_metadata=False,
        create=True,
    )
    with ocp.CheckpointManager(root, options=options, item_names=(ARRAYS_ITEM, STATE_ITEM)) as manager:
        manager.save(
            step,
            args=ocp.args.Composite(**{ARRAYS_ITEM: ocp.args.StandardSave(arrays), STATE_ITEM: ocp.args.JsonSave(host)}),
            force=True,
        )
        manager.wait_until_finished()


def _swap_in(new: str, final: str) -> None:
    """Replace ``final`` by ``new`` so that a complete checkpoint of this step exists at every instant."""
    previous = final + ".previous"
    if os.path.isdir(final):
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)  # now only .previous holds the step: still found by latest_checkpoint
    os.replace(new, final)
    shutil.rmtree(previous, ignore_errors=True)
    shutil.rmtree(os.path.dirname(new), ignore_errors=True)


def _clean_debris(directory: str) -> None:
    """Remove what failed or killed saves left: orbax temporaries, re-save staging, stale ``.previous``."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if _TMP_MARK in name or name.startswith(_RESAVE_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
        elif (m := _PREVIOUS.match(name)) is not None:
            final = checkpoint_path(directory, int(m.group(1)))
            if _is_complete(final) or not _is_complete(path):
                shutil.rmtree(path, ignore_errors=True)
            else:  # killed between the two renames of a swap: put the old one back
                os.replace(path, final)


def _step_names():
    """orbax names steps ``<prefix>_<n>``; HF (and our users' scripts) expect ``checkpoint-<n>``."""
    import orbax.checkpoint as ocp
    from etils import epath

    class _Names(ocp.step.NameFormat):
        def build_name(self, step: int) -> str:
            return f"checkpoint-{step}"

        def _metadata(self, path):
            m = _NAME.match(path.name)
            if m is None or not ocp.step.is_path_finalized(path):
                return None
            return ocp.step.Metadata(step=int(m.group(1)), path=path)

        def find_all(self, base_path):
            base = epath.Path(base_path)
            if not base.is_dir():
                return iter([])
            return ocp.step.build_step_metadatas([p for p in base.iterdir() if _NAME.match(p.name)], self._metadata)

        def find_step(self, base_path, step: int):
            path = epath.Path(base_path) / self.build_name(step)
            found = self._metadata(path) if path.exists() else None
            if found is None:
                raise ValueError(f"no finalized checkpoint-{step} under {base_path}")
            return found

    return _Names()


# ---------------------------------------------------------------------------------------------- restore
def read(trainer: Checkpointable, path: str) -> dict[str, Any]:
    """Read and fully check the checkpoint at ``path``; returns a state dict for ``trainer.load_state_dict``.

    Nothing of ``trainer`` is changed. Raises ``FileNotFoundError`` for a folder that is not a complete
    checkpoint and ``ValueError`` (naming what is wrong) for anything that does not fit or does not verify.
    """
    import orbax.checkpoint as ocp

    timeout = _timeout(trainer)
    error: Optional[BaseException] = None
    saved: dict[str, Any] = {}
    try:  # local reads and checks only: every process learns every verdict before the first collective
        saved, target_tree = _read_and_check_host(trainer, path)
    except Exception as err:  # any type (a missing folder on one process included): shared
        error = err
    where = os.path.abspath(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else repr(path)
    step = saved.get("trainer", {}).get("global_step")
    agreed = {"path": where, "global_step": step, "host_checksum": saved.get(HOST_CHECKSUM)}
    agreed.update(fingerprint.of_training(trainer.config, trainer.spec))  # a config changed since construction
    distributed.agree(RESTORE, error, agreed, timeout)
    manifest = saved["arrays"]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target_tree)
    error, arrays = None, None
    try:
        arrays = ocp.StandardCheckpointer().restore(os.path.join(where, ARRAYS_ITEM), abstract)
    except Exception as err:  # orbax: unreadable, truncated or structurally different files
        error = ValueError(
            f"restore_checkpoint: the arrays in {path!r} could not be read ({type(err).__name__}: {str(err)[:300]}); "
            "the checkpoint is damaged or was written for another optimizer. Restore an older one."
        )
    distributed.agree(RESTORE + " (arrays read)", error, {}, timeout)
    named = _named_leaves(arrays)
    digests = fingerprint.array_digests([leaf for _, leaf in named])
    bad = [name for (name, _), digest in zip(named, digests) if manifest[name]["checksum"] != digest]
    if bad:
        raise ValueError(
            f"restore_checkpoint: {len(bad)} arrays in {path!r} do not match the checksums written at save (first "
            f"{bad[0]}); the files were changed or damaged after saving. Restore an older checkpoint."
        )
    _refuse_non_finite(named, what="restore_checkpoint", where=path)
    fields = HOST_FIELDS if saved["format"] == FORMAT else LEGACY_HOST_FIELDS
    return {"params": arrays["params"], "opt_state": arrays["opt_state"], **{k: saved["trainer"][k] for k in fields}}


def _read_and_check_host(trainer: Checkpointable, path: Any) -> tuple[dict[str, Any], Any]:
    """The checkpoint's host JSON, verified (checksum, consistency, architecture, array manifest) against
    ``trainer``; returns it with the trainer's array tree to restore into. Reads no arrays, runs no collective."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"restore_checkpoint: path={path!r} must be a checkpoint folder path (str or os.PathLike); pass e.g. "
            "jaxsft.infra.checkpoint.latest_checkpoint('checkpoints')."
        )
    path = os.fspath(path)
    state_file = _state_file(path)
    if not os.path.isfile(state_file):
        raise FileNotFoundError(
            f"restore_checkpoint: {path!r} is not a complete jaxsft checkpoint (no {STATE_ITEM}); pass a "
            "checkpoint-<step> folder written by save_checkpoint, e.g. jaxsft.infra.checkpoint.latest_checkpoint(dir)."
        )
    saved = _read_host_json(path, state_file)
    ours = fingerprint.as_json(dataclasses.asdict(trainer.spec))
    if saved["model_spec"] != ours:
        diff = sorted(k for k in ours if saved["model_spec"].get(k) != ours[k])
        raise ValueError(
            f"restore_checkpoint: {path!r} was saved from a different architecture (differs in {diff}); build the "
            "trainer from the same model family and shape before restoring."
        )
    current = trainer.state_dict()
    target_tree = {"params": current["params"], "opt_state": current["opt_state"]}
    target_named = _named_leaves(target_tree)
    manifest = saved["arrays"]
    mismatch = sorted(set(manifest) ^ {name for name, _ in target_named})
    if not mismatch:
        mismatch = [
            name for name, leaf in target_named
            if manifest[name]["shape"] != list(leaf.shape) or manifest[name]["dtype"] != str(leaf.dtype)
        ]
    if mismatch:
        raise ValueError(
            f"restore_checkpoint: the arrays in {path!r} do not fit this trainer's parameters and optimizer state "
            f"({len(mismatch)} differ in name, shape or dtype, first {mismatch[0]}); restore with the model and "
            "optimizer the checkpoint was trained with."
        )
    return saved, target_tree


def restore(trainer: Checkpointable, path: str) -> None:
    """Load a checkpoint written by :func:`save` into ``trainer`` (any mesh); all checks run before any change."""
    trainer.load_state_dict(read(trainer, path), copy=False)


# ---------------------------------------------------------------------------------------------- helpers
def _host_json(trainer: Checkpointable, state: dict, named: list) -> dict[str, Any]:
    digests = fingerprint.array_digests([leaf for _, leaf in named])
    host = {
        "format": FORMAT,
        "model_spec": fingerprint.as_json(dataclasses.asdict(trainer.spec)),
        "config": fingerprint.as_json(dataclasses.asdict(trainer.config)),
        "mesh": {k: int(v) for k, v in trainer.mesh.shape.items()},
        "trainer": {k: state[k] for k in HOST_FIELDS},
        "arrays": {
            name: {"shape": list(leaf.shape), "dtype": str(leaf.dtype), "checksum": digest}
            for (name, leaf), digest in zip(named, digests)
        },
    }
    body = fingerprint.as_json({k: v for k, v in host.items() if k != "format"})  # (no dict with "format" passes json.dumps
    host = {"format": FORMAT, **body}                                  #  before orbax writes it)
    host[HOST_CHECKSUM] = host_checksum(host)
    return host


def host_checksum(saved: dict[str, Any]) -> str:
    """SHA-256 of the host JSON without its own checksum field (keys sorted: independent of write order).
    The arrays have their own checksums; this one covers the step counters, log history and RNG state."""
    body = sorted([k, v] for k, v in saved.items() if k != HOST_CHECKSUM)
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=True).encode()).hexdigest()


def check_host_consistency(host: dict[str, Any], where: str) -> None:
    """Refuse host fields that contradict each other (the JSON parsed, checksum aside): a ``global_step``
    behind its own log history or logging position, counters below zero, a non-finite pending loss."""
    def broken(what: str) -> ValueError:
        return ValueError(f"restore_checkpoint: {where!r} has an inconsistent {STATE_ITEM} ({what}); restore an older checkpoint.")

    step = host["global_step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise broken(f"global_step={step!r} is not an integer >= 0")
    counters = host["counters"] if isinstance(host["counters"], dict) else {}
    last_logged = counters.get("last_logged_step", 0)
    if isinstance(last_logged, int) and not 0 <= last_logged <= step:
        raise broken(f"last_logged_step={last_logged} is not within [0, global_step={step}]")
    pending = counters.get("loss_since_log", [])
    if isinstance(pending, list):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pending):
            raise broken(f"loss_since_log={pending!r:.80} holds a value that is not a finite number")
        if len(pending) > step - (last_logged if isinstance(last_logged, int) else 0):
            raise broken(f"loss_since_log has {len(pending)} losses, more than the updates since the last log")
    logs = host["log_history"] if isinstance(host["log_history"], list) else []
    steps = [entry.get("step") for entry in logs if isinstance(entry, dict)]
    if any(not isinstance(s, int) or isinstance(s, bool) for s in steps):
        raise broken("a log_history entry has no integer step")
    if steps and (max(steps) > step or steps != sorted(steps)):
        raise broken(f"log_history runs to step {max(steps)} (or out of order) but global_step is {step}")


def _read_host_json(path: str, state_file: str) -> dict[str, Any]:
    def broken(what: str) -> ValueError:
        return ValueError(f"restore_checkpoint: {path!r} has a damaged {STATE_ITEM} ({what}); restore an older checkpoint.")

    try:
        with open(state_file) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise broken(f"not readable JSON: {err}") from None
    if not isinstance(saved, dict):
        raise broken("not a JSON object")
    if saved.get("format") not in (FORMAT, *_OLDER_FORMATS):
        raise ValueError(f"restore_checkpoint: {path!r} has format {saved.get('format')!r}, expected {FORMAT!r}.")
    for key, kind in (("model_spec", dict), ("trainer", dict), ("arrays", dict)):
        if not isinstance(saved.get(key), kind):
            raise broken(f"field {key!r} missing or not a {kind.__name__}")
    host = saved["trainer"]
    missing = [k for k in (HOST_FIELDS if saved["format"] == FORMAT else LEGACY_HOST_FIELDS) if k not in host]
    if missing:
        raise broken(f"trainer fields {missing} missing")
    for name, entry in saved["arrays"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("shape"), list) and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("checksum"), list)):
            raise broken(f"array entry {name!r} lacks shape, dtype or checksum")
    if saved["format"] not in _UNCHECKSUMMED_FORMATS and saved.get(HOST_CHECKSUM) != host_checksum(saved):
        raise broken(
            "its checksum does not match its contents: the step counters, log history or RNG state were edited or "
            "damaged after saving"
        )
    check_host_consistency(host, path)
    return saved


def _named_leaves(tree: Any) -> list[tuple[str, jax.Array]]:
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]) if leaves else jnp.ones((0,), bool)


def _refuse_non_finite(named: list, *, what: str = "save_checkpoint", where: str = "") -> None:
    """The NaN guard: raise, naming the first bad array, if any weight or optimizer value is NaN or inf."""
    floats = [(name, leaf) for name, leaf in named if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    flags = np.asarray(jax.device_get(_finite_flags([leaf for _, leaf in floats])))
    bad = [name for (name, _), ok in zip(floats, flags) if not ok]
    if not bad:
        return
    if what == "save_checkpoint":
        raise FloatingPointError(
            f"save_checkpoint: refusing to save a non-finite state ({len(bad)} arrays hold NaN or inf, first "
            f"{bad[0]}); the checkpoints already on disk are untouched. Restore the latest one "
            "(jaxsft.infra.checkpoint.latest_checkpoint) and lower the learning rate or enable clipping."
        )
    raise ValueError(
        f"{what}: {where!r} holds non-finite values ({len(bad)} arrays, first {bad[0]}); the trainer was left as it "
        "was. Restore an older checkpoint."
    )


def _timeout(trainer: Checkpointable) -> float:
    """How long a process waits for its peers (the trainer's ``agreement_timeout_s``, as ``step()``)."""
    return float(getattr(trainer.config, "agreement_timeout_s", 300.0))
