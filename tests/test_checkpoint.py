"""Checkpoints of the whole trainer state (jaxsft.infra.checkpoint), on simulated CPU devices.

* Save after one step() call, resume in a fresh trainer, run the next call: the per-update losses,
  final weights, optimizer state, step counters and log history equal an uninterrupted run's
  exactly (same shuffles: the RNG is part of the checkpoint), also when the resumed trainer lives
  on another mesh.
* A save that crashes leaves the previous checkpoint as the newest complete one; the next save
  clears the debris.
* The NaN guard: a state holding NaN is refused before anything is written.
* A checkpoint of another architecture or optimizer is refused and the trainer is left as it was.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import jax
import numpy as np
import optax
import pytest

import jaxsft
from jaxsft.infra import checkpoint as ckpt

import tiny
from xla_settings import BIT_EXACT_XLA_OPTIONS


def calls(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [[rng.integers(3, 250, rng.integers(4, 15)) for _ in range(12)] for _ in range(2)]


def make_trainer(mesh=None, family="llama", optimizer=None, **overrides):
    torch_model = tiny.tiny_torch_model(family, vocab_size=256, num_key_value_heads=4)
    mesh = mesh or jaxsft.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = jaxsft.from_pretrained(torch_model, mesh=mesh)
    settings = dict(
        learning_rate=1e-3, per_device_train_batch_size=4 // (mesh.shape["data"] * mesh.shape["fsdp"]) or 1,
        gradient_accumulation_steps=1, max_steps=20, warmup_steps=2, weight_decay=0.01, logging_steps=1,
        max_length=16, length_buckets=(16,), disable_tqdm=True, seed=7,
    )
    cfg = jaxsft.TrainConfig(**{**settings, **overrides})
    schedule = None
    if optimizer is not None:
        schedule = optax.constant_schedule(1e-3)
    return jaxsft.IterativeSFTTrainer(model, cfg, mesh=mesh, optimizer=optimizer, schedule=schedule)


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def uninterrupted():
    first, second = calls()
    trainer = make_trainer()
    trainer.step(input_ids=first)
    stats = trainer.step(input_ids=second)
    return trainer, stats


@pytest.mark.parametrize("sizes", [(1, 1, 1), (2, 2, 2)], ids=["same-device", "onto-2x2x2"])
@pytest.mark.slow
def test_resume_equals_uninterrupted_run(tmp_path, uninterrupted, sizes):
    reference, reference_stats = uninterrupted
    first, second = calls()
    before = make_trainer()
    before.step(input_ids=first)
    path = before.save_checkpoint(str(tmp_path))
    assert path == os.path.join(str(tmp_path), f"checkpoint-{before.state.global_step}")
    assert ckpt.latest_checkpoint(str(tmp_path)) == path

    mesh = jaxsft.make_mesh(*sizes, devices=jax.devices()[: int(np.prod(sizes))])
    resumed = make_trainer(mesh)
    resumed.restore_checkpoint(path)
    assert resumed.state.global_step == before.state.global_step
    stats = resumed.step(input_ids=second)

    # Another mesh sums in another order; Adam magnifies that for near-zero gradients (1% of one lr step).
    tol = dict(rtol=0, atol=0) if sizes == (1, 1, 1) else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["update_losses"], reference_stats["update_losses"], **tol)
    for got, want in zip(leaves(resumed.params), leaves(reference.params)):
        np.testing.assert_allclose(got, want, **tol)
    for got, want in zip(leaves(resumed._opt_state), leaves(reference._opt_state)):
        np.testing.assert_allclose(got, want, **tol)
    assert resumed.state.global_step == reference.state.global_step
    assert resumed.state.num_input_tokens_seen == reference.state.num_input_tokens_seen
    assert [h["step"] for h in resumed.state.log_history] == [h["step"] for h in reference.state.log_history]
    # The schedule continues from the restored step.
    assert resumed.current_learning_rate() == reference.current_learning_rate()


def test_crashed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first, second = calls(1)
    trainer = make_trainer()
    trainer.step(input_ids=first)
    good = trainer.save_checkpoint(str(tmp_path))
    good_arrays = leaves(trainer.params)
    trainer.step(input_ids=second)

    real_dumps = json.dumps

    def crash(obj, *args, **kwargs):  # fails while orbax writes the trainer_state item, after the arrays
        if isinstance(obj, dict) and obj.get("format") == ckpt.FORMAT:
            raise OSError("disk full")
        return real_dumps(obj, *args, **kwargs)

    monkeypatch.setattr(json, "dumps", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(str(tmp_path))
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(str(tmp_path)) == good  # the half-written one does not count
    assert not os.path.exists(ckpt.checkpoint_path(str(tmp_path), trainer.state.global_step))

    fresh = make_trainer()
    fresh.restore_checkpoint(good)
    for got, want in zip(leaves(fresh.params), good_arrays):
        np.testing.assert_array_equal(got, want)
    newer = trainer.save_checkpoint(str(tmp_path))  # clears the staging debris and completes
    assert ckpt.latest_checkpoint(str(tmp_path)) == newer
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in (good, newer))


def test_nan_guard_refuses_to_save(tmp_path):
    trainer = make_trainer()
    trainer.step(input_ids=calls(2)[0])
    params = trainer._params
    leaf_path, leaf = jax.tree_util.tree_flatten_with_path(params)[0][0]
    poisoned = jax.tree_util.tree_map_with_path(lambda p, x: x.at[(0,) * x.ndim].set(np.nan) if p == leaf_path else x,
                                                params)
    trainer._params = poisoned
    with pytest.raises(FloatingPointError, match=r"refusing to save a non-finite state.*params"):
        trainer.save_checkpoint(str(tmp_path / "ckpts"))
    assert not os.path.exists(tmp_path / "ckpts") or os.listdir(tmp_path / "ckpts") == []


def assert_refused_unchanged(trainer, path: str, match: str) -> None:
    before = leaves(trainer.params) + leaves(trainer._opt_state)
    with pytest.raises(ValueError, match=match):
        trainer.restore_checkpoint(path)
    assert trainer.state.global_step == 0
    for got, want in zip(leaves(trainer.params) + leaves(trainer._opt_state), before):
        np.testing.assert_array_equal(got, want)


def test_incompatible_checkpoint_is_refused_without_changes(tmp_path):
    trainer = make_trainer()
    trainer.step(input_ids=calls(3)[0])
    path = trainer.save_checkpoint(str(tmp_path))

    assert_refused_unchanged(make_trainer(family="qwen2"), path, "different architecture")
    assert_refused_unchanged(make_trainer(optimizer=optax.sgd(1e-3)), path,
                             "do not fit this trainer's parameters and optimizer state")

    with pytest.raises(FileNotFoundError, match="not a complete jaxsft checkpoint"):
        trainer.restore_checkpoint(str(tmp_path))


def poison_final_norm(trainer) -> None:
    """Put one inf in the final norm's scale: every loss becomes NaN/inf (as after a divergent update)."""
    hit = []

    def poison(path, x):
        if "final_norm" in jax.tree_util.keystr(path) and not hit:
            hit.append(path)
            return x.at[(1,) * x.ndim].set(np.inf)
        return x

    trainer._params = jax.tree_util.tree_map_with_path(poison, trainer._params)
    assert hit


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.slow
def test_nan_guard_skips_non_finite_updates(accumulation):
    first, second = calls(4)
    guarded = make_trainer(skip_nonfinite_updates=True, gradient_accumulation_steps=accumulation)
    guarded.step(input_ids=first)
    poison_final_norm(guarded)
    before = leaves(guarded.params) + leaves(guarded._opt_state)
    with pytest.warns(UserWarning, match=r"updates had a non-finite loss or gradient norm and were skipped"):
        stats = guarded.step(input_ids=second)
    assert stats["num_updates"] > 0 and stats["skipped_updates"] == stats["num_updates"]
    for got, want in zip(leaves(guarded.params) + leaves(guarded._opt_state), before):
        np.testing.assert_array_equal(got, want)  # nothing moved, NaN spread nowhere

    # Without the guard the same call spreads NaN through the weights (HF Trainer's behaviour).
    unguarded = make_trainer(gradient_accumulation_steps=accumulation)
    unguarded.step(input_ids=first)
    poison_final_norm(unguarded)
    assert unguarded.step(input_ids=second)["skipped_updates"] == 0
    assert sum(int(np.isnan(x).sum()) for x in leaves(unguarded.params)) > 1000

    # A healthy call with the guard on trains exactly as without it (bit for bit, under the CPU code
    # generation users get: the guard's program differs, so the suite's faster codegen may round differently).
    a = make_trainer(skip_nonfinite_updates=True, xla_options=BIT_EXACT_XLA_OPTIONS)
    b = make_trainer(xla_options=BIT_EXACT_XLA_OPTIONS)
    assert a.step(input_ids=first)["update_losses"] == b.step(input_ids=first)["update_losses"]
    for got, want in zip(leaves(a.params), leaves(b.params)):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------- issue 13: reliability
def snapshot(trainer):
    state = trainer.state_dict()
    return leaves(state["params"]) + leaves(state["opt_state"]), json.dumps(
        {k: state[k] for k in ("global_step", "dropout_key", "rng", "counters", "log_history")}, sort_keys=True)


def assert_unchanged(trainer, before):
    arrays, host = snapshot(trainer)
    assert host == before[1]
    for got, want in zip(arrays, before[0]):
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trainer after one call, and a checkpoint of it."""
    directory = tmp_path_factory.mktemp("saved")
    trainer = make_trainer()
    trainer.step(input_ids=calls(5)[0])
    return trainer, trainer.save_checkpoint(str(directory))


def copy_checkpoint(path, tmp_path):
    import shutil

    target = tmp_path / os.path.basename(path)
    shutil.copytree(path, target)
    return str(target)


def test_state_dict_round_trip_and_refusals(saved):
    trainer, _ = saved
    fresh = make_trainer()
    before = snapshot(fresh)
    state = trainer.state_dict()
    bad_states = {
        "missing key": {k: v for k, v in state.items() if k != "rng"},
        "params shape": {**state, "params": jax.tree.map(lambda x: x[..., :1] if x.ndim else x, state["params"])},
        "opt_state structure": {**state, "opt_state": optax.sgd(1e-3).init(state["params"])},
        "global_step": {**state, "global_step": -4},
        "rng": {**state, "rng": {"bit_generator": "PCG64", "state": "garbage"}},
        "counters": {**state, "counters": {**state["counters"], "total_label_tokens": "many"}},
        "log_history": {**state, "log_history": "nothing"},
    }
    for what, bad in bad_states.items():
        with pytest.raises(ValueError, match="load_state_dict"):
            fresh.load_state_dict(bad)
        assert_unchanged(fresh, before)
    fresh.load_state_dict(state)
    assert snapshot(fresh)[1] == snapshot(trainer)[1]
    second = calls(5)[1]
    a, b = trainer.step(input_ids=second), fresh.step(input_ids=second)  # trainer's arrays were copied, not shared
    assert a["update_losses"] == b["update_losses"]


def test_tampered_checkpoints_are_refused_before_any_change(saved, tmp_path):
    trainer, path = saved
    fresh = make_trainer()
    before = snapshot(fresh)

    def refused(folder, match):
        with pytest.raises(ValueError, match=match):
            fresh.restore_checkpoint(folder)
        assert_unchanged(fresh, before)

    # A flipped bit in one array's stored values: the per-array checksum catches it (or the reader does).
    flipped = copy_checkpoint(path, tmp_path / "flip")
    data = sorted((os.path.getsize(p), p) for p in
                  (os.path.join(r, f) for r, _, fs in os.walk(os.path.join(flipped, ckpt.ARRAYS_ITEM)) for f in fs))
    with open(data[-1][1], "r+b") as f:
        f.seek(data[-1][0] // 2)
        byte = f.read(1)
        f.seek(data[-1][0] // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    refused(flipped, "checksum|could not be read")

    # A checksum that does not match what was saved (the arrays intact): refused by the checksum alone.
    wrong = copy_checkpoint(path, tmp_path / "sum")
    state_file = os.path.join(wrong, ckpt.STATE_ITEM, "metadata")
    host = json.load(open(state_file))
    first = sorted(host["arrays"])[0]
    host["arrays"][first]["checksum"][1] ^= 1
    host[ckpt.HOST_CHECKSUM] = ckpt.host_checksum(host)  # (else the host JSON's own checksum refuses it first)
    json.dump(host, open(state_file, "w"))
    refused(wrong, rf"do not match the checksums.*{re.escape(first)}")

    # Garbled JSON and a missing host field: refused, though the arrays would load fine.
    garbled = copy_checkpoint(path, tmp_path / "garbled")
    with open(os.path.join(garbled, ckpt.STATE_ITEM, "metadata"), "w") as f:
        f.write('{"format": "jaxsft-trainer-checkpoint/3", "trai')
    refused(garbled, "damaged trainer_state")
    missing = copy_checkpoint(path, tmp_path / "missing")
    state_file = os.path.join(missing, ckpt.STATE_ITEM, "metadata")
    host = json.load(open(state_file))
    del host["trainer"]["rng"]
    json.dump(host, open(state_file, "w"))
    refused(missing, r"trainer fields \['rng'\] missing")

    fresh.restore_checkpoint(path)  # the untouched original still restores
    assert fresh.state.global_step == int(path.rsplit("-", 1)[1]) > 0


def test_resave_keeps_a_complete_checkpoint_at_every_instant(tmp_path, monkeypatch):
    """Re-saving step N swaps the new folder in; at each rename a complete checkpoint of step N is found."""
    trainer = make_trainer()
    trainer.step(input_ids=calls(6)[0])
    first = trainer.save_checkpoint(str(tmp_path))
    seen = []
    real_replace = os.replace

    def watching(src, dst):
        seen.append(ckpt.latest_checkpoint(str(tmp_path)))
        real_replace(src, dst)
        seen.append(ckpt.latest_checkpoint(str(tmp_path)))

    monkeypatch.setattr(os, "replace", watching)
    again = trainer.save_checkpoint(str(tmp_path))
    monkeypatch.undo()
    assert again == first and seen and all(p is not None and p.startswith(first) for p in seen)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(first)]


def test_keep_last_and_staging_cleanup(tmp_path):
    trainer = make_trainer(per_device_train_batch_size=12)
    data = calls(7)
    paths = []
    for i in range(4):
        trainer.step(input_ids=data[i % 2])
        paths.append(trainer.save_checkpoint(str(tmp_path), keep_last=2))
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths[-2:])
    # Debris of failed or killed saves (orbax temporaries, re-save staging) is removed by the next save.
    for junk in ("checkpoint-99.orbax-checkpoint-tmp-1234", ".jaxsft-resave-3"):
        os.makedirs(tmp_path / junk / "arrays")
    trainer.step(input_ids=data[0])
    newest = trainer.save_checkpoint(str(tmp_path), keep_last=2)
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in (paths[-1], newest))


def test_disk_full_is_an_oserror_and_leaves_the_old_checkpoint(tmp_path):
    """A real full file system (a 1 MB tmpfs): OSError(ENOSPC), and the half-written save never counts."""
    import errno
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        trainer = make_trainer()  # ~0.35 MB of weights, ~1 MB with Adam's moments: the second save overflows
        trainer.step(input_ids=calls(8)[0])
        with pytest.raises(OSError) as err:
            trainer.save_checkpoint(str(mount))
        assert err.value.errno == errno.ENOSPC and "disk is full" in str(err.value)
        assert ckpt.latest_checkpoint(str(mount)) is None
    finally:
        subprocess.run(["umount", str(mount)])


# ---------------------------------------------------------------------------------------- issue 26: host-state integrity
def _edit_host(path, tmp_path, name, edit, *, reseal):
    """A copy of ``path`` whose host JSON ``edit`` changed; ``reseal`` rewrites its checksum so only the
    consistency checks stand between the edit and the trainer."""
    folder = copy_checkpoint(path, tmp_path / name)
    state_file = os.path.join(folder, ckpt.STATE_ITEM, "metadata")
    host = json.load(open(state_file))
    edit(host["trainer"])
    if reseal:
        host[ckpt.HOST_CHECKSUM] = ckpt.host_checksum(host)
    json.dump(host, open(state_file, "w"))
    return folder


def test_edited_host_state_is_refused_before_any_change(saved, tmp_path):
    """The arrays had checksums, the JSON beside them none: a step of 10**6, a step behind the log history,
    a NaN pending loss or another RNG state restored silently (issue 26)."""
    trainer, path = saved
    fresh = make_trainer()
    before = snapshot(fresh)
    step = int(path.rsplit("-", 1)[1])  # (the fixture's trainer may have trained on since)
    assert step >= 1

    def set_step(value):
        return lambda host: host.update(global_step=value)

    def refused(folder, match):
        with pytest.raises(ValueError, match=match):
            fresh.restore_checkpoint(folder)
        assert_unchanged(fresh, before)

    edits = {
        "step": set_step(10**6),
        "rng": lambda host: host["rng"]["state"].update(state=host["rng"]["state"]["state"] + 1),
        "nan_loss": lambda host: host["counters"].update(loss_since_log=[float("nan")]),
        "log_ahead": lambda host: host["log_history"].append({"loss": 1.0, "step": step + 5}),
    }
    for name, edit in edits.items():  # edited after saving: the host checksum refuses each
        refused(_edit_host(path, tmp_path, name, edit, reseal=False), r"damaged trainer_state \(its checksum")
    # Resealed (a checksum recomputed by hand): the consistency checks still refuse what contradicts itself.
    refused(_edit_host(path, tmp_path, "behind", set_step(0), reseal=True),
            r"inconsistent trainer_state .*(last_logged_step|log_history)")
    refused(_edit_host(path, tmp_path, "nan2", edits["nan_loss"], reseal=True),
            r"inconsistent trainer_state \(loss_since_log=\[nan\]")
    refused(_edit_host(path, tmp_path, "ahead2", edits["log_ahead"], reseal=True),
            rf"inconsistent trainer_state \(log_history runs to step {step + 5}")
    fresh.restore_checkpoint(path)  # the untouched original restores
    assert fresh.state.global_step == step


def test_save_checkpoint_refuses_a_non_path_before_writing(saved, tmp_path):
    trainer, _ = saved
    before = snapshot(trainer)
    for bad in (None, 42):
        with pytest.raises(TypeError, match=r"save_checkpoint: directory=.* must be a folder path"):
            trainer.save_checkpoint(bad)
    assert_unchanged(trainer, before)
    with pytest.raises(TypeError, match=r"restore_checkpoint: path=None must be a checkpoint folder path"):
        trainer.restore_checkpoint(None)
    assert_unchanged(trainer, before)


def test_save_steps_write_periodic_checkpoints_in_the_core(tmp_path):
    """TrainConfig.save_steps: a JAX user's step() calls write output_dir/checkpoint-N at multiples of save_steps,
    keeping the newest save_total_limit; a checkpoint restores to the same state."""
    import jaxsft
    from jaxsft.infra.checkpoint import latest_checkpoint

    import tiny

    model = jaxsft.from_pretrained(tiny.tiny_torch_model("llama", seed=1), mesh=jaxsft.single_device_mesh())
    config = jaxsft.TrainConfig(
        learning_rate=1e-3, max_length=16, min_bucket_length=16, per_device_train_batch_size=2, logging_steps=0,
        disable_tqdm=True, output_dir=str(tmp_path), save_steps=2, save_total_limit=2,
    )
    trainer = jaxsft.IterativeSFTTrainer(model, config)
    rng = np.random.default_rng(0)
    for _ in range(3):  # 2 updates per call: steps 2, 4, 6 reach a multiple of 2
        trainer.step(input_ids=[rng.integers(3, 300, 8) for _ in range(4)])
    saved = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert saved == ["checkpoint-4", "checkpoint-6"]
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-6")
    with pytest.raises(ValueError, match="save_steps"):
        jaxsft.TrainConfig(save_steps=5)  # no output_dir


def test_the_state_dict_layout_reads_the_device_train_state():
    """state_dict() holds the device TrainState's step, dropout key and non-finite streak beside the host fields;
    a state of another layout (a key more, or one missing that the previous layout had) is refused whole,
    saying so, with nothing changed."""
    trainer = make_trainer()
    trainer.step(input_ids=calls(3)[0])
    state = trainer.state_dict()
    assert set(state) == {"params", "opt_state", "global_step", "dropout_key", "rng", "counters", "log_history"}
    assert set(state["counters"]) == {
        "num_input_tokens_seen", "total_label_tokens", "last_logged_step", "loss_since_log", "nonfinite_in_a_row",
        "generate_calls",
    }
    assert isinstance(state["params"], dict)  # a pure dict of arrays, as before
    ts = trainer.train_state
    assert state["global_step"] == int(ts.step) == trainer.state.global_step > 0
    assert state["dropout_key"] == [int(w) for w in np.asarray(ts.dropout_key)]
    assert state["counters"]["nonfinite_in_a_row"] == int(ts.nonfinite_in_a_row) == 0
    before = leaves(trainer.params)
    for bad in ({**state, "train_state": 1}, {k: v for k, v in state.items() if k != "rng"},
                {**state, "dropout_key": [1, 2, 3]}, {**state, "dropout_key": [-1, 2]}):
        with pytest.raises(ValueError, match="another jaxsft layout|dropout_key"):
            trainer.load_state_dict(bad)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(trainer.params), before))


def _as_format_3(path, tmp_path):
    """``path`` rewritten as the checkpoints of the layout before this one (format /3, written by main up to
    the device TrainState's dropout key): the same arrays item, the trainer fields without ``dropout_key``,
    the host checksum over that JSON."""
    folder = copy_checkpoint(path, tmp_path / "format3")
    state_file = os.path.join(folder, ckpt.STATE_ITEM, "metadata")
    host = json.load(open(state_file))
    assert host["format"] == "jaxsft-trainer-checkpoint/4"
    host["format"] = "jaxsft-trainer-checkpoint/3"
    del host["trainer"]["dropout_key"]
    assert tuple(host["trainer"]) == ("global_step", "rng", "counters", "log_history")  # format 3's fields
    host[ckpt.HOST_CHECKSUM] = ckpt.host_checksum(host)
    json.dump(host, open(state_file, "w"))
    return folder


def test_a_checkpoint_of_the_previous_format_restores_and_resumes_exactly_without_dropout(tmp_path):
    """A format-3 checkpoint (no dropout key) restores; without dropout the resumed run equals the unbroken one."""
    first, second = calls(4)
    straight = make_trainer(xla_options=BIT_EXACT_XLA_OPTIONS)
    straight.step(input_ids=first)
    path = straight.save_checkpoint(str(tmp_path / "new"))
    old = _as_format_3(path, tmp_path)
    resumed = make_trainer(xla_options=BIT_EXACT_XLA_OPTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dropout here: nothing to warn about
        resumed.restore_checkpoint(old)
    assert resumed.state.global_step == int(resumed.train_state.step) == straight.state.global_step
    assert straight.step(input_ids=second)["update_losses"] == resumed.step(input_ids=second)["update_losses"]
    for got, want in zip(leaves(resumed.params), leaves(straight.params)):
        np.testing.assert_array_equal(got, want)
    # A format-3 file whose JSON was edited is still refused by its checksum.
    state_file = os.path.join(old, ckpt.STATE_ITEM, "metadata")
    host = json.load(open(state_file))
    host["trainer"]["global_step"] += 1
    json.dump(host, open(state_file, "w"))
    with pytest.raises(ValueError, match="its checksum"):
        make_trainer().restore_checkpoint(old)
    # A format-4 checkpoint without the key is damaged, not old: refused.
    broken = _edit_host(path, tmp_path, "nokey", lambda h: h.pop("dropout_key"), reseal=True)
    with pytest.raises(ValueError, match=r"trainer fields \['dropout_key'\] missing"):
        make_trainer().restore_checkpoint(broken)


def test_a_previous_layout_state_with_dropout_restores_with_a_warning_that_says_so(tmp_path):
    """With dropout on, a format-3 checkpoint cannot give back the old run's masks: it restores (weights, step,
    counters, shuffling RNG exact) and a warning says the dropout stream restarts from the seed and step."""
    trainer = make_trainer(family="gpt2")  # GPT-2's config drops out by default
    assert trainer.dropout_enabled
    trainer.step(input_ids=calls(5)[0])
    old = _as_format_3(trainer.save_checkpoint(str(tmp_path / "new")), tmp_path)
    fresh = make_trainer(family="gpt2")
    with pytest.warns(UserWarning, match=r"layout from before the dropout key.*dropout masks continue"):
        fresh.restore_checkpoint(old)
    mine, theirs = fresh.state_dict(), trainer.state_dict()
    assert {k: mine[k] for k in ("global_step", "rng", "counters", "log_history")} == {
        k: theirs[k] for k in ("global_step", "rng", "counters", "log_history")}
    assert mine["dropout_key"] != theirs["dropout_key"]  # derived from seed and step, said so above
    for got, want in zip(leaves(mine["params"]), leaves(theirs["params"])):
        np.testing.assert_array_equal(got, want)
