"""Training-mode dropout at the HF config's rates: on in training steps only, seeded, resumable, switchable.

GPT-2 (resid/embd/attn_pdrop 0.1 by default), Llama (attention_dropout), T5 (dropout_rate) and BART
(dropout, attention_dropout, activation_dropout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsft
import tiny
from jaxsft.models import layers as L
from tiny_seq2seq import tiny_seq2seq_model

RATES = {
    "gpt2": {},  # GPT2Config's defaults: 0.1 everywhere
    "llama": dict(attention_dropout=0.1),
    "t5": dict(dropout_rate=0.1),
    "bart": dict(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1),
}


def _model(family):
    if family in ("t5", "bart"):
        torch_model = tiny_seq2seq_model(family, vocab_size=300, **RATES[family])
    else:
        torch_model = tiny.tiny_torch_model(family, **RATES[family])
    return jaxsft.from_pretrained(torch_model, mesh=jaxsft.single_device_mesh())


def _data(family, n=4):
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, 300, int(k)) for k in (9, 12, 7, 10, 11, 8, 12, 6)[:n]]
    if family in ("t5", "bart"):
        return dict(input_ids=ids, labels=[rng.integers(3, 300, int(k)) for k in (5, 8, 6, 3, 7, 4, 8, 5)[:n]])
    return dict(input_ids=ids)


def _trainer(model, **kw):
    cfg = dict(learning_rate=1e-3, per_device_train_batch_size=4, max_length=32, disable_tqdm=True, seed=1)
    return jaxsft.IterativeSFTTrainer(model, jaxsft.TrainConfig(**{**cfg, **kw}))


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5", "bart"])
@pytest.mark.slow
def test_dropout_only_in_training_and_seeded(family):
    data = _data(family)
    spec = _model(family).spec
    assert max(getattr(spec, n, 0.0) for n in ("dropout", "attention_dropout", "embd_dropout", "resid_dropout")) > 0
    on = _trainer(_model(family))  # every trainer gets its own copy: step() trains the model passed in place
    off = _trainer(_model(family), dropout=False)
    # Evaluation never drops: deterministic and equal to the dropout-off model's, bit for bit.
    eval_on, eval_off = on.evaluate(data), off.evaluate(data)
    assert eval_on["eval_loss"] == on.evaluate(data)["eval_loss"] == eval_off["eval_loss"]
    # One micro-batch holds every example, so the seed can only change the dropout masks.
    loss_on = on.step(**data)["loss"]
    loss_again = _trainer(_model(family)).step(**data)["loss"]
    loss_seed2 = _trainer(_model(family), seed=2).step(**data)["loss"]
    loss_off = off.step(**data)["loss"]
    assert loss_on == loss_again
    assert abs(loss_on - loss_off) > 1e-3 and abs(loss_on - loss_seed2) > 1e-3
    assert loss_off == pytest.approx(eval_off["eval_loss"], rel=1e-6)  # off: the step's loss is the plain loss


@pytest.mark.parametrize("family", ["gpt2", "t5"])
@pytest.mark.slow
def test_generation_never_drops(family, tmp_path):
    tokenizer = tiny.load_tokenizer(tiny.tokenizer_dir(str(tmp_path)))
    model = _model(family)
    prompts = ["the quick brown fox", "one two three four"]
    reference = jaxsft.generate(model, tokenizer, prompts, max_new_tokens=8, eos_token_ids=[])
    trainer = jaxsft.IterativeSFTTrainer(model, jaxsft.TrainConfig(max_length=32, disable_tqdm=True), tokenizer)
    assert trainer.model.dropout  # the training view drops out in steps ...
    assert trainer.generate(prompts, max_new_tokens=8, eos_token_ids=[]) == reference  # ... never here
    assert trainer.generate(prompts, max_new_tokens=8, eos_token_ids=[]) == reference


@pytest.mark.parametrize("family", ["gpt2", "bart"])
@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_bit_for_bit(family, tmp_path):
    # 8 examples in micro-batches of 4: two updates per call (the dropout key advances within a call too),
    # through the same compiled programs as the test above (same batch size and length buckets).
    data = _data(family, 8)

    def calls(trainer, n):
        return [trainer.step(**data)["update_losses"] for _ in range(n)]

    straight = _trainer(_model(family))
    losses = calls(straight, 4)
    assert all(len(update_losses) == 2 for update_losses in losses)
    first = _trainer(_model(family))
    resumed_losses = calls(first, 2)
    path = first.save_checkpoint(str(tmp_path))
    second = _trainer(_model(family))
    second.restore_checkpoint(path)
    resumed_losses += calls(second, 2)
    assert resumed_losses == losses
    a = jax.tree.leaves(nnx.to_pure_dict(straight.params))
    b = jax.tree.leaves(nnx.to_pure_dict(second.params))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    off = _trainer(_model(family), dropout=False)
    assert calls(off, 1)[0] != losses[0]  # and dropout really was on in those runs


@pytest.mark.slow
def test_attention_with_dropout_path_equals_attention_at_rate_zero_and_drops_at_rate():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 6, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 6, 2, 8)), jnp.float32)  # GQA: 2 kv heads for 4 query heads
    v = jnp.asarray(rng.normal(size=(2, 6, 2, 8)), jnp.float32)
    mask = jnp.asarray(np.tril(np.ones((6, 6), bool))[None, None] & (np.arange(6) < 5)[None, None, None, :])
    key = jax.random.PRNGKey(0)
    for kw in (dict(mask=None, causal=True, sliding_window=None), dict(mask=None, causal=True, sliding_window=3),
               dict(mask=mask, causal=True, sliding_window=None)):
        want = L.attention(q, k, v, implementation="xla", **kw)
        got = L.attention_with_dropout(q, k, v, rate=0.0, key=key, **kw)
        np.testing.assert_allclose(got, want, atol=1e-5)
    x = jnp.ones((200, 200))
    kept = float(jnp.mean(L.dropout(x, 0.25, key) > 0))
    assert abs(kept - 0.75) < 0.01
    assert float(jnp.mean(L.dropout(x, 0.25, key))) == pytest.approx(1.0, abs=0.02)  # inverted scaling
