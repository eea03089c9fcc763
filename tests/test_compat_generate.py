"""compat.IterativeSFTTrainer.generate: HF generate's keywords in, HF's LongTensor out, on the engine."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

import jaxsft
import tiny
from compat import IterativeSFTTrainer

PROMPTS = ["the quick brown fox", "a small cat sleeps on a warm mat and numbers", "seven", "one two three"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    t = tiny.load_tokenizer(tiny.tokenizer_dir(str(tmp_path_factory.mktemp("tok"))))
    t.padding_side = "left"
    return t


def trainer_for(family, tok, tmp_path):
    model = tiny.tiny_torch_model(family)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], disable_tqdm=True, per_device_train_batch_size=2)
    return model, IterativeSFTTrainer(model, args, tok, mesh=jaxsft.single_device_mesh())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_equals_hf_generate_with_left_padding_and_eos(family, tok, tmp_path):
    model, trainer = trainer_for(family, tok, tmp_path)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        free = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    eos = [1, int(free[0, enc["input_ids"].shape[1] + 2])]  # an id row 0 emits: it ends early, others do not
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=eos)
    ours = trainer.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=8,
                            do_sample=False, pad_token_id=0, eos_token_id=eos)
    assert ours.dtype == torch.long and ours.shape == ref.shape
    assert torch.equal(ours, ref)
    ours_free = trainer.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=8,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours_free, free)


def test_sampling_rows_and_unsupported_keywords(tok, tmp_path):
    _, trainer = trainer_for("llama", tok, tmp_path)
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    out = trainer.generate(**enc, max_new_tokens=5, do_sample=True, temperature=0.9, top_k=20, top_p=0.95,
                           num_return_sequences=3, eos_token_id=None)
    assert out.shape == (6, enc["input_ids"].shape[1] + 5)
    assert torch.equal(out[:3, : enc["input_ids"].shape[1]], enc["input_ids"][0].expand(3, -1))  # prompt-major
    with pytest.raises(TypeError, match="repetition_penalty is not supported"):
        trainer.generate(**enc, max_new_tokens=5, repetition_penalty=1.2)
    with pytest.raises(ValueError, match="temperature"):
        trainer.generate(**enc, max_new_tokens=3, do_sample=True, temperature=0.0)
