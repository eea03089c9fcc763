"""Packing: several examples per row, kept apart by segment ids, train exactly like one example per row."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jaxsft
from jaxsft.training import batching
from jaxsft.models import layers as L

import tiny


def _examples(lengths, vocab=300, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(3, vocab, n).astype(np.int32)
        labels = ids.copy()
        labels[: n // 3] = -100  # a prompt part that is not learned
        out.append(batching.Example(ids, labels))
    return out


def test_packer_lays_examples_end_to_end_with_own_positions_and_no_crossing_target():
    examples = _examples([30, 5, 12, 40, 7, 3, 20, 9])
    (mb,) = batching.plan_microbatches(examples, rows=8, buckets=(16, 32, 64), rng=np.random.default_rng(0), pack=True)
    unpacked = batching.plan_microbatches(examples, rows=8, buckets=(16, 32, 64), rng=np.random.default_rng(0))[0]
    assert mb.packed and mb.input_ids.shape[1] == 64
    assert mb.input_ids.shape[0] == 2  # 126 tokens fit in 2 rows of 64
    assert mb.num_label_tokens == unpacked.num_label_tokens
    assert int(mb.attention_mask.sum()) == sum(e.input_ids.size for e in examples)
    seen = []
    for r in range(mb.input_ids.shape[0]):
        ids = mb.segment_ids[r]
        for s in range(1, ids.max() + 1):
            where = np.flatnonzero(ids == s)
            assert np.all(np.diff(where) == 1)  # contiguous
            np.testing.assert_array_equal(mb.positions[r, where], np.arange(where.size))
            assert mb.labels[r, where[0]] == -100  # the token before belongs to another example
            seen.append(tuple(mb.input_ids[r, where]))
        assert mb.segment_lengths[r].sum() == mb.input_ids.shape[1]
    assert sorted(seen) == sorted(tuple(e.input_ids) for e in examples)


def test_packer_picks_the_layout_with_fewest_tokens():
    """Rows need not come in powers of two; longer rows only where attention costs per segment."""
    examples = _examples([60, 50, 40, 30, 20, 10, 5, 3])  # 218 tokens, longest in bucket 64
    three_rows = _examples([60, 60, 50, 10])

    def plan(group, buckets=(16, 32, 64, 128, 256), **kw):
        return batching.plan_microbatches(group, rows=8, buckets=buckets, rng=np.random.default_rng(0), pack=True, **kw)[0]

    short = plan(examples)
    assert short.input_ids.shape == (4, 64)  # first-fit needs 4 rows of 64 (60|50+10|40+20|30+5+3)
    long_ = plan(examples, longer_rows=True)
    assert long_.input_ids.shape == (1, 256)  # 256 tokens instead of 4 x 64 = 256: tie goes to longer rows
    even = plan(examples, longer_rows=True, row_multiple=2)
    assert even.input_ids.shape[0] % 2 == 0 and even.input_ids.size <= 8 * 64
    three = plan(three_rows, buckets=(64,))
    assert three.input_ids.shape == (3, 64)  # 60 | 60 | 50+10, not rounded up to 4
    labelled = lambda group: sum(int(np.count_nonzero(e.labels[1:] != -100)) for e in group)  # noqa: E731
    for mb, group in ((short, examples), (long_, examples), (even, examples), (three, three_rows)):
        assert mb.num_label_tokens == labelled(group)


def test_packed_row_never_attends_across_examples():
    """Changing example A's tokens must not move example B's hidden states in the same row."""
    torch_model = tiny.tiny_torch_model("llama")
    model = jaxsft.from_pretrained(torch_model)
    a, b = _examples([9, 11], seed=1)
    row = np.concatenate([a.input_ids, b.input_ids])[None]
    seg = np.array([[1] * 9 + [2] * 11], np.int32)
    pos = np.array([list(range(9)) + list(range(11))], np.int32)
    hidden = model.hidden_states(jnp.asarray(row), positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))
    other = row.copy()
    other[0, :9] = (other[0, :9] + 7) % 290 + 3
    hidden2 = model.hidden_states(jnp.asarray(other), positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))
    np.testing.assert_array_equal(np.asarray(hidden[0, 9:]), np.asarray(hidden2[0, 9:]))
    # ... and equals B alone in a row of its own
    alone = model.hidden_states(jnp.asarray(b.input_ids[None]))
    np.testing.assert_allclose(np.asarray(hidden[0, 9:]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)
    # Dropping the segment mask (plain causal attention over the row) lets B see A: the test above would fail.
    leaky = model.hidden_states(jnp.asarray(row), positions=jnp.asarray(pos))
    assert not np.allclose(np.asarray(leaky[0, 9:]), np.asarray(alone[0]), atol=1e-3)


def test_segment_tables_for_cudnn():
    seg = jnp.asarray([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
    lengths = jnp.asarray(batching.segment_table(np.asarray(seg), 3))
    np.testing.assert_array_equal(np.asarray(lengths), [[2, 3, 1, 0], [6, 0, 0, 0]])
    seqlens, offsets = L.Segments(seg, lengths).cudnn_tables()
    np.testing.assert_array_equal(np.asarray(seqlens), [[2, 3, 1, -1], [6, -1, -1, -1]])
    np.testing.assert_array_equal(np.asarray(offsets), [[0, 2, 5, -1, -1], [0, -1, -1, -1, -1]])


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    """LLVM's backend optimisations off for this module's many small programs (HLO semantics unchanged)."""
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def _train(family, pack, ga, calls):
    torch_model = tiny.tiny_torch_model(family)
    model = jaxsft.from_pretrained(torch_model)
    cfg = jaxsft.TrainConfig(
        learning_rate=1e-4, per_device_train_batch_size=4, gradient_accumulation_steps=ga, max_length=32,
        length_buckets=(32,), logging_steps=0, disable_tqdm=True, seed=3, packing=pack,
        lr_scheduler_type="constant", weight_decay=0.01,
        dropout=False,  # GPT-2 declares dropout; packed and plain rows would draw different masks
    )
    trainer = jaxsft.IterativeSFTTrainer(model, cfg, mesh=jaxsft.single_device_mesh())
    losses = []
    for lengths in calls:
        examples = _examples(lengths, seed=len(lengths))
        stats = trainer.step(
            input_ids=[e.input_ids for e in examples], labels=[e.labels for e in examples]
        )
        losses += stats["update_losses"]
    return losses, jax.tree.map(np.asarray, trainer.params), trainer.compiled_shapes


@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("ga", [1, 3])
@pytest.mark.slow
def test_packed_training_equals_unpacked(family, ga):
    """Per-update losses within 1e-5 relative; final weights within 1e-5 relative (per tensor, in norm:
    Adam turns float-rounding differences of near-zero gradients into element-wise noise)."""
    # 16 examples of at most 16 tokens: every micro-batch of 4 packs into 2 rows of 32 (one compiled shape).
    calls = [[5, 16, 9, 13, 3, 12, 8, 2, 15, 6, 11, 2, 14, 7, 16, 10]]
    plain_losses, plain_params, _ = _train(family, False, ga, calls)
    packed_losses, packed_params, shapes = _train(family, True, ga, calls)
    assert len(plain_losses) == (4 if ga == 1 else 2)
    np.testing.assert_allclose(packed_losses, plain_losses, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(packed_params), jax.tree.leaves(plain_params)):
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


def test_full_rows_keep_the_plain_layout_and_as_packed_converts_it():
    examples = _examples([32] * 4)
    (mb,) = batching.plan_microbatches(examples, rows=4, buckets=(32,), rng=np.random.default_rng(0), pack=True)
    assert not mb.packed and mb.input_ids.shape == (4, 32)  # packing would not save a row
    short = batching.plan_microbatches(_examples([5, 9]), rows=4, buckets=(32,), rng=np.random.default_rng(0))[0]
    packed = batching.as_packed(short, 4)
    assert packed.packed and packed.num_label_tokens == short.num_label_tokens
    np.testing.assert_array_equal(packed.segment_ids, short.attention_mask)
    assert packed.positions[0, :5].tolist() == list(range(5)) and packed.positions[0, 5:].sum() == 0
    np.testing.assert_array_equal(packed.segment_lengths[:, :2], [[5, 27], [9, 23], [32, 0], [32, 0]][: len(packed.segment_lengths)])


def test_longer_packed_rows_give_the_same_loss_and_gradients():
    """The cuDNN-only layout (rows longer than the longest example's bucket) checked here on XLA attention:
    one example per row and one long packed row give the same loss sum, label count and gradients."""
    from flax import nnx

    from jaxsft.training import step as step_fns
    from jaxsft.training.objectives import CausalSFT

    model = jaxsft.from_pretrained(tiny.tiny_torch_model("qwen2"))
    examples = _examples([9, 9, 9, 5])  # rows of 16: 9+5 | 9 | 9 (48 tokens); one row of 32 holds all (32)
    plan = lambda **kw: batching.plan_microbatches(  # noqa: E731
        examples, rows=4, buckets=(16, 32, 64), rng=np.random.default_rng(0), shuffle=False, **kw
    )[0]
    plain, long_ = plan(), plan(pack=True, longer_rows=True)
    assert plain.input_ids.shape == (4, 16) and long_.input_ids.shape == (1, 32)
    graphdef, params = nnx.split(model)
    grad_fn = jax.value_and_grad(step_fns.make_loss_fn(graphdef, CausalSFT()), has_aux=True)

    def run(mb):
        batch = {"input_ids": jnp.asarray(mb.input_ids), "labels": jnp.asarray(mb.labels)}
        if mb.packed:
            batch.update(segment_ids=jnp.asarray(mb.segment_ids), positions=jnp.asarray(mb.positions),
                         segment_lengths=jnp.asarray(mb.segment_lengths))
        (loss_sum, (count, _)), grads = grad_fn(params, batch)
        return float(loss_sum), int(count), jax.tree.leaves(grads)

    (want_loss, want_count, want_grads), (got_loss, got_count, got_grads) = run(plain), run(long_)
    assert got_count == want_count
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for got, want in zip(got_grads, want_grads):
        assert np.linalg.norm(np.asarray(got) - np.asarray(want)) <= 1e-5 * max(np.linalg.norm(np.asarray(want)), 1e-12)

