"""Issue 26's single-process reliability cases: saves that never destroy, one trainer per set of live buffers.

* ``save_pretrained`` made to fail mid-write (the safetensors writer raises after writing one of several
  shards, as on a disk that fills) leaves the previous folder byte for byte as it was and loadable, and
  raises an ``OSError`` naming the folder; a good re-save replaces stale shards and keeps unrelated files.
* A second trainer built on a model another trainer has trained (or on ``trainer.model``) gets its own
  arrays: both keep training, neither deletes the other's buffers.
"""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
import pytest
import safetensors
import safetensors.numpy

import jaxsft

import tiny

VOCAB = 256


def config(**overrides):
    settings = dict(learning_rate=1e-3, per_device_train_batch_size=2, logging_steps=1, max_length=16,
                    length_buckets=(16,), disable_tqdm=True, seed=3, lr_scheduler_type="constant")
    return jaxsft.TrainConfig(**{**settings, **overrides})


def ids(seed=0, n=4):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, 10).astype(np.int32) for _ in range(n)]


def folder_digest(folder) -> dict[str, str]:
    return {
        os.path.relpath(os.path.join(root, name), folder): hashlib.sha256(open(os.path.join(root, name), "rb").read()).hexdigest()
        for root, _, names in os.walk(folder) for name in names
    }


@pytest.fixture(scope="module")
def mesh():
    return jaxsft.single_device_mesh()


def test_save_pretrained_failing_mid_write_leaves_the_old_folder(tmp_path, mesh, monkeypatch):
    old_model = jaxsft.from_pretrained(tiny.tiny_torch_model("llama", vocab_size=VOCAB, seed=1), mesh=mesh)
    new_model = jaxsft.from_pretrained(tiny.tiny_torch_model("llama", vocab_size=VOCAB, seed=2), mesh=mesh)
    target = tmp_path / "model"
    jaxsft.save_pretrained(old_model, target, max_shard_size=20_000)  # several shards
    (target / "README.md").write_text("my notes")
    before = folder_digest(target)
    assert sum(name.endswith(".safetensors") for name in before) > 2

    real_save = safetensors.numpy.save_file
    written = []

    def fills_the_disk(tensors, filename, metadata=None):
        if written:  # the first shard goes through; the second meets a full disk
            raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")
        written.append(filename)
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.numpy, "save_file", fills_the_disk)
    with pytest.raises(OSError) as err:
        jaxsft.save_pretrained(new_model, target, max_shard_size=20_000)
    monkeypatch.undo()
    assert written and str(target) in str(err.value) and err.value.errno == 28, str(err.value)
    assert folder_digest(target) == before  # exactly as it was
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary folder left behind
    loaded = jaxsft.from_pretrained(str(target), mesh=mesh)
    for got, want in zip(jax.tree.leaves(jaxsft.models.hf_io.hf_state_dict(loaded)),
                         jax.tree.leaves(jaxsft.models.hf_io.hf_state_dict(old_model))):
        np.testing.assert_array_equal(got, want)

    # A save that completes replaces every shard (one file now: no stale shards) and keeps the README.
    jaxsft.save_pretrained(new_model, target)
    after = sorted(os.listdir(target))
    assert "README.md" in after and [n for n in after if n.endswith(".safetensors")] == ["model.safetensors"]
    assert "model.safetensors.index.json" not in after
    assert sorted(os.listdir(tmp_path)) == ["model"]


@pytest.mark.parametrize("source", ["model", "trainer.model"])
def test_a_second_trainer_leaves_the_first_working(mesh, source):
    """The second trainer used to take the first's live buffers; after it stepped, the first raised
    "Array has been deleted" for good."""
    model = jaxsft.from_pretrained(tiny.tiny_torch_model("llama", vocab_size=VOCAB), mesh=mesh)
    first = jaxsft.IterativeSFTTrainer(model, config(), mesh=mesh)
    first.step(input_ids=ids(0))
    second = jaxsft.IterativeSFTTrainer(model if source == "model" else first.model, config(), mesh=mesh)
    # Same starting weights (a copy, not a share), then each trains on its own.
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(second.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    second.step(input_ids=ids(1))
    first.step(input_ids=ids(2))
    second.step(input_ids=ids(3))
    assert first.state.global_step == second.state.global_step == 4  # two updates per call
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(first.params))
    first.evaluate({"input_ids": ids(4)})
