"""compat.IterativeSFTTrainer with AutoModelForSeq2SeqLM models (tiny T5 / BART, CPU).

TRL 0.23.1's two T5 test cases (tensor and text inputs) with real assertions, TRL's documented seq2seq
behaviour (texts_labels are the decoder targets; TRL's code tokenized texts twice) and
DataCollatorForSeq2Seq semantics (labels of their own length, padded with -100, pad id masked).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DataCollatorForSeq2Seq, TrainingArguments

import tiny
from compat import IterativeSFTTrainer
from tiny_seq2seq import tiny_seq2seq_model

# TRL's dummy data, with ids that fit the tiny 300-token tokenizer.
TRL_TENSOR_INPUTS = [[53, 36, 66, 14, 18], [66, 14, 18, 66, 14, 18], [53, 36, 66, 14, 18]]
TRL_TEXTS = ["Testing the IterativeSFTTrainer.", "This is a test of the IterativeSFTTrainer"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny.load_tokenizer(tiny.tokenizer_dir(str(tmp_path_factory.mktemp("tok"))))


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
                report_to="none", disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


@pytest.mark.parametrize("input_name", ["tensor", "text"])
@pytest.mark.slow
def test_trl_t5_cases(input_name, tmp_path, tokenizer):
    """TRL asserted ``param.grad is not None`` (backward ran); here: every parameter of the caller's T5 was
    trained, the loss is finite, and the torch model computes what the trained JAX model computes."""
    model = tiny_seq2seq_model("t5v11", vocab_size=300)
    if input_name == "tensor":
        ids = [torch.tensor(x) for x in TRL_TENSOR_INPUTS]
        inputs = {"input_ids": ids, "attention_mask": [torch.ones_like(x) for x in ids], "labels": ids}
    else:
        inputs = {"texts": TRL_TEXTS, "texts_labels": TRL_TEXTS}
    trainer = IterativeSFTTrainer(model=model, args=_args(tmp_path), processing_class=tokenizer)
    assert trainer.is_encoder_decoder
    before = {k: v.detach().clone() for k, v in model.named_parameters()}

    stats = trainer.step(**inputs)

    assert np.isfinite(stats["loss"]) and stats["num_updates"] >= 1
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"parameters not updated: {unchanged}"
    src, dec = np.asarray([[5, 6, 7, 8, 9]]), np.asarray([[0, 11, 12, 13]])
    with torch.no_grad():
        want = trainer.model(input_ids=torch.as_tensor(src), decoder_input_ids=torch.as_tensor(dec)).logits.numpy()
    got = np.asarray(trainer.jax_model(src, np.ones_like(src), dec))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def _torch_loss(model, tokenizer, sources, targets) -> float:
    """HF's seq2seq loss of one batch built by DataCollatorForSeq2Seq (labels padded with -100)."""
    features = [{"input_ids": tokenizer(s)["input_ids"], "labels": tokenizer(t)["input_ids"]}
                for s, t in zip(sources, targets)]
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")(features)
    with torch.no_grad():
        return float(model(**batch).loss)


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.slow
def test_texts_labels_are_the_decoder_targets(family, tmp_path, tokenizer):
    """Fails on TRL 0.23.1, which tokenized ``texts`` again as the labels."""
    model = tiny_seq2seq_model(family, vocab_size=300, pad_token_id=tokenizer.pad_token_id)
    texts = ["the quick brown fox", "a small cat sleeps on a warm mat", "one two three"]
    targets = ["jumps over", "and numbers like four five six seven", "lazy dog"]
    right = _torch_loss(model, tokenizer, texts, targets)
    buggy = _torch_loss(model, tokenizer, texts, texts)
    assert abs(right - buggy) > 100 * 1e-5 * right  # the two readings are far apart at the tolerance below

    trainer = IterativeSFTTrainer(model=model, args=_args(tmp_path, per_device_train_batch_size=1), processing_class=tokenizer)
    stats = trainer.step(texts=texts, texts_labels=targets)  # 3 rows fit one micro-batch of the 8-device mesh
    assert stats["num_updates"] == 1
    assert stats["update_losses"][0] == pytest.approx(right, rel=1e-5)  # measured on the weights before the update


@pytest.mark.slow
def test_seq2seq_collator_semantics_for_tensor_inputs(tmp_path, tokenizer):
    """Labels of their own length, padded with -100 or with the pad id, as DataCollatorForSeq2Seq + TRL."""
    model = tiny_seq2seq_model("bart", vocab_size=300, pad_token_id=tokenizer.pad_token_id)
    sources = ["the quick brown fox", "one two three four five six"]
    targets = ["jumps", "seven eight nine ten add up"]
    right = _torch_loss(model, tokenizer, sources, targets)
    src = [torch.tensor(tokenizer(s)["input_ids"]) for s in sources]
    tgt = [tokenizer(t)["input_ids"] for t in targets]
    width = max(len(t) for t in tgt)
    padded_with_pad = torch.tensor([t + [tokenizer.pad_token_id] * (width - len(t)) for t in tgt])
    padded_with_ignore = torch.tensor([t + [-100] * (width - len(t)) for t in tgt])
    for labels in (padded_with_pad, padded_with_ignore, [torch.tensor(t) for t in tgt]):
        trainer = IterativeSFTTrainer(model=model, args=_args(tmp_path, learning_rate=0.0), processing_class=tokenizer)
        stats = trainer.step(input_ids=src, labels=labels)
        assert stats["update_losses"][0] == pytest.approx(right, rel=1e-5)


@pytest.mark.parametrize("family", ["t5v11", "bart"])
def test_weight_sync_into_a_seq2seq_torch_model_is_exact(family):
    """TorchWeightSync through the T5 / BART weight tables: the torch model ends up with jaxsft's weights."""
    import jaxsft
    from compat.torch_sync import TorchWeightSync
    from jaxsft.models.hf_io import hf_state_dict

    jax_model = jaxsft.from_pretrained(tiny_seq2seq_model(family, seed=1), mesh=jaxsft.single_device_mesh())
    target = tiny_seq2seq_model(family, seed=2)
    want = hf_state_dict(jax_model)
    assert any(not np.array_equal(p.detach().numpy(), want[n]) for n, p in target.named_parameters())
    TorchWeightSync(target, jax_model.spec).copy_from(jax_model)
    for name, param in target.named_parameters():
        np.testing.assert_array_equal(param.detach().numpy(), want[name], err_msg=name)


def test_seq2seq_decay_mask_follows_the_torch_param_groups():
    """hf_decay_table on BART: HF names decayed (no biases, no norms) -> the jaxsft mask the core builds from it,
    per stack; a weight decayed in some layers only is refused by name."""
    import jax
    import jaxsft
    from flax import nnx

    from jaxsft.training.optim import decay_mask_from_names
    from compat.torch_sync import hf_decay_table

    torch_model = tiny_seq2seq_model("bart")
    model = jaxsft.from_pretrained(torch_model, mesh=jaxsft.single_device_mesh())
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    decayed = frozenset(n for n, _ in torch_model.named_parameters() if not n.endswith("bias") and "norm" not in n)
    mask = decay_mask_from_names(hf_decay_table(model.spec)(decayed))(params)
    assert mask["embed"] and mask["encoder"]["q_proj"] and mask["decoder"]["cross_o_proj"] and mask["dec_pos_embed"]
    assert not mask["encoder"]["q_bias"] and not mask["decoder"]["cross_norm_scale"] and not mask["final_logits_bias"]
    assert not mask["enc_embed_norm_scale"] and mask["decoder"]["up_proj"] and not mask["decoder"]["up_bias"]
    assert len(jax.tree.leaves(mask)) == len(jax.tree.leaves(params))
    with pytest.raises(ValueError, match=r"decay model\.decoder\.layers\.\*\.fc1\.weight in some layers only"):
        hf_decay_table(model.spec)(decayed - {"model.decoder.layers.1.fc1.weight"})
