"""The generate -> filter -> train loop as users write it: empty rounds, per-call seeds, EOS, chat texts.

Tiny llama + locally trained tokenizer (tests/tiny.py), one device. The chat template is
ChatML-like with the tokenizer's EOS as end of turn, as SmolLM2-Instruct's is.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

import jaxsft
from jaxsft.training import batching
from jaxsft.models.hf_io import hf_state_dict

import tiny

EOS = 1
CHATML = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    t = tiny.load_tokenizer(tiny.tokenizer_dir(str(tmp_path_factory.mktemp("tok"))))
    t.chat_template = CHATML
    return t


@pytest.fixture(scope="module")
def torch_llama():
    return tiny.tiny_torch_model("llama", seed=3)


def make_trainer(torch_model, tok, **overrides):
    cfg = dict(learning_rate=1e-3, lr_scheduler_type="constant", max_length=64, min_bucket_length=32,
               per_device_train_batch_size=8, logging_steps=1, disable_tqdm=True, seed=0)
    cfg.update(overrides)
    model = jaxsft.from_pretrained(torch_model, mesh=jaxsft.single_device_mesh())
    return jaxsft.IterativeSFTTrainer(model, jaxsft.TrainConfig(**cfg), tok)


def weights(trainer):
    return {k: np.array(v) for k, v in hf_state_dict(trainer.model).items()}


# ----------------------------------------------------------------------------- empty rounds
def test_empty_step_trains_nothing_and_warns(torch_llama, tok):
    trainer = make_trainer(torch_llama, tok)
    trainer.step(texts=["the quick brown fox"], texts_labels=[" jumps"])
    before, opt_before = weights(trainer), [np.array(x) for x in jax.tree.leaves(trainer._opt_state)]
    rng_state, logs, version = trainer._rng.bit_generator.state, list(trainer.state.log_history), trainer.params_version

    for kwargs in (dict(texts=[], texts_labels=[]), dict(texts=[]), dict(input_ids=[]),
                   dict(input_ids=np.zeros((0, 5), np.int32), attention_mask=np.zeros((0, 5), np.int32))):
        with pytest.warns(UserWarning, match=r"no examples .* nothing was trained"):
            stats = trainer.step(**kwargs)
        assert stats["num_updates"] == 0 and stats["num_tokens"] == 0 and stats["update_losses"] == []
        assert stats["loss"] == 0.0 and stats["grad_norm"] is None and stats["global_step"] == 1
        assert stats["compiled_shapes"] == trainer.compiled_shapes

    after = weights(trainer)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all(np.array_equal(a, b) for a, b in zip(opt_before, jax.tree.leaves(trainer._opt_state)))
    assert trainer._rng.bit_generator.state == rng_state and trainer.state.log_history == logs
    assert trainer.state.global_step == 1 and trainer.params_version == version


@pytest.mark.parametrize("kwargs, name", [
    (dict(texts=[], texts_labels=["x"]), "texts_labels"),
    (dict(texts=[], input_ids=[[5, 6]]), "input_ids"),
    (dict(input_ids=[], labels=[[5, 6]]), "labels"),
    (dict(input_ids=[], texts_labels=[]), "texts_labels"),
])
def test_empty_call_that_is_inconsistent_still_raises(torch_llama, tok, kwargs, name):
    trainer = make_trainer(torch_llama, tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "trained nothing" warning either: it is rejected first
        with pytest.raises(ValueError, match=name):
            trainer.step(**kwargs)


# ----------------------------------------------------------------------------- seeds
@pytest.mark.slow
def test_generate_seed_advances_per_call_and_explicit_seed_repeats(torch_llama, tok):
    prompts = ["the quick brown fox", "one two three"]
    kw = dict(max_new_tokens=8, temperature=1.0, num_return_sequences=3)
    a = make_trainer(torch_llama, tok, seed=5)
    first, second = a.generate(prompts, **kw), a.generate(prompts, **kw)
    assert first != second  # rounds draw fresh samples
    assert a.state.generate_calls == 2
    # The same explicit seed gives identical samples, and does not move the per-call count.
    assert a.generate(prompts, seed=11, **kw) == a.generate(prompts, seed=11, **kw)
    assert a.state.generate_calls == 2
    # Reproducible from TrainConfig.seed: a fresh trainer with the same config draws the same rounds.
    b = make_trainer(torch_llama, tok, seed=5)
    assert [b.generate(prompts, **kw), b.generate(prompts, **kw)] == [first, second]
    c = make_trainer(torch_llama, tok, seed=6)
    assert c.generate(prompts, **kw) != first
    # A rejected call changes nothing: the next call still gets the next seed.
    with pytest.raises(ValueError, match="max_new_tokens"):
        b.generate(prompts, max_new_tokens=0)
    assert b.state.generate_calls == 2
    with pytest.raises(TypeError, match="seed"):
        b.generate(prompts, seed=1.5, max_new_tokens=4)


@pytest.mark.slow
def test_generate_call_count_is_checkpointed(torch_llama, tok, tmp_path):
    prompts = ["the quick brown fox"]
    kw = dict(max_new_tokens=6, temperature=1.0, num_return_sequences=4)
    a = make_trainer(torch_llama, tok, seed=2)
    a.generate(prompts, **kw)
    path = a.save_checkpoint(str(tmp_path))
    expected = a.generate(prompts, **kw)
    b = make_trainer(torch_llama, tok, seed=2)
    b.restore_checkpoint(path)
    assert b.generate(prompts, **kw) == expected


# ----------------------------------------------------------------------------- EOS on completions
def test_completions_end_with_eos_once(tok):
    texts, completions = ["the quick brown", "a small cat"], [" fox jumps", " sleeps<|eos|>"]
    common = dict(max_length=None, truncation_mode="keep_end")
    with_eos = batching.examples_from_texts(tok, texts, completions, eos_token_id=EOS, **common)
    as_given = batching.examples_from_texts(tok, texts, completions, **common)
    for ex, given in zip(with_eos, as_given):
        assert ex.labels[-1] == EOS and ex.input_ids[-1] == EOS
        assert int((ex.labels == EOS).sum()) == 1  # never doubled
    assert len(with_eos[0].input_ids) == len(as_given[0].input_ids) + 1  # appended where missing
    assert len(with_eos[1].input_ids) == len(as_given[1].input_ids)  # kept where present
    assert as_given[0].labels[-1] != EOS


def test_trainer_adds_eos_by_default_and_add_eos_false_keeps_texts(torch_llama, tok):
    completions = [" jumps over", " four five"]
    n = sum(len(tok(c, add_special_tokens=False)["input_ids"]) for c in completions)
    on = make_trainer(torch_llama, tok).step(texts=["the quick fox", "one two three"], texts_labels=completions)
    off = make_trainer(torch_llama, tok, add_eos=False).step(texts=["the quick fox", "one two three"],
                                                             texts_labels=completions)
    assert (on["num_tokens"], off["num_tokens"]) == (n + 2, n)
    with pytest.raises(ValueError, match="add_eos"):
        jaxsft.TrainConfig(add_eos="yes")


@pytest.mark.slow
def test_tiny_model_learns_to_stop(torch_llama, tok):
    """Kept completions carry EOS, so greedy decoding ends with EOS after the learned answer; without it,
    the same training runs on to the token budget."""
    prompts = ["the quick brown fox", "a small cat sleeps", "one two three", "the lazy dog"]
    answers = [" jumps", " on a mat", " four five", " sleeps"]
    results = {}
    for add_eos in (True, False):
        trainer = make_trainer(torch_llama, tok, learning_rate=3e-3, add_eos=add_eos)
        for _ in range(40):
            trainer.step(texts=prompts, texts_labels=answers)
        results[add_eos] = trainer.generate(prompts, max_new_tokens=12, temperature=0.0, return_tokens=True)
    learned = results[True]
    assert [t.strip() for t in learned.texts] == [a.strip() for a in answers]
    assert learned.finish_reasons == ["eos"] * len(prompts)
    assert "eos" not in results[False].finish_reasons  # the check discriminates


# ----------------------------------------------------------------------------- chat texts
def test_chat_texts_train_the_assistant_turn_only(torch_llama, tok):
    chats = [[{"role": "user", "content": "the quick brown fox"}],
             [{"role": "system", "content": "a cat"}, {"role": "user", "content": "one two"}]]
    replies = ["jumps over", "three four"]
    examples = batching.examples_from_texts(tok, chats, replies, max_length=None, truncation_mode="keep_end",
                                            eos_token_id=EOS)
    for messages, reply, ex in zip(chats, replies, examples):
        prompt = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"]
        target = tok(reply, add_special_tokens=False)["input_ids"] + [EOS]  # the template's end of turn, once
        assert ex.input_ids.tolist() == prompt + target
        assert ex.labels.tolist() == [-100] * len(prompt) + target
    # A chat ending with the assistant's message is the same example.
    ending = [c + [{"role": "assistant", "content": r}] for c, r in zip(chats, replies)]
    again = batching.examples_from_texts(tok, ending, None, max_length=None, truncation_mode="keep_end",
                                         eos_token_id=EOS)
    assert [e.labels.tolist() for e in again] == [e.labels.tolist() for e in examples]

    # The trainer learns exactly those tokens, and its prompt tokens are generate's for the same chat.
    trainer = make_trainer(torch_llama, tok)
    stats = trainer.step(texts=chats, texts_labels=replies)
    assert stats["num_tokens"] == sum(int((e.labels[1:] != -100).sum()) for e in examples)
    gen = trainer.generate(chats, max_new_tokens=2, return_tokens=True)
    for ex, prompt_tokens in zip(examples, gen.prompt_tokens):
        assert ex.input_ids[: len(prompt_tokens)].tolist() == prompt_tokens.tolist()
        assert ex.labels[len(prompt_tokens) - 1] == -100 and ex.labels[len(prompt_tokens)] != -100


@pytest.mark.parametrize("texts, labels, error, pattern", [
    ([[{"role": "user", "content": "a"}]], None, ValueError, r"texts\[0\] is a chat whose last message is from 'user'"),
    ([[{"content": "a"}]], ["b"], TypeError, r"texts\[0\] must be a string or a non-empty list"),
    (["a", [{"role": "assistant", "content": "b"}]], None, ValueError, r"mixes chats"),
])
def test_bad_chat_texts(tok, texts, labels, error, pattern):
    with pytest.raises(error, match=pattern):
        batching.examples_from_texts(tok, texts, labels, max_length=None, truncation_mode="keep_end")
