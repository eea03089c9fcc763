"""Checkpoints of the whole trainer state (jaxsft.checkpoint), on simulated CPU devices.

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

import jax
import numpy as np
import optax
import pytest

import jaxsft
from jaxsft import checkpoint as ckpt

import tiny


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

    # A healthy call with the guard on trains exactly as without it.
    a, b = make_trainer(skip_nonfinite_updates=True), make_trainer()
    assert a.step(input_ids=first)["update_losses"] == b.step(input_ids=first)["update_losses"]
    for got, want in zip(leaves(a.params), leaves(b.params)):
        np.testing.assert_array_equal(got, want)
