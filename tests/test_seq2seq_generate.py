"""Encoder-decoder generation (T5, BART) through the decode engine: greedy equals transformers' generate token for
token, also with more prompts than slots."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxsft
import tiny
from jaxsft.generation import Sampler, compiled_programs, pow2_at_least
from tiny_seq2seq import tiny_seq2seq_model

PROMPTS = ["the quick brown fox jumps over the lazy dog", "one two", "a small cat sleeps on a warm mat and"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny.load_tokenizer(tiny.tokenizer_dir(str(tmp_path_factory.mktemp("tok"))))


def _model(family, tokenizer):
    # The tiny tokenizer's ids: pad 0, eos 1 (BART's decoder starts from its eos, as in HF's configs).
    extra = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2, decoder_start_token_id=1) if family == "bart" else {}
    model = tiny_seq2seq_model(family, vocab_size=300, **extra)
    with torch.no_grad():  # wide random weights: a tiny model at HF's init repeats one token, which proves little
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("family", ["t5", "t5v11", "bart"])
@pytest.mark.slow
def test_greedy_equals_transformers_generate(family, tokenizer):
    torch_model = _model(family, tokenizer)
    eos = torch_model.config.eos_token_id
    model = jaxsft.from_pretrained(torch_model, mesh=jaxsft.single_device_mesh())
    result = jaxsft.generate(model, tokenizer, PROMPTS, max_new_tokens=12, return_tokens=True, eos_token_ids=[eos])
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")  # mixed lengths, right-padded
    assert len({int(m.sum()) for m in batch["attention_mask"]}) == 3
    with torch.no_grad():
        ref = torch_model.generate(**batch, max_new_tokens=12, do_sample=False, num_beams=1, eos_token_id=eos,
                                   pad_token_id=0).numpy()
    assert (ref[:, 0] == torch_model.config.decoder_start_token_id).all()
    for r, toks in enumerate(result.tokens):
        want = ref[r, 1:]
        if result.finish_reasons[r] == "length":
            assert len(toks) == 12
        else:
            assert toks[-1] == eos
        np.testing.assert_array_equal(toks, want[: len(toks)], err_msg=f"row {r}")
    assert len({tuple(t) for t in result.tokens}) >= 2  # the prompts really steer the decoder
    # One slot group for the three prompts (refilled as each finishes): the same tokens.
    one_slot = Sampler(model, tokenizer, kv_cache_bytes=1)
    with pytest.raises(ValueError, match="kv_cache_bytes|budget"):  # a budget under one group is refused by name
        one_slot.generate(PROMPTS, max_new_tokens=12)
    longest = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    adapter_bytes = _one_group_bytes(model, 1, pow2_at_least(longest, 16), 16)
    sampler = Sampler(model, tokenizer, kv_cache_bytes=adapter_bytes)
    refilled = sampler.generate(PROMPTS, max_new_tokens=12, return_tokens=True, eos_token_ids=[eos])
    assert next(k for k in sampler._programs if k[0] == "decode")[4].groups == 1  # the shape ran one slot group
    assert all(np.array_equal(a, b) for a, b in zip(result.tokens, refilled.tokens))
    assert refilled.finish_reasons == result.finish_reasons


def _one_group_bytes(model, n, prompt_slots, new_slots):
    from jaxsft.generation.api import adapter_for

    return adapter_for(model).kv_bytes_per_group(n, prompt_slots, new_slots)


@pytest.mark.slow
def test_sampling_is_seeded_and_top_k_1_is_greedy(tokenizer):
    model = jaxsft.from_pretrained(_model("t5", tokenizer), mesh=jaxsft.single_device_mesh())
    kw = dict(max_new_tokens=10, eos_token_ids=[], return_tokens=True)
    a = jaxsft.generate(model, tokenizer, PROMPTS, temperature=1.0, seed=1, num_return_sequences=2, **kw)
    b = jaxsft.generate(model, tokenizer, PROMPTS, temperature=1.0, seed=1, num_return_sequences=2, **kw)
    c = jaxsft.generate(model, tokenizer, PROMPTS, temperature=1.0, seed=2, num_return_sequences=2, **kw)
    assert len(a.tokens) == 6
    assert all(np.array_equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert any(not np.array_equal(x, y) for x, y in zip(a.tokens, c.tokens))
    greedy = jaxsft.generate(model, tokenizer, PROMPTS, **kw)
    top1 = jaxsft.generate(model, tokenizer, PROMPTS, temperature=0.7, top_k=1, seed=5, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(greedy.tokens, top1.tokens))


@pytest.mark.slow
def test_similar_calls_share_one_program_and_trainer_generate_uses_training_weights(tokenizer):
    model = jaxsft.from_pretrained(_model("bart", tokenizer), mesh=jaxsft.single_device_mesh())
    before = compiled_programs()
    jaxsft.generate(model, tokenizer, PROMPTS[:2], max_new_tokens=5, eos_token_ids=[])
    first = compiled_programs()
    assert first == before + 3  # the engine's init, prefill and decode
    jaxsft.generate(model, tokenizer, PROMPTS[1:], max_new_tokens=9, eos_token_ids=[])  # same buckets
    assert compiled_programs() == first
    trainer = jaxsft.IterativeSFTTrainer(model, jaxsft.TrainConfig(learning_rate=1e-2, max_length=32,
                                                                   disable_tqdm=True), tokenizer)
    kw = dict(max_new_tokens=6, eos_token_ids=[], return_tokens=True)
    first = trainer.generate(PROMPTS, **kw).tokens
    assert all(np.array_equal(a, b) for a, b in zip(first, jaxsft.generate(model, tokenizer, PROMPTS, **kw).tokens))
    trainer.step(texts=PROMPTS * 3, texts_labels=["seven eight nine"] * 9)
    after = trainer.generate(PROMPTS, **kw).tokens
    assert any(not np.array_equal(a, b) for a, b in zip(first, after))  # the trained weights generate


def test_encoder_prompt_lengths_and_eos_ids_are_checked_before_any_work(tokenizer):
    """BART's encoder has 64 learned positions: a longer prompt is refused by name, as are EOS ids outside the
    vocabulary; nothing compiles."""
    model = jaxsft.from_pretrained(_model("bart", tokenizer), mesh=jaxsft.single_device_mesh())
    before = compiled_programs()
    long_prompt = " ".join(["seven"] * 80)
    assert len(tokenizer(long_prompt)["input_ids"]) > 64
    with pytest.raises(ValueError, match=r"prompts\[1\] is \d+ tokens, over the encoder's 64 positions"):
        jaxsft.generate(model, tokenizer, ["one two", long_prompt], max_new_tokens=4)
    with pytest.raises(ValueError, match="eos_token_ids"):
        jaxsft.generate(model, tokenizer, ["one two"], max_new_tokens=4, eos_token_ids=[300])
    assert compiled_programs() == before


@pytest.mark.slow
def test_samples_depend_on_seed_prompt_and_index_only_and_steady_state_compiles_nothing(tokenizer):
    """Through the engine an encoder-decoder's sample rows depend on the seed, prompt and sample index only (not
    on batch_size, hence the slot count); n samples at T=0 are identical; repeated calls compile nothing new."""
    model = jaxsft.from_pretrained(_model("t5", tokenizer), mesh=jaxsft.single_device_mesh())
    sampler = Sampler(model, tokenizer)
    kw = dict(max_new_tokens=8, temperature=1.0, num_return_sequences=3, seed=7, eos_token_ids=[])
    full = sampler.generate(PROMPTS, **kw)
    for batch_size in (3, 6):  # one and two slot groups
        assert sampler.generate(PROMPTS, batch_size=batch_size, **kw) == full
    assert len(set(full)) > len(PROMPTS)
    greedy = sampler.generate(PROMPTS, max_new_tokens=8, num_return_sequences=3, eos_token_ids=[])
    assert all(len(set(greedy[i : i + 3])) == 1 for i in range(0, len(greedy), 3))
    stop = greedy[0][len(greedy[0]) // 2 :][:3]  # stop strings, checked by the engine as for decoders
    cut = sampler.generate(PROMPTS, max_new_tokens=8, eos_token_ids=[], stop=stop, return_tokens=True)
    assert stop and cut.texts[0] == greedy[0][: greedy[0].find(stop)] and cut.finish_reasons[0] == "stop"
    programs = sampler.compiled_programs
    for seed in range(3):
        sampler.generate(PROMPTS[::-1], batch_size=6, **{**kw, "seed": seed, "max_new_tokens": 5 + seed})
    assert sampler.compiled_programs == programs


def test_cross_attention_kv_is_held_once_per_prompt(tokenizer):
    """The engine's encoder-decoder cache: each slot group (one prompt, n samples) holds its cross-attention K/V
    once and each row its own self-attention K/V, every decoder layer; the KV budget counts exactly that."""
    import jax

    from jaxsft.generation import engine
    from jaxsft.generation.seq2seq import Seq2SeqAdapter

    model = jaxsft.from_pretrained(_model("bart", tokenizer), mesh=jaxsft.single_device_mesh())
    spec, adapter = model.spec, Seq2SeqAdapter(model.spec, model.dtype)
    shape = engine.Shape(groups=4, n=8, prompt_slots=32, new_slots=16)
    state = jax.eval_shape(engine.make_init(adapter, shape))
    per_slot = 2 * spec.num_heads * spec.head_dim * np.dtype(model.dtype).itemsize
    for layer in state.cache.layers:
        assert layer.cross_k.shape == (4, spec.num_heads, 32, spec.head_dim)  # per group, not per row
        assert layer.self_k.shape == (32, spec.num_heads, 16, spec.head_dim)
    held = sum(x.size * x.dtype.itemsize for layer in state.cache.layers for x in layer)
    assert len(state.cache.layers) == spec.num_decoder_layers
    assert held == shape.groups * spec.num_decoder_layers * per_slot * (32 + 8 * 16)
    assert held == shape.groups * adapter.kv_bytes_per_group(8, 32, 16)
