"""T5 and BART through jaxsft.IterativeSFTTrainer against a hand-written torch loop (fp32, dropout off, CPU).

The torch loop follows the documented semantics: the per-call shuffle
(``np.random.default_rng(seed).permutation(n)``), micro-batches of
``per_device_train_batch_size`` examples, updates of ``gradient_accumulation_steps``
micro-batches, update loss = sum of the decoder's token cross entropies over the
update / its label tokens, where the decoder reads the labels shifted right
(transformers shifts them itself when given ``labels``), torch AdamW with HF
Trainer's decay groups, ``clip_grad_norm_`` and the linear schedule with warmup.
Tolerances are those of tests/test_trainer_parity.py (see its docstring).
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from transformers import Trainer, get_scheduler

import jaxsft
from jaxsft.training import batching
from jaxsft.models.hf_io import export_params, hf_state_dict
from jaxsft.training.optim import decay_mask
from tiny_seq2seq import tiny_seq2seq_model

SEED, LR, WD, WARMUP, CLIP, MAX_STEPS = 7, 1e-3, 0.01, 2, 1.0, 14


def _calls(vocab: int, counts, seed: int):
    """Per call: (src, labels) examples, encoder lengths 2..14 and target lengths 1..12 (some -100 inside)."""
    rng = np.random.default_rng(seed)
    calls = []
    for c, n in enumerate(counts):
        examples = []
        for _ in range(n):
            src = rng.integers(3, vocab, int(rng.integers(2, 15)))
            lab = rng.integers(3, vocab, int(rng.integers(1, 13)))
            if lab.size > 3 and rng.random() < 0.3:
                lab[1] = -100
            examples.append((src, lab))
        calls.append(examples)
    return calls


def _step_kwargs(examples, as_array: bool, pad: int):
    if not as_array:
        return dict(input_ids=[s for s, _ in examples], labels=[l for _, l in examples])
    width, lwidth = max(len(s) for s, _ in examples), max(len(l) for _, l in examples)
    ids = np.full((len(examples), width), pad)
    mask = np.zeros_like(ids)
    labels = np.full((len(examples), lwidth), -100)
    for i, (s, l) in enumerate(examples):
        ids[i, : len(s)], mask[i, : len(s)], labels[i, : len(l)] = s, 1, l
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _config(bs: int, ga: int) -> jaxsft.TrainConfig:
    return jaxsft.TrainConfig(
        learning_rate=LR, weight_decay=WD, warmup_steps=WARMUP, max_grad_norm=CLIP, max_steps=MAX_STEPS,
        per_device_train_batch_size=bs, gradient_accumulation_steps=ga, seed=SEED, max_length=16,
        min_bucket_length=8, logging_steps=1, disable_tqdm=True, dropout=False,
    )


def torch_reference(torch_model, calls, *, bs: int, ga: int):
    model = copy.deepcopy(torch_model).train()  # train mode, as HF trains; dropout rates are 0 here
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = list(model.named_parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in named if n in decay], "weight_decay": WD},
         {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}],
        lr=LR, betas=(0.9, 0.999), eps=1e-8,
    )
    sched = get_scheduler("linear", opt, num_warmup_steps=WARMUP, num_training_steps=MAX_STEPS)
    rng = np.random.default_rng(SEED)
    losses, norms = [], []
    for examples in calls:
        ordered = [examples[int(i)] for i in rng.permutation(len(examples))]
        micro = [ordered[i : i + bs] for i in range(0, len(ordered), bs)]
        for u in range(0, len(micro), ga):
            update = [e for mb in micro[u : u + ga] for e in mb]
            total = sum(int((lab != -100).sum()) for _, lab in update)
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for src, lab in update:
                labels = torch.as_tensor(lab)[None]
                logits = model(input_ids=torch.as_tensor(src)[None], labels=labels).logits[0]
                ce = F.cross_entropy(logits, labels[0], ignore_index=-100, reduction="sum")
                (ce / total).backward()
                loss_sum += ce.item()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
            opt.step()
            sched.step()
            losses.append(loss_sum / total)
    return losses, norms, {k: v.detach().numpy() for k, v in model.state_dict().items()}


CASES = [("t5v11", 1, 3, [7, 5, 6]), ("t5v11", 3, 2, [9, 7, 8]), ("bart", 1, 3, [7, 5, 6]), ("bart", 3, 2, [9, 7, 8])]


@pytest.mark.parametrize("family,ga,bs,counts", CASES, ids=[f"{c[0]}-ga{c[1]}" for c in CASES])
@pytest.mark.slow
def test_matches_torch_loop(family, ga, bs, counts):
    torch_model = tiny_seq2seq_model(family, seed=3)
    calls = _calls(120, counts, seed=ga)
    pad = torch_model.config.pad_token_id
    model = jaxsft.from_pretrained(torch_model, mesh=jaxsft.single_device_mesh())
    # One length bucket (16): every micro-batch is padded, differently per row, in one program per
    # accumulation setting; what several buckets add is test_buckets_are_independent_and_nothing_recompiles's.
    trainer = jaxsft.IterativeSFTTrainer(model, dataclasses.replace(_config(bs, ga), min_bucket_length=16))
    jax_losses = []
    for c, examples in enumerate(calls):
        jax_losses += trainer.step(**_step_kwargs(examples, as_array=c % 2 == 1, pad=pad))["update_losses"]
    ref_losses, ref_norms, ref_state = torch_reference(torch_model, calls, bs=bs, ga=ga)

    assert len(ref_losses) >= 5 and trainer.state.global_step == len(ref_losses)
    np.testing.assert_allclose(jax_losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose([h["grad_norm"] for h in trainer.state.log_history], ref_norms, rtol=1e-5)
    assert max(ref_norms) > CLIP, "clipping should be active in at least one update"

    got = hf_state_dict(trainer.model)
    init = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    for name, _ in torch_model.named_parameters():
        want, diff = ref_state[name], got[name] - ref_state[name]
        assert np.abs(diff).max() <= 2e-2 * LR, f"{name}: max |jax - torch| = {np.abs(diff).max():.3g}"
        if name.endswith("k_proj.bias"):
            continue  # zero gradient in exact arithmetic (softmax is shift-invariant): rounding noise only
        moved = want - init[name]
        assert np.linalg.norm(diff) <= 1e-5 * np.linalg.norm(want), f"{name}: relative error vs weights"
        assert np.linalg.norm(diff) <= 1e-4 * np.linalg.norm(moved), f"{name}: relative error vs update"
    np.testing.assert_array_equal(got.get("final_logits_bias", 0), init.get("final_logits_bias", 0))  # a buffer


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_decay_mask_matches_hf_groups(family):
    torch_model = tiny_seq2seq_model(family)
    model = jaxsft.from_pretrained(torch_model, mesh=jaxsft.single_device_mesh())
    params = nnx.state(model, nnx.Param)
    mask = nnx.to_pure_dict(decay_mask(params))
    filled = jax.tree.map(lambda m, p: np.full(p.shape, 1.0 if bool(m) else 0.0, np.float32), mask,
                          nnx.to_pure_dict(params))
    exported = export_params(model.spec, filled)
    named = [n for n, _ in torch_model.named_parameters()]
    jax_decay = {n for n in named if exported[n].flat[0] == 1.0}
    assert jax_decay == set(Trainer.get_decay_parameter_names(None, torch_model)) & set(named)


@pytest.mark.slow
def test_buckets_are_independent_and_nothing_recompiles():
    model = jaxsft.from_pretrained(tiny_seq2seq_model("t5"), mesh=jaxsft.single_device_mesh())
    trainer = jaxsft.IterativeSFTTrainer(model, _config(2, 1))
    rng = np.random.default_rng(0)

    def call(src_len, lab_len):
        return trainer.step(input_ids=[rng.integers(3, 120, src_len) for _ in range(2)],
                            labels=[rng.integers(3, 120, lab_len) for _ in range(2)])

    call(12, 3)
    assert trainer.compiled_shapes == 1
    call(9, 5)  # same buckets (16, 8): no new program
    assert trainer.compiled_shapes == 1
    call(5, 12)  # both buckets change: one more
    assert trainer.compiled_shapes == 2
    call(6, 7)
    call(13, 16)
    assert trainer.compiled_shapes == 4  # (16,8), (8,16), (8,8), (16,16)


def test_decoder_inputs_are_labels_shifted_right_as_transformers():
    from transformers.models.bart.modeling_bart import shift_tokens_right

    labels = np.asarray([[5, 6, -100, 7], [8, -100, -100, -100]])
    want = shift_tokens_right(torch.as_tensor(labels), pad_token_id=1, decoder_start_token_id=2).numpy()
    np.testing.assert_array_equal(batching.shift_right(labels, 2, 1), want)


def test_step_without_labels_is_refused_with_trls_message_before_anything_changes():
    model = jaxsft.from_pretrained(tiny_seq2seq_model("t5"), mesh=jaxsft.single_device_mesh())
    trainer = jaxsft.IterativeSFTTrainer(model, _config(2, 1))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(trainer.params))
    rng_state = trainer._rng.bit_generator.state
    with pytest.raises(ValueError, match=r"^No 'labels' or 'texts_labels' are provided\. When using an encoder-decoder "
                                         r"architecture, 'labels' or 'texts_labels' must be passed: labels=\.\.\. "
                                         r"with input_ids, texts_labels=\.\.\. with texts\.$"):
        trainer.step(input_ids=[np.arange(3, 9)])
    with pytest.raises(ValueError, match="No 'labels' or 'texts_labels'"):
        trainer.step(texts=["a b"])
    assert trainer.state.global_step == 0 and trainer.compiled_shapes == 0
    assert trainer._rng.bit_generator.state == rng_state
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(trainer.params))
    jax.tree.map(np.testing.assert_array_equal, before, after)


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.slow
def test_sharded_mesh_trains_as_one_device(family):
    """data x fsdp x tensor = 2 x 2 x 2: the rules table places every seq2seq parameter kind (rel_buckets included).

    One length bucket (16) for sources and targets: one program per trainer (bucket choice is
    test_buckets_are_independent_and_nothing_recompiles's subject; here it would only add compiles)."""
    torch_model = tiny_seq2seq_model(family, seed=1)
    calls = _calls(120, [8, 8], seed=5)
    results = []
    for mesh, bs in ((jaxsft.single_device_mesh(), 4), (jaxsft.make_mesh(data=2, fsdp=2, tensor=2), 1)):
        config = dataclasses.replace(_config(bs, 1), min_bucket_length=16)
        trainer = jaxsft.IterativeSFTTrainer(jaxsft.from_pretrained(torch_model, mesh=mesh), config, mesh=mesh)
        losses = [l for examples in calls for l in trainer.step(**_step_kwargs(examples, False, 0))["update_losses"]]
        assert trainer.compiled_shapes == 1
        results.append((losses, hf_state_dict(trainer.model)))
    (one, w1), (many, w8) = results
    np.testing.assert_allclose(many, one, rtol=1e-5)
    for key in w1:
        np.testing.assert_allclose(w8[key], w1[key], atol=2e-5, err_msg=key)
