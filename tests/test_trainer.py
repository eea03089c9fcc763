"""Acceptance tests of jaxsft.IterativeSFTTrainer: masking, truncation, errors, schedule, eval, logging, compiles.

Losses are checked against cross entropies computed with the torch model the
jaxsft model was converted from (fp64 on its fp32 logits), on the *initial*
weights: with one micro-batch holding every example, the call's single update
loss is computed before that update is applied. rtol 1e-5 (observed ~1e-7).
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import get_scheduler

import jaxsft
from jaxsft.models.hf_io import hf_state_dict

import tiny

VOCAB = 300
EOS = 1


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    """``jax_disable_most_optimizations`` skips LLVM's backend optimisation for this module's ~15 programs
    (HLO passes, hence semantics and fusion decisions, are unchanged): compiles take ~40% less time.
    The persistent compile cache is set suite-wide in conftest.py."""
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny.load_tokenizer(tiny.tokenizer_dir(str(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def llama():
    return tiny.tiny_torch_model("llama", seed=7)


def make_config(**overrides) -> jaxsft.TrainConfig:
    """One shared baseline, so most tests reuse the same compiled programs."""
    cfg = dict(
        learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=2, max_steps=50, max_length=64, min_bucket_length=16,
        per_device_train_batch_size=8, logging_steps=1, disable_tqdm=True, seed=0,
    )
    cfg.update(overrides)
    return jaxsft.TrainConfig(**cfg)


def make_trainer(torch_model, tokenizer=None, *, mesh=None, eval_dataset=None, **overrides):
    model = jaxsft.from_pretrained(torch_model, mesh=mesh or jaxsft.single_device_mesh())
    return jaxsft.IterativeSFTTrainer(model, make_config(**overrides), tokenizer, eval_dataset=eval_dataset)


def torch_ce(torch_model, examples) -> tuple[float, int]:
    """(sum of next-token CE over non-ignored targets, their count) for (ids, labels) pairs, labels aligned."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in examples:
            logits = torch_model(torch.as_tensor(np.asarray(ids))[None]).logits[0].double()
            targets = torch.as_tensor(np.asarray(labels)[1:])
            total += F.cross_entropy(logits[:-1], targets, ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
    return total, count


def random_ids(rng, n, lo=3, hi=30):
    return [rng.integers(3, VOCAB, size=int(rng.integers(lo, hi))) for _ in range(n)]


def weights(trainer) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in hf_state_dict(trainer.model).items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def opt_state_leaves(trainer) -> list[np.ndarray]:
    return [np.array(x) for x in jax.tree.leaves(trainer._opt_state)]


# ----------------------------------------------------------------------------- masking


def test_pad_equal_to_eos_is_learned(llama):
    """Padding is found by attention_mask, not by id: with pad == eos the final EOS is a target."""
    rng = np.random.default_rng(0)
    seqs = [np.append(x, EOS) for x in random_ids(rng, 4)]
    width = max(map(len, seqs)) + 4
    ids = np.full((len(seqs), width), EOS)  # padded with the EOS id
    mask = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    trainer = make_trainer(llama)
    out = trainer.step(input_ids=ids, attention_mask=mask)

    with_eos = torch_ce(llama, [(s, s) for s in seqs])
    without_eos = torch_ce(llama, [(s, np.where(s == EOS, -100, s)) for s in seqs])  # TRL 0.23.1's masking
    assert out["num_tokens"] == with_eos[1]
    np.testing.assert_allclose(out["update_losses"][0], with_eos[0] / with_eos[1], rtol=1e-5)
    assert abs(with_eos[0] / with_eos[1] - without_eos[0] / without_eos[1]) > 1e-3  # the check discriminates


def test_pad_equal_to_eos_tokenizer_texts(llama, tokenizer):
    """A tokenizer with pad_token = eos_token: an EOS written in the completion is learned."""
    tok = tiny.load_tokenizer(tokenizer.name_or_path)
    tok.pad_token = tok.eos_token
    texts, completions = ["the quick brown", "a small cat"], [" fox jumps<|eos|>", " sleeps on a mat<|eos|>"]
    trainer = make_trainer(llama, tok)
    out = trainer.step(texts=texts, texts_labels=completions)
    examples = []
    for t, c in zip(texts, completions):
        p, q = tok(t)["input_ids"], tok(c, add_special_tokens=False)["input_ids"]
        assert q[-1] == EOS
        examples.append((p + q, [-100] * len(p) + q))
    s, n = torch_ce(llama, examples)
    assert out["num_tokens"] == n
    np.testing.assert_allclose(out["update_losses"][0], s / n, rtol=1e-5)


def test_ignored_labels(llama):
    """-100 labels are not targets; the loss is the mean CE over the others (inputs there still count)."""
    rng = np.random.default_rng(1)
    ids = random_ids(rng, 6, lo=6)
    labels = []
    for x in ids:
        lab = x.copy()
        lab[rng.random(len(x)) < 0.4] = -100
        lab[-1] = x[-1]  # keep at least one target
        labels.append(lab)
    out = make_trainer(llama).step(input_ids=ids, labels=labels)
    s, n = torch_ce(llama, list(zip(ids, labels)))
    assert out["num_tokens"] == n
    np.testing.assert_allclose(out["update_losses"][0], s / n, rtol=1e-5)
    # Given labels are honoured as given (not replaced by input_ids): here labels differ from the inputs.
    shifted = [np.roll(x, 1) for x in ids]
    out2 = make_trainer(llama).step(input_ids=ids, labels=shifted)
    s2, n2 = torch_ce(llama, list(zip(ids, shifted)))
    np.testing.assert_allclose(out2["update_losses"][0], s2 / n2, rtol=1e-5)


def test_completion_only_texts_labels(llama, tokenizer):
    texts = ["the quick brown fox", "one two three", "a small cat sleeps on"]
    completions = [" jumps over the lazy dog", " four five six seven", " a warm mat"]
    # add_eos=False: the completions exactly as given (test_loop.py covers the EOS that add_eos appends).
    out = make_trainer(llama, tokenizer, add_eos=False).step(texts=texts, texts_labels=completions)
    examples = []
    for t, c in zip(texts, completions):
        p, q = tokenizer(t)["input_ids"], tokenizer(c, add_special_tokens=False)["input_ids"]
        examples.append((p + q, [-100] * len(p) + q))
    s, n = torch_ce(llama, examples)
    assert n == sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions)
    assert out["num_tokens"] == n
    np.testing.assert_allclose(out["update_losses"][0], s / n, rtol=1e-5)
    # Without texts_labels every text token is learned.
    out_all = make_trainer(llama, tokenizer).step(texts=texts)
    s_all, n_all = torch_ce(llama, [(tokenizer(t)["input_ids"],) * 2 for t in texts])
    assert out_all["num_tokens"] == n_all
    np.testing.assert_allclose(out_all["update_losses"][0], s_all / n_all, rtol=1e-5)


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_truncation(llama, tokenizer, mode):
    """Each sequence (not the batch) is cut to max_length tokens: the last (keep_end) or the first (keep_start)."""
    L = 16  # the 16 bucket of the shared baseline: no new program
    rng = np.random.default_rng(2)
    ids = random_ids(rng, 5, lo=20, hi=36) + [rng.integers(3, VOCAB, size=7)]  # one short example stays whole
    labels = [np.where(np.arange(len(x)) % 3 == 0, -100, x) for x in ids]
    cut = (lambda a: a[-L:]) if mode == "keep_end" else (lambda a: a[:L])
    trainer = make_trainer(llama, truncation_mode=mode, max_length=L)
    with pytest.warns(UserWarning, match=rf"5 of 6 examples were longer than max_length={L} tokens and were cut") as seen:
        out = trainer.step(input_ids=ids, labels=labels)
    assert sum("were cut" in str(w.message) for w in seen) == 1  # once per call
    assert out["truncated_examples"] == 5
    s, n = torch_ce(llama, [(cut(x), cut(y)) for x, y in zip(ids, labels)])
    assert out["num_tokens"] == n
    np.testing.assert_allclose(out["update_losses"][0], s / n, rtol=1e-5)

    texts = ["the quick brown fox jumps over the lazy dog while a small cat sleeps", "one two three"]
    trainer = make_trainer(llama, tokenizer, truncation_mode=mode, max_length=L)
    out = trainer.step(texts=texts)
    toks = [np.asarray(tokenizer(t)["input_ids"]) for t in texts]
    assert len(toks[0]) > L
    s, n = torch_ce(llama, [(cut(x), cut(x)) for x in toks])
    np.testing.assert_allclose(out["update_losses"][0], s / n, rtol=1e-5)


@pytest.mark.slow
def test_all_masked_batch_changes_nothing(llama):
    trainer = make_trainer(llama, per_device_train_batch_size=2)
    rng = np.random.default_rng(3)
    trainer.step(input_ids=random_ids(rng, 2))  # an optimizer state that is not all zeros
    before_w, before_opt, step = weights(trainer), opt_state_leaves(trainer), trainer.state.global_step
    ids = random_ids(rng, 3) + [np.asarray([5])]  # a one-token example has no target either
    labels = [np.full(len(x), -100) for x in ids[:3]] + [np.asarray([5])]
    with pytest.warns(UserWarning, match="no label tokens"):
        out = trainer.step(input_ids=ids, labels=labels)
    assert out["num_updates"] == 0 and out["num_tokens"] == 0 and out["update_losses"] == []
    assert out["loss"] == 0.0 and out["grad_norm"] is None
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in out.values())
    assert trainer.state.global_step == step
    assert_same_weights(weights(trainer), before_w)
    for a, b in zip(opt_state_leaves(trainer), before_opt):
        assert np.array_equal(a, b)
    for w in weights(trainer).values():
        assert np.isfinite(w).all()

    # Mixed: the masked update is skipped, the other applied (GA=1, one example per micro-batch).
    trainer = make_trainer(llama, per_device_train_batch_size=1)
    good = rng.integers(3, VOCAB, size=9)
    with pytest.warns(UserWarning, match="no label tokens"):
        out = trainer.step(input_ids=[good, good], labels=[good, np.full(9, -100)])
    assert out["num_updates"] == 1 and trainer.state.global_step == 1
    s, n = torch_ce(llama, [(good, good)])
    np.testing.assert_allclose(out["loss"], s / n, rtol=1e-5)


# ----------------------------------------------------------------------------- stats, errors


def test_stats_dict(llama):
    trainer = make_trainer(llama, gradient_accumulation_steps=2)
    out = trainer.step(input_ids=random_ids(np.random.default_rng(4), 20))
    expected = {
        "loss": float, "learning_rate": float, "grad_norm": float, "num_tokens": int, "update_losses": list,
        "num_updates": int, "skipped_updates": int, "num_microbatches": int, "truncated_examples": int,
        "global_step": int, "tokens_per_second": float,
        "seconds": float, "compiled_shapes": int, "compile_seconds": float,
    }
    assert set(out) == set(expected)
    for key, typ in expected.items():
        assert type(out[key]) is typ, (key, type(out[key]))
    assert out["num_microbatches"] == 3 and out["num_updates"] == 2 and out["global_step"] == 2  # 8+8 | 4
    assert out["truncated_examples"] == 0
    assert len(out["update_losses"]) == 2 and all(type(x) is float for x in out["update_losses"])
    assert out["learning_rate"] == pytest.approx(1e-3) and out["grad_norm"] > 0 and out["tokens_per_second"] > 0
    assert trainer.state.num_input_tokens_seen > trainer.state.total_label_tokens == out["num_tokens"]


# input_ids=[] and a 0-row array are no longer bad calls: an empty round trains nothing, with a warning
# (issue 15; tests/test_loop.py::test_empty_step_trains_nothing_and_warns checks those inputs change nothing).
BAD_CALLS = [
    (dict(input_ids=[[5, 6, 7], [8, 9]], attention_mask=[[1, 1, 1]]), "attention_mask"),
    (dict(input_ids=[[5, 6, 7], [8, 9]], labels=[[5, 6, 7]]), "labels"),
    (dict(input_ids=[[5, 6, 7]], labels=[[5, 6]]), "labels"),
    (dict(input_ids=[[5, 6, 7]], attention_mask=[[1, 1]]), "attention_mask"),
    (dict(input_ids=[[5, 6, VOCAB]]), "input_ids"),
    (dict(input_ids=[[5, 6, 7]], labels=[[5, VOCAB + 3, 7]]), "labels"),
    (dict(input_ids=[[5, -1, 7]]), "input_ids"),
    (dict(input_ids=[[5, 6, 7]], labels=[[5, -5, 7]]), "labels"),
    (dict(input_ids=[[5, 6, 7]], attention_mask=[[1, 2, 1]]), "attention_mask"),
    (dict(input_ids=[[5.0, 6.0, 7.0]]), "input_ids"),
    (dict(input_ids=[[5, 6, 7]], attention_mask=[[0, 0, 0]]), "input_ids"),
    (dict(), "input_ids"),
    (dict(texts_labels=["x"], input_ids=[[5, 6, 7]]), "texts_labels"),
    (dict(texts=["the fox"]), "tokenizer"),
    (dict(texts="the fox"), "texts"),
]


def test_bad_inputs_raise_before_any_state_change(llama, tokenizer):
    rng = np.random.default_rng(5)
    good = random_ids(rng, 5)
    a = make_trainer(llama, per_device_train_batch_size=2)
    b = make_trainer(llama, per_device_train_batch_size=2)
    a.step(input_ids=good)
    b.step(input_ids=good)
    before = weights(a)
    rng_state = a._rng.bit_generator.state
    for kwargs, name in BAD_CALLS:
        with pytest.raises((ValueError, TypeError), match=name):
            a.step(**kwargs)
    assert a.state.global_step == b.state.global_step == 3 and a.state.log_history == b.state.log_history
    assert_same_weights(weights(a), before)
    assert a._rng.bit_generator.state == rng_state
    # The next call shuffles exactly as it would have without the failed calls.
    out_a, out_b = a.step(input_ids=good), b.step(input_ids=good)
    assert out_a["update_losses"] == out_b["update_losses"]
    assert_same_weights(weights(a), weights(b))

    with_tok = make_trainer(llama, tokenizer)
    for kwargs, name in [
        (dict(texts=["a", "b"], texts_labels=["x"]), "texts_labels"),
        (dict(texts=["a", 3]), "texts"),
        (dict(texts=[], texts_labels=["x"]), "texts"),  # texts=[] alone is an empty round (test_loop.py)
        (dict(texts=["the fox"], input_ids=[[5, 6]]), "input_ids"),
        (dict(texts=["the fox"], labels=[[5, 6]]), "labels"),
    ]:
        with pytest.raises((ValueError, TypeError), match=name):
            with_tok.step(**kwargs)
    assert with_tok.state.global_step == 0


def test_caller_model_is_trained_in_place(llama):
    """The model passed in stays usable (its donated arrays are replaced) and holds the trained weights."""
    model = jaxsft.from_pretrained(llama, mesh=jaxsft.single_device_mesh())
    trainer = jaxsft.IterativeSFTTrainer(model, make_config())
    trainer.step(input_ids=random_ids(np.random.default_rng(6), 3))
    ids = np.asarray([[5, 6, 7, 8]])
    # Same weights (checked exactly below); the caller's model runs its own (scanned) layer loop and the
    # trainer's view the unrolled one, so logits agree to float rounding rather than bit for bit.
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(trainer.model(ids)), rtol=1e-6, atol=1e-6)
    assert_same_weights(hf_state_dict(model), weights(trainer))


# ----------------------------------------------------------------------------- schedule, eval, logging


@pytest.mark.slow
def test_no_horizon_warns_and_trains_at_constant_rate(llama):
    with pytest.warns(UserWarning, match="max_steps"):
        trainer = make_trainer(llama, max_steps=-1, warmup_steps=0, per_device_train_batch_size=2)
    w0 = weights(trainer)
    rng = np.random.default_rng(7)
    rates = []
    for _ in range(3):
        out = trainer.step(input_ids=random_ids(rng, 4))
        rates.append(out["learning_rate"])
    assert rates == [pytest.approx(1e-3)] * 3
    assert [h["learning_rate"] for h in trainer.state.log_history] == [pytest.approx(1e-3)] * 6
    w1 = weights(trainer)
    assert all(np.abs(w1[k] - w0[k]).max() > 1e-4 for k in w0)


def test_evaluate_matches_torch_and_changes_nothing(llama):
    rng = np.random.default_rng(8)
    ids = random_ids(rng, 11, lo=17)  # all in the 32 bucket: one eval program
    labels = [np.where(np.arange(len(x)) < 2, -100, x) for x in ids]
    trainer = make_trainer(llama)  # 2 eval micro-batches of 8 rows, the second with filler rows
    rng_state, w0 = trainer._rng.bit_generator.state, weights(trainer)
    metrics = trainer.evaluate({"input_ids": ids, "labels": labels})
    s, n = torch_ce(llama, list(zip(ids, labels)))
    np.testing.assert_allclose(metrics["eval_loss"], s / n, rtol=1e-5)
    assert metrics["eval_num_tokens"] == n
    assert trainer._rng.bit_generator.state == rng_state and trainer.state.global_step == 0
    assert_same_weights(weights(trainer), w0)
    # A plain list of token arrays: every token is a target.
    s2, n2 = torch_ce(llama, [(x, x) for x in ids])
    np.testing.assert_allclose(trainer.evaluate(ids)["eval_loss"], s2 / n2, rtol=1e-5)


def test_eval_steps_measure_the_weights_of_that_update(llama):
    """eval at step k evaluates the weights right after update k, not those at the end of the step() call."""
    rng = np.random.default_rng(9)
    x = rng.integers(3, VOCAB, size=12)
    held_out = random_ids(rng, 3, lo=17)
    a = make_trainer(llama, per_device_train_batch_size=1, eval_steps=1, logging_steps=0, eval_dataset=held_out)
    a.step(input_ids=[x, x, x])  # identical examples: three updates whatever the shuffle
    evals = [h for h in a.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [1, 2, 3]
    b = make_trainer(llama, per_device_train_batch_size=1)
    for k in range(3):
        b.step(input_ids=[x])
        np.testing.assert_allclose(evals[k]["eval_loss"], b.evaluate(held_out)["eval_loss"], rtol=1e-6)
    assert len({h["eval_loss"] for h in evals}) == 3


def test_log_history_every_logging_steps(llama):
    trainer = make_trainer(llama, logging_steps=3, per_device_train_batch_size=2)  # linear, warmup 2, max_steps 50
    rng = np.random.default_rng(10)
    losses = []
    for n in (5, 4, 3):  # 3 + 2 + 2 = 7 updates
        losses += trainer.step(input_ids=random_ids(rng, n))["update_losses"]
    assert trainer.state.global_step == 7
    history = trainer.state.log_history
    assert [h["step"] for h in history] == [3, 6]
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1e-3)
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=50)
    hf_rates = []
    for _ in range(7):
        opt.step()
        sched.step()
        hf_rates.append(sched.get_last_lr()[0])  # what HF Trainer logs after update k
    for h in history:
        assert set(h) == {"loss", "learning_rate", "grad_norm", "step"}
        k = h["step"]
        assert h["loss"] == round(float(np.mean(losses[k - 3 : k])), 4)
        assert h["learning_rate"] == pytest.approx(hf_rates[k - 1], rel=1e-6)
        assert isinstance(h["grad_norm"], float) and h["grad_norm"] > 0


@pytest.mark.slow
def test_clipping_off_at_zero_and_none(llama):
    """max_grad_norm 0 or None: no clipping (HF semantics; TRL 0.23.1 zeroed the gradients at 0)."""
    rng = np.random.default_rng(14)
    calls = [random_ids(rng, 4, hi=16) for _ in range(3)]  # the 16 bucket only
    results = {}
    for clip in (None, 0.0, 1e-3):
        trainer = make_trainer(llama, per_device_train_batch_size=2, max_grad_norm=clip)
        for ids in calls:
            trainer.step(input_ids=ids)
        results[clip] = weights(trainer), [h["grad_norm"] for h in trainer.state.log_history]
    assert_same_weights(results[None][0], results[0.0][0])
    assert len(results[None][1]) == 6 and min(results[None][1]) > 1e-3  # clipping at 1e-3 acts on every update
    clipped, unclipped = results[1e-3][0], results[None][0]
    assert max(float(np.abs(clipped[k] - unclipped[k]).max()) for k in clipped) > 1e-5  # ... and changes training


# ----------------------------------------------------------------------------- numerics modes


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_training(llama):
    rng = np.random.default_rng(11)
    calls = [random_ids(rng, n, hi=16) for n in (5, 3)]  # the 16 bucket only
    runs = []
    for remat in (False, True):
        trainer = make_trainer(llama, gradient_checkpointing=remat, per_device_train_batch_size=2)
        losses = [l for ids in calls for l in trainer.step(input_ids=ids)["update_losses"]]
        runs.append((losses, weights(trainer)))
    np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=1e-6)
    for k in runs[0][1]:
        np.testing.assert_allclose(runs[1][1][k], runs[0][1][k], rtol=0, atol=1e-6)


def test_bf16_trains(llama):
    trainer = make_trainer(llama, bf16=True, learning_rate=3e-3)
    batch = random_ids(np.random.default_rng(12), 4, lo=17)
    losses = [trainer.step(input_ids=batch)["loss"] for _ in range(8)]
    assert all(math.isfinite(l) for l in losses)
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(np.isfinite(w).all() for w in weights(trainer).values())


# ----------------------------------------------------------------------------- compiles


@pytest.mark.parametrize("ga,extra", [(1, 0), (2, 2)])
@pytest.mark.slow
def test_no_recompiles_beyond_buckets(llama, ga, extra):
    """60 calls of random sizes compile at most one program per bucket (+ zeros and apply with accumulation)."""
    trainer = make_trainer(llama, gradient_accumulation_steps=ga, max_length=64, logging_steps=0)
    assert trainer.buckets == (16, 24, 32, 48, 64)  # the default: powers of two and three halves of each
    rng = np.random.default_rng(ga)
    for _ in range(60):
        n = int(rng.integers(1, 41))
        out = trainer.step(input_ids=[rng.integers(3, VOCAB, size=int(rng.integers(3, 65))) for _ in range(n)])
        assert out["compiled_shapes"] <= len(trainer.buckets) + extra
    assert trainer.compiled_shapes <= len(trainer.buckets) + extra


@pytest.mark.parametrize("ga", [1, 2])
def test_a_call_compiles_its_new_programs_side_by_side_before_running(llama, ga, monkeypatch):
    """Three new shapes in one call: all compiled ahead on worker threads, under the keys the run looks up
    (a key mismatch would compile again while running and count extra programs)."""
    import threading

    import time

    spans, calls = [], []
    real_compile = jax.stages.Lowered.compile

    def recording_compile(self, *args, **kwargs):
        calls.append(threading.current_thread() is threading.main_thread())
        start = time.perf_counter()
        time.sleep(0.5)  # a compile as slow as a real model's, so side by side shows as overlap
        out = real_compile(self, *args, **kwargs)
        spans.append((start, time.perf_counter()))
        return out

    rng = np.random.default_rng(0)
    # Lengths 10, 20, 40 twice each: with micro-batch 2 and no shuffling luck needed, buckets 16, 32 and 64 all appear.
    batch = [rng.integers(3, VOCAB, size=n) for n in (10, 10, 20, 20, 40, 40)]
    monkeypatch.setattr(jax.stages.Lowered, "compile", recording_compile)
    trainer = make_trainer(llama, gradient_accumulation_steps=ga, per_device_train_batch_size=1, max_length=64)
    got = trainer.step(input_ids=batch)
    programs = 3 if ga == 1 else 3 + 2  # one per bucket (+ zeros and apply with accumulation)
    assert trainer.compiled_shapes == programs
    assert len(calls) == programs and not any(calls)  # every compile ahead, none on the main thread
    spans.sort()
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))  # compiles overlapped in time
    assert got["num_updates"] == 6 // ga and all(math.isfinite(l) for l in got["update_losses"])
    calls.clear()
    trainer.step(input_ids=batch)
    assert not calls  # a second call of the same shapes compiles nothing


def test_stats_report_the_seconds_a_call_spent_compiling(llama, monkeypatch):
    """``compile_seconds``: the part of a call's ``seconds`` spent on its new programs (here each compile is held
    0.4 s, so a wrong clock shows); 0.0 for a call whose shapes are built; a new shape costs time again."""
    import time

    real_compile = jax.stages.Lowered.compile

    def slow_compile(self, *args, **kwargs):
        time.sleep(0.4)
        return real_compile(self, *args, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", slow_compile)
    rng = np.random.default_rng(4)
    trainer = make_trainer(llama)
    first = trainer.step(input_ids=[rng.integers(3, VOCAB, size=12) for _ in range(8)])
    assert 0.4 <= first["compile_seconds"] <= first["seconds"]
    again = trainer.step(input_ids=[rng.integers(3, VOCAB, size=12) for _ in range(8)])
    assert again["compile_seconds"] == 0.0 and again["compiled_shapes"] == first["compiled_shapes"]
    longer = trainer.step(input_ids=[rng.integers(3, VOCAB, size=40) for _ in range(8)])  # a new bucket
    assert longer["compiled_shapes"] > first["compiled_shapes"] and 0.4 <= longer["compile_seconds"] <= longer["seconds"]


def test_the_first_call_copies_the_starting_weights_while_its_program_compiles(llama, monkeypatch):
    """The host copy of the starting weights (reset()) is taken once, on the main thread, while the call's
    program compiles on a worker thread (one new program included), not after it; reset() still returns
    the weights the trainer started from."""
    import threading
    import time

    from jaxsft.training import trainer as trainer_module
    from jaxsft.training.train_state import HostSnapshot

    compiles, snapshots = [], []
    real_compile = jax.stages.Lowered.compile

    def slow_compile(self, *args, **kwargs):
        start = time.perf_counter()
        time.sleep(0.5)  # a compile as slow as a real model's, so the overlap shows
        out = real_compile(self, *args, **kwargs)
        compiles.append((start, time.perf_counter(), threading.current_thread() is threading.main_thread()))
        return out

    class RecordingSnapshot(HostSnapshot):
        @classmethod
        def of(cls, tree):
            start = time.perf_counter()
            out = HostSnapshot.of(tree)
            snapshots.append((start, time.perf_counter(), threading.current_thread() is threading.main_thread()))
            return out

    monkeypatch.setattr(jax.stages.Lowered, "compile", slow_compile)
    monkeypatch.setattr(trainer_module, "HostSnapshot", RecordingSnapshot)
    rng = np.random.default_rng(3)
    trainer = make_trainer(llama)
    start_weights = weights(trainer)
    trainer.step(input_ids=[rng.integers(3, VOCAB, size=12) for _ in range(8)])  # one micro-batch: one program
    assert len(compiles) == 1 and not compiles[0][2]  # compiled ahead, on a worker thread
    assert len(snapshots) == 1 and snapshots[0][2]
    (compile_start, compile_end, _), (snap_start, _, _) = compiles[0], snapshots[0]
    assert compile_start < snap_start < compile_end  # taken while the program compiled
    trainer.step(input_ids=[rng.integers(3, VOCAB, size=12) for _ in range(8)])
    assert len(snapshots) == 1 and len(compiles) == 1  # once per trainer; the same shape compiles nothing
    assert any(not np.array_equal(w, start_weights[k]) for k, w in weights(trainer).items())  # it trained
    trainer.reset()
    assert_same_weights(weights(trainer), start_weights)


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("axes", [(8, 1, 1), (2, 2, 2)], ids=["data8", "data2-fsdp2-tensor2"])
def test_sharded_mesh_trains_like_one_device(llama, axes):
    """The global micro-batch is per_device_train_batch_size x (data x fsdp) rows; training matches one device."""
    mesh = jaxsft.make_mesh(*axes)
    rows = axes[0] * axes[1]
    rng = np.random.default_rng(13)
    calls = [random_ids(rng, n) for n in (11, 6)]
    sharded = make_trainer(llama, mesh=mesh, per_device_train_batch_size=8 // rows)
    single = make_trainer(llama, per_device_train_batch_size=8)
    assert sharded.rows == single.rows == 8
    for ids in calls:
        a, b = sharded.step(input_ids=ids), single.step(input_ids=ids)
        np.testing.assert_allclose(a["update_losses"], b["update_losses"], rtol=1e-5)
    wa, wb = weights(sharded), weights(single)
    for k in wb:
        np.testing.assert_allclose(wa[k], wb[k], rtol=0, atol=2e-5 * max(1.0, float(np.abs(wb[k]).max())))


# ----------------------------------------------------------------------------- reset


@pytest.mark.parametrize("ga", [1, 2])
def test_reset_returns_to_the_start_and_recompiles_nothing(llama, ga):
    """reset(): the starting weights, a fresh optimizer state, step 0, the seeded RNG and an empty log, so the
    same calls afterwards repeat the first run bit for bit; no program (jitted optimizer init included) compiles."""
    rng = np.random.default_rng(21)
    calls = [random_ids(rng, n) for n in (11, 6)]
    trainer = make_trainer(llama, gradient_accumulation_steps=ga, per_device_train_batch_size=4)
    start_weights, start_opt = weights(trainer), opt_state_leaves(trainer)
    first = [trainer.step(input_ids=ids) for ids in calls]
    first_weights, first_logs = weights(trainer), list(trainer.state.log_history)
    assert trainer.state.global_step > 0 and first_logs
    generated = trainer.state.generate_calls = 3  # as if generate() had run: kept, so later rounds sample afresh

    compiles: list[str] = []

    def on_event(name, *args, **kwargs):
        if "compil" in name:
            compiles.append(name)

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        programs = trainer.compiled_shapes
        log = trainer.state.log_history
        trainer.reset()
        assert log is trainer.state.log_history and log == []  # emptied in place (the facade holds the list)
        assert trainer.state.global_step == 0 and trainer.state.num_input_tokens_seen == 0
        assert trainer.state.total_label_tokens == 0 and trainer.state.loss_since_log == []
        assert trainer.state.generate_calls == generated
        assert_same_weights(weights(trainer), start_weights)
        assert all(np.array_equal(a, b) for a, b in zip(opt_state_leaves(trainer), start_opt))
        assert trainer.current_learning_rate() == trainer.learning_rate_at(0)
        again = [trainer.step(input_ids=ids) for ids in calls]
    finally:
        jax.monitoring.unregister_event_listener(on_event)
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert not compiles, compiles
    assert trainer.compiled_shapes == programs
    for a, b in zip(first, again):
        assert a["update_losses"] == b["update_losses"]
    assert_same_weights(weights(trainer), first_weights)
    assert trainer.state.log_history == first_logs
    trainer.reset()  # twice: the kept starting weights were not consumed by the first reset
    assert_same_weights(weights(trainer), start_weights)


def test_reset_before_training_and_after_load_state_dict(llama):
    """A trainer that never trained resets its counters only; load_state_dict keeps the weights it replaced as the start."""
    rng = np.random.default_rng(22)
    ids = random_ids(rng, 8)
    donor = make_trainer(llama)
    donor.step(input_ids=ids)
    trainer = make_trainer(llama)
    start = weights(trainer)
    trainer.reset()
    assert_same_weights(weights(trainer), start)
    trainer.load_state_dict(donor.state_dict())
    assert trainer.state.global_step == 1
    trainer.reset()
    assert trainer.state.global_step == 0
    assert_same_weights(weights(trainer), start)


def test_keep_start_cutting_a_whole_completion_says_so(llama):
    """A completion entirely beyond max_length under keep_start: the warning says plainly nothing is learned from it."""
    prompt, completion = list(range(3, 23)), [40, 41, 42]
    labels = [-100] * len(prompt) + completion
    trainer = make_trainer(llama, truncation_mode="keep_start", max_length=16)
    with pytest.warns(UserWarning) as seen:
        out = trainer.step(input_ids=[prompt + completion, [5, 6, 7, 8]], labels=[labels, [5, 6, 7, 8]])
    messages = [str(w.message) for w in seen if "were cut" in str(w.message)]
    assert len(messages) == 1 and "1 of them lost every label token" in messages[0] and "keep_end" in messages[0]
    assert out["truncated_examples"] == 1
