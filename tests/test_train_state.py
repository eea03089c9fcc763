"""The device train state (jaxsft.training.train_state.TrainState): one pytree the update programs take,
advance (step, dropout key, non-finite streak) and donate whole, read back to the host once per step() call."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxsft
import tiny
from jaxsft.training.train_state import TrainState, dropout_key_for


def _trainer(family="llama", **overrides):
    model = jaxsft.from_pretrained(tiny.tiny_torch_model(family, vocab_size=256), mesh=jaxsft.single_device_mesh())
    settings = dict(learning_rate=1e-3, per_device_train_batch_size=2, logging_steps=1, max_length=16,
                    length_buckets=(16,), disable_tqdm=True, seed=5)
    return jaxsft.IterativeSFTTrainer(model, jaxsft.TrainConfig(**{**settings, **overrides}))


def peek(x) -> np.ndarray:
    """``x``'s value read through a device copy: on CPU a read leaves a host view on the array itself, which
    keeps XLA from donating it (it copies instead), and donation is what is checked here."""
    return np.asarray(jax.numpy.copy(x))


def _ids(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 250, int(rng.integers(4, 12))) for _ in range(n)]


@pytest.mark.parametrize("accumulation", [1, 3], ids=["fused", "accumulated"])
def test_the_update_programs_advance_and_donate_the_whole_state(accumulation):
    """The step, the dropout key and the streak are advanced inside the compiled update (the host writes none of
    them), and every leaf of the state passed in is donated, the small fields included."""
    trainer = _trainer("gpt2", gradient_accumulation_steps=accumulation)  # GPT-2 drops out: the key is used
    assert trainer.dropout_enabled
    start = trainer.train_state
    assert isinstance(start, TrainState) and int(peek(start.step)) == 0
    np.testing.assert_array_equal(peek(start.dropout_key), dropout_key_for(5))
    keys = [peek(start.dropout_key)]
    for call in range(2):
        before = jax.tree.leaves(trainer.train_state)  # the arrays (the Variables get the new ones after)
        stats = trainer.step(input_ids=_ids(4 * accumulation, seed=call))  # two updates per call
        assert stats["num_updates"] == 2
        assert all(leaf.is_deleted() for leaf in before)  # donated whole
        state = trainer.train_state
        assert int(peek(state.step)) == trainer.state.global_step == stats["global_step"] == 2 * (call + 1)
        assert int(peek(state.nonfinite_in_a_row)) == trainer.state.nonfinite_in_a_row == 0
        keys.append(peek(state.dropout_key))
    assert len({k.tobytes() for k in keys}) == 3  # the key moved on with every call

    trainer.reset()
    assert int(peek(trainer.train_state.step)) == trainer.state.global_step == 0
    np.testing.assert_array_equal(peek(trainer.train_state.dropout_key), keys[0])


def test_dropout_masks_follow_the_state_key():
    """Two trainers of one seed drop out alike; a trainer whose state key is replaced draws other masks, so the
    key the programs split is the state's (and nothing else seeds dropout)."""
    data = _ids(4)
    a, b, c = _trainer("gpt2"), _trainer("gpt2"), _trainer("gpt2")
    state = c.state_dict()
    c.load_state_dict({**state, "dropout_key": [int(w) ^ 1 for w in state["dropout_key"]]})
    losses = [t.step(input_ids=data)["update_losses"] for t in (a, b, c)]
    assert losses[0] == losses[1] != losses[2]


def test_step_reads_the_device_once_per_call(monkeypatch):
    """Several updates of three micro-batches each: no implicit device->host read and one explicit fetch (the
    metrics, with the state's step and streak) per step() call, not one per micro-batch or update."""
    trainer = _trainer(gradient_accumulation_steps=3)
    trainer.step(input_ids=_ids(12))  # compile outside the count
    fetches = []
    real = jax.device_get

    def counting(tree):
        fetches.append(len(jax.tree.leaves(tree)))
        return real(tree)

    monkeypatch.setattr(jax, "device_get", counting)
    with jax.transfer_guard_device_to_host("disallow"):
        stats = trainer.step(input_ids=_ids(12, seed=1))
    assert stats["num_updates"] == 2 and stats["num_microbatches"] == 6
    assert len(fetches) == 1
    assert trainer.state.global_step == 4


def test_global_step_refuses_assignment_and_keeps_the_count():
    """HF lets a script assign ``state.global_step``; here the schedule reads the device count, so an assignment
    would be overwritten unseen by the next step(): it is refused by name, and nothing changes."""
    trainer = _trainer()
    trainer.step(input_ids=_ids(4))
    assert trainer.state.global_step == 2
    with pytest.raises(AttributeError, match=r"global_step is read-only.*load_state_dict"):
        trainer.state.global_step = 100
    assert trainer.state.global_step == int(peek(trainer.train_state.step)) == 2
    assert trainer.step(input_ids=_ids(2, seed=1))["global_step"] == 3
