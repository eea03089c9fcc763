"""compat.IterativeSFTTrainer: TRL's API on the JAX core (tiny Llama / Qwen2 / GPT-2, CPU).

Covers the seed quick start, TRL 0.23.1's own four test cases (the causal ones here; its two T5 cases are in
test_seq2seq_compat.py), construction and step() validation with TRL's messages, the lazy torch
weight sync, torch/optax optimizers, HF callbacks / logging / evaluation, saving and the Hub, and one test
per TRL bug that the facade fixes (docs/compat.md names them). TRL parity runs are in
test_compat_trl_parity.py.
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    get_scheduler,
)
from transformers.trainer_callback import DefaultFlowCallback, ProgressCallback

import compat.trainer as compat_trainer
import jaxsft
from compat import IterativeSFTConfig, IterativeSFTTrainer
from compat.torch_sync import TorchWeightSync
from jaxsft.models.hf_io import hf_state_dict

import tiny

SINGLE = None  # filled lazily: jaxsft.single_device_mesh() (the tests' fast path; TRL is single-process)


def single_mesh():
    global SINGLE
    if SINGLE is None:
        SINGLE = jaxsft.single_device_mesh()
    return SINGLE


def targs(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path), report_to=[], disable_tqdm=True, learning_rate=1e-3, max_steps=50,
        logging_steps=1, per_device_train_batch_size=4,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def ids_batch(rng: np.random.Generator, n: int, low: int = 4, high: int = 20) -> list[torch.Tensor]:
    return [torch.tensor(rng.integers(3, 300, size=int(rng.integers(low, high)))) for _ in range(n)]


def torch_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_every_parameter_changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"parameters not updated: {unchanged}"


def torch_mean_token_loss(model: torch.nn.Module, examples: list[torch.Tensor]) -> float:
    """HF's causal-LM loss over several examples: summed shifted CE / number of targets."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in examples:
            logits = model(ids[None]).logits[0]
            total += float(F.cross_entropy(logits[:-1], ids[1:], reduction="sum"))
            count += ids.shape[0] - 1
    return total / count


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tiny.tokenizer_dir(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture
def tokenizer(tok_dir):
    return tiny.load_tokenizer(tok_dir)


# ---------------------------------------------------------------------------------------------------------
# the seed quick start and TRL's own tests


@pytest.mark.slow
def test_seed_quick_start_runs_as_written(tok_dir, capsys, monkeypatch):
    """``IterativeSFTTrainer(model, tokenizer)``; step(input_ids, attention_mask) without labels; step(texts).

    Also: a tokenizer without a pad token works (TRL failed with "Asking to pad"), the tokenizer is not
    mutated, max_steps=-1 trains at a constant rate (TRL: lr 0 forever), the IterativeSFTConfig default
    gradient_checkpointing=True is honoured, step() returns stats, and progress reaches the console.
    """
    freed = []
    monkeypatch.setattr(compat_trainer, "_free_device_memory", lambda: freed.append(1))
    tokenizer = tiny.load_tokenizer(tok_dir)
    tokenizer.pad_token = None  # GPT-2 / Llama tokenizers ship without one
    sides = (tokenizer.truncation_side, tokenizer.padding_side)
    model = tiny.tiny_torch_model("llama")
    before = torch_snapshot(model)

    with pytest.warns(UserWarning, match="max_steps=-1 gives no horizon"):
        trainer = IterativeSFTTrainer(model, tokenizer)  # the tokenizer lands in `args`, as in TRL's docs
    assert trainer.processing_class is tokenizer and trainer.tokenizer is tokenizer
    assert isinstance(trainer.args, IterativeSFTConfig) and trainer.args.output_dir == "llama-IterativeSFT"

    input_ids = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([10, 11, 12, 13, 14, 15])]
    attention_mask = [torch.ones_like(x) for x in input_ids]
    stats = trainer.step(input_ids=input_ids, attention_mask=attention_mask)
    texts = ["the quick brown fox jumps", "a small cat sleeps on a warm mat"]
    stats_texts = trainer.step(texts=texts)

    for s in (stats, stats_texts):
        assert isinstance(s, dict) and s["num_updates"] == 1 and math.isfinite(s["loss"]) and s["loss"] > 0
        assert s["learning_rate"] == 5e-5  # constant after (zero) warmup, never 0
    assert stats["num_tokens"] == 4 + 5
    assert trainer.state.global_step == 2
    assert trainer.model is model
    assert_every_parameter_changed(model, before)
    assert (tokenizer.truncation_side, tokenizer.padding_side) == sides and tokenizer.pad_token is None
    assert trainer.core.config.gradient_checkpointing and trainer.jax_model.remat
    assert freed == []  # optimize_device_cache is off by default
    progress = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressCallback))
    assert progress.training_bar.n == 2  # transformers' ProgressCallback (disable_tqdm=False) ...
    assert "it [" in capsys.readouterr().err  # ... drew its bar on the console


TRL_TENSOR_INPUTS = {
    "input_ids": [[53, 36, 66, 14, 18], [66, 14, 18, 66, 14, 18], [53, 36, 66, 14, 18]],
}
TRL_TEXTS = ["Testing the IterativeSFTTrainer.", "This is a test of the IterativeSFTTrainer"]


@pytest.mark.parametrize(
    "model_name,input_name", [("qwen", "tensor"), ("qwen", "text"), ("gpt2", "tensor"), ("gpt2", "text")]
)
@pytest.mark.slow
def test_iterative_step_from_tensor(model_name, input_name, tmp_path, tok_dir):
    """TRL 0.23.1's tests/test_iterative_sft_trainer.py, against compat (its T5 cases: test_seq2seq_compat.py).

    TRL asserted ``param.grad is not None`` for every parameter, which only showed that backward ran;
    jaxsft has no torch gradients, so this asserts what that was meant to show: every parameter of the
    caller's model was updated, and the loss is finite.
    """
    tokenizer = tiny.load_tokenizer(tok_dir)
    tokenizer.pad_token = tokenizer.eos_token  # as TRL's test
    model = tiny.tiny_torch_model("qwen2" if model_name == "qwen" else "gpt2")
    if input_name == "tensor":
        ids = [torch.tensor(x) for x in TRL_TENSOR_INPUTS["input_ids"]]
        inputs = {"input_ids": ids, "attention_mask": [torch.ones_like(x) for x in ids], "labels": ids}
    else:
        inputs = {"texts": TRL_TEXTS, "texts_labels": TRL_TEXTS}
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3, report_to="none"
    )
    trainer = IterativeSFTTrainer(model=model, args=args, processing_class=tokenizer)
    before = torch_snapshot(model)

    stats = trainer.step(**inputs)

    assert math.isfinite(stats["loss"]) and stats["num_updates"] >= 1
    assert_every_parameter_changed(trainer.model, before)
    # and the torch model now computes what the trained JAX model computes (tied embeddings included)
    probe = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch_logits = trainer.model(probe).logits.numpy()
    jax_logits = np.asarray(trainer.jax_model(probe.numpy()))
    np.testing.assert_allclose(torch_logits, jax_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_sync_is_exact_for_every_layout_and_dtype(family, dtype):
    """TorchWeightSync (device-side HF layout, host path for GPT-2's fused q/k/v) == hf_state_dict, cast as torch casts."""
    jax_model = jaxsft.from_pretrained(tiny.tiny_torch_model(family, seed=1), mesh=single_mesh())
    target = tiny.tiny_torch_model(family, seed=2).to(dtype)
    TorchWeightSync(target, jax_model.spec).copy_from(jax_model)
    want = hf_state_dict(jax_model)
    for name, param in target.named_parameters():
        assert torch.equal(param.detach(), torch.from_numpy(np.array(want[name])).to(dtype)), name
    if family == "gpt2":
        assert target.lm_head.weight is target.transformer.wte.weight  # tied: written once, still tied


# ---------------------------------------------------------------------------------------------------------
# construction


def test_constructor_type_checks_use_trls_messages(tmp_path, tokenizer):
    model = tiny.tiny_torch_model("llama")
    args = targs(tmp_path)
    with pytest.raises(ValueError) as err:
        IterativeSFTTrainer(model, args, tokenizer=5)
    assert str(err.value) == (
        "tokenizer must be a PreTrainedTokenizerBase like a PreTrainedTokenizer or a PreTrainedTokenizerFast, "
        "got <class 'int'>"
    )
    with pytest.raises(ValueError, match=r"^processing_class must be a PreTrainedTokenizerBase like"):
        IterativeSFTTrainer(model, args, processing_class="gpt2")
    with pytest.raises(ValueError, match=r"^model must be a PreTrainedModel, got <class 'int'>"):
        IterativeSFTTrainer(5, args, tokenizer)
    with pytest.raises(ValueError, match="Both `tokenizer` and `processing_class`"):
        IterativeSFTTrainer(model, args, tokenizer, processing_class=tokenizer)
    with pytest.raises(ValueError, match="args is a tokenizer"):
        IterativeSFTTrainer(model, tokenizer, tokenizer)
    with pytest.raises(ValueError) as err:
        IterativeSFTTrainer(model, args, tokenizer, truncation_mode="middle")
    assert str(err.value) == "truncation_mode must be either 'keep_end' or 'keep_start', got middle"
    with pytest.raises(ValueError, match="data_collator="):  # Era C positional order used by mistake
        IterativeSFTTrainer(model, args, lambda rows: rows)
    with pytest.raises(TypeError, match="args must be a transformers.TrainingArguments"):
        IterativeSFTTrainer(model, {"learning_rate": 1e-3}, tokenizer)


def test_unsupported_seq2seq_models_are_rejected_with_a_clear_message(tmp_path):
    """T5 and BART train (tests/test_seq2seq_compat.py); another encoder-decoder family is refused by name."""
    from transformers import MBartConfig, MBartForConditionalGeneration

    mbart = MBartForConditionalGeneration(MBartConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
    ))
    with pytest.raises(ValueError, match="encoder-decoder .*seq2seq.* of type 'mbart'; jaxsft trains the encoder-decoders t5, bart"):
        IterativeSFTTrainer(mbart, targs(tmp_path))


def test_frozen_parameters_are_rejected(tmp_path):
    model = tiny.tiny_torch_model("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        IterativeSFTTrainer(model, targs(tmp_path))


def test_iterative_sft_config_fields_and_classic_keywords(tmp_path, tokenizer):
    model = tiny.tiny_torch_model("llama")
    config = IterativeSFTConfig(
        output_dir=str(tmp_path), max_length=24, truncation_mode="keep_start", optimize_device_cache=True,
        max_steps=5, report_to=[],
    )
    trainer = IterativeSFTTrainer(model, config, tokenizer)
    assert (trainer.max_length, trainer.truncation_mode, trainer.optimize_device_cache) == (24, "keep_start", True)
    assert trainer.core.config.max_length == 24 and trainer.core.config.truncation_mode == "keep_start"
    classic = IterativeSFTTrainer(model, targs(tmp_path), tokenizer, max_length=16, truncation_mode="keep_start")
    assert classic.core.config.max_length == 16 and classic.core.config.truncation_mode == "keep_start"
    assert not classic.optimize_device_cache
    with pytest.raises(ValueError, match=r"max_length=16 was passed to the trainer but args.max_length=24"):
        IterativeSFTTrainer(model, config, tokenizer, max_length=16)


def test_each_ignored_argument_is_warned_once(tmp_path, tokenizer):
    model = tiny.tiny_torch_model("llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        IterativeSFTTrainer(model, targs(tmp_path, data_seed=7, num_train_epochs=2), tokenizer)
    messages = [str(w.message) for w in caught if "is ignored by jaxsft" in str(w.message)]
    assert len(messages) == 2  # (save_steps, once ignored, is honoured now: issue 13)
    assert messages[0].startswith("TrainingArguments.num_train_epochs=2 ")
    assert messages[1].startswith("TrainingArguments.data_seed=7 ")


def test_eval_steps_without_an_eval_dataset_is_an_error(tmp_path, tokenizer):
    model = tiny.tiny_torch_model("llama")
    with pytest.raises(ValueError, match="no eval_dataset was given"):
        IterativeSFTTrainer(model, targs(tmp_path, eval_strategy="steps", eval_steps=2), tokenizer)


def test_model_given_as_a_local_folder(tmp_path, tok_dir):
    folder = tmp_path / "tiny-llama"
    tiny.tiny_torch_model("llama").save_pretrained(folder)
    tiny.load_tokenizer(tok_dir).save_pretrained(folder)
    config = IterativeSFTConfig(output_dir=str(tmp_path / "out"), model_init_kwargs={"attn_implementation": "eager"})
    trainer = IterativeSFTTrainer(str(folder), config)
    assert type(trainer.model).__name__ == "LlamaForCausalLM"
    assert trainer.model.config._attn_implementation == "eager"
    assert trainer.processing_class is not None and len(trainer.processing_class) == 300  # loaded from the folder
    default = IterativeSFTTrainer(str(folder))
    assert default.args.output_dir == "tiny-llama-IterativeSFT"


def test_optimizers_argument_errors(tmp_path, tokenizer):
    model = tiny.tiny_torch_model("llama")
    args = targs(tmp_path)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(TypeError, match="optimizers must be a tuple"):
        IterativeSFTTrainer(model, args, tokenizer, optimizers=opt)
    with pytest.raises(ValueError, match="pass that optimizer too"):
        IterativeSFTTrainer(model, args, tokenizer, optimizers=(None, sched))
    with pytest.raises(TypeError, match="optimizer must be torch.optim.AdamW"):
        IterativeSFTTrainer(model, args, tokenizer, optimizers=(torch.optim.Adagrad(model.parameters()), None))
    with pytest.raises(TypeError, match="a torch LR scheduler cannot drive an optax optimizer"):
        IterativeSFTTrainer(model, args, tokenizer, optimizers=(optax.adamw(1e-3), sched))
    # a decay split that differs between layers cannot be expressed on stacked layer weights
    decayed = [p for n, p in model.named_parameters() if "layers.0." in n and "proj" in n]
    rest = [p for n, p in model.named_parameters() if not ("layers.0." in n and "proj" in n)]
    split = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}])
    with pytest.raises(ValueError, match="all layers must share one weight-decay choice"):
        IterativeSFTTrainer(model, args, tokenizer, optimizers=(split, None))


def test_report_to_builds_transformers_callbacks(tmp_path, tokenizer):
    model = tiny.tiny_torch_model("llama")
    plain = IterativeSFTTrainer(model, targs(tmp_path, report_to=[]), tokenizer)
    assert [type(c) for c in plain.callback_handler.callbacks] == [DefaultFlowCallback, PrinterCallback]
    bar = IterativeSFTTrainer(model, targs(tmp_path, report_to="none", disable_tqdm=False), tokenizer)
    assert [type(c) for c in bar.callback_handler.callbacks] == [DefaultFlowCallback, ProgressCallback]


def test_report_to_tensorboard_writes_events(tmp_path, tokenizer):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (not a jaxsft dependency)")
    from transformers.integrations import TensorBoardCallback

    model = tiny.tiny_torch_model("llama")
    args = targs(tmp_path, report_to=["tensorboard"])
    trainer = IterativeSFTTrainer(model, args, tokenizer, mesh=single_mesh(), max_length=32)
    assert any(isinstance(c, TensorBoardCallback) for c in trainer.callback_handler.callbacks)
    trainer.step(input_ids=[[5, 6, 7, 8]])
    assert list(tmp_path.rglob("events.out.tfevents.*"))  # <output_dir>/runs/... (transformers' default)


def test_a_newer_trainer_takes_over_the_torch_models_sync_hooks(tmp_path, tokenizer):
    model = tiny.tiny_torch_model("llama")
    first = IterativeSFTTrainer(model, targs(tmp_path), tokenizer)
    assert len(first._hook_handles) == 2
    second = IterativeSFTTrainer(model, targs(tmp_path), tokenizer)
    assert first._hook_handles == [] and len(second._hook_handles) == 2
    assert len(model._forward_pre_hooks) == 1


def test_train_is_not_the_entry_point(tmp_path, tokenizer):
    trainer = IterativeSFTTrainer(tiny.tiny_torch_model("llama"), targs(tmp_path), tokenizer)
    with pytest.raises(ValueError, match=r"^Trainer: training requires a train_dataset\. .*step\("):
        trainer.train()
    with pytest.raises(AttributeError, match="cannot be replaced"):
        trainer.model = tiny.tiny_torch_model("llama")


# ---------------------------------------------------------------------------------------------------------
# one trained Llama shared by the tests below (single-device mesh, one bucket: one compiled program)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tok_dir):
    tmp = tmp_path_factory.mktemp("shared")
    model = tiny.tiny_torch_model("llama", seed=5)
    tokenizer = tiny.load_tokenizer(tok_dir)
    trainer = IterativeSFTTrainer(
        model, targs(tmp), tokenizer, max_length=32, optimize_device_cache=True, mesh=single_mesh()
    )
    trainer.step(input_ids=ids_batch(np.random.default_rng(0), 4))
    return trainer, model


def test_trainer_model_is_the_callers_model_synced_lazily(shared, monkeypatch):
    trainer, model = shared
    copies = []
    original = TorchWeightSync.copy_from
    monkeypatch.setattr(TorchWeightSync, "copy_from", lambda self, m: (copies.append(1), original(self, m))[1])
    trainer.step(input_ids=ids_batch(np.random.default_rng(1), 3))
    assert copies == []  # nothing is copied while training
    assert trainer.model is model
    assert copies == [1]
    trainer.model, trainer.model
    assert copies == [1]  # nothing new to copy
    want = hf_state_dict(trainer.jax_model)
    for name, param in model.named_parameters():
        np.testing.assert_array_equal(param.detach().numpy(), want[name])
    # generate() between steps runs on the trained weights
    out = trainer.model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


@pytest.mark.slow
def test_callers_own_model_reference_sees_trained_weights(shared):
    """TRL trained the caller's model object in place, so loops keep using their own reference: forward
    (hence generate) and state_dict (hence save_pretrained) sync it first, without going through trainer.model."""
    trainer, model = shared
    probe = torch.tensor([[5, 6, 7, 8]])
    trainer.step(input_ids=[[9, 10, 11, 12]])
    with torch.no_grad():
        logits = model(probe).logits.numpy()  # the caller's reference, not trainer.model
    np.testing.assert_allclose(logits, np.asarray(trainer.jax_model(probe.numpy())), atol=1e-5)
    trainer.step(input_ids=[[9, 10, 11, 12]])
    state = model.state_dict()
    want = hf_state_dict(trainer.jax_model)
    np.testing.assert_array_equal(state["model.norm.weight"].numpy(), want["model.norm.weight"])


def test_logs_and_learning_rate_view(shared):
    trainer, _ = shared
    history = trainer.state.log_history
    assert [h["step"] for h in history] == list(range(1, trainer.state.global_step + 1))
    for entry in history:
        assert set(entry) == {"loss", "grad_norm", "learning_rate", "step"}
        assert entry["loss"] == round(entry["loss"], 4)
        assert entry["learning_rate"] == 1e-3 * ((50 - entry["step"]) / 50)  # float64, as torch's get_last_lr()
    assert trainer.lr_scheduler.get_last_lr() == [history[-1]["learning_rate"]]
    with pytest.raises(RuntimeError, match="read-only"):
        trainer.lr_scheduler.step()


BAD_INPUTS = {
    "nothing": (dict(), ValueError, "Step should include `input_ids` or `texts` as keyword arguments."),
    "ids_not_a_list": (dict(input_ids=5), TypeError, "input_ids must be a list of tensors"),
    "ids_elements": (dict(input_ids=[5, 6]), TypeError, "Elements in input_ids must be tensors"),
    "ids_empty_example": (dict(input_ids=[torch.tensor([], dtype=torch.long)]), ValueError, "input_ids[0] is empty"),
    "ids_float": (dict(input_ids=[torch.tensor([1.0, 2.0])]), TypeError, "input_ids[0] has dtype float32"),
    "ids_negative": (dict(input_ids=[[5, -3]]), ValueError, "input_ids[0] contains negative"),
    "ids_outside_vocab": (dict(input_ids=[[5, 6], [7, 999]]), ValueError, "input_ids[1] contains the id 999"),
    "mask_not_a_list": (dict(input_ids=[[5, 6]], attention_mask="11"), TypeError, "attention_mask must be a list"),
    "mask_count": (dict(input_ids=[[5, 6], [7, 8]], attention_mask=[[1, 1]]), ValueError,
                   "attention_mask has 1 examples but input_ids has 2"),
    "mask_length": (dict(input_ids=[[5, 6]], attention_mask=[[1, 1, 1]]), ValueError,
                    "attention_mask[0] has length 3 but input_ids[0] has 2"),
    "mask_not_binary": (dict(input_ids=[[5, 6]], attention_mask=[[1, 2]]), ValueError, "attention_mask[0] contains [2]"),
    "labels_not_a_list": (dict(input_ids=[[5, 6]], labels=7), TypeError, "labels must be a list of tensors"),
    "labels_count": (dict(input_ids=[[5, 6]], labels=[[5, 6], [7, 8]]), ValueError,
                     "labels has 2 examples but input_ids has 1"),
    "labels_length": (dict(input_ids=[[5, 6]], labels=[[5]]), ValueError, "labels[0] has length 1"),
    "labels_negative": (dict(input_ids=[[5, 6]], labels=[[5, -5]]), ValueError, "labels[0] contains negative"),
    "labels_outside_vocab": (dict(input_ids=[[5, 6]], labels=[[5, 300]]), ValueError, "labels[0] contains the id 300"),
    "texts_not_a_list": (dict(texts="hello"), TypeError, "'text' must be a list of strings"),
    "texts_elements": (dict(texts=[1, 2]), TypeError, "Elements in 'text' must be strings"),
    "texts_labels_not_a_list": (dict(texts=["a b"], texts_labels="c"), TypeError,
                                "'text_labels' must be a list of strings"),
    "texts_labels_elements": (dict(texts=["a b"], texts_labels=[3]), TypeError,
                              "Elements in 'text_labels' must be strings"),
    "texts_labels_count": (dict(texts=["a b", "c d"], texts_labels=["e"]), ValueError,
                           "texts_labels has 1 strings but texts has 2"),
    "unknown_keyword": (dict(input_ids=[[5, 6]], label=[[5, 6]], prompts=["x"]), TypeError,
                        "unexpected keyword argument(s) label, prompts"),
}


@pytest.mark.parametrize("kwargs", [dict(input_ids=[]), dict(texts=[]), dict(input_ids=torch.zeros(0, 4, dtype=torch.long))])
def test_empty_step_is_a_warned_no_op_as_in_the_core(shared, kwargs):
    """A round whose filter kept nothing: the facade passes it to the core, which warns and trains nothing."""
    trainer, model = shared
    jax_before = {k: v.copy() for k, v in hf_state_dict(trainer.jax_model).items()}
    step, version = trainer.state.global_step, trainer.core.params_version
    with pytest.warns(UserWarning, match="no examples"):
        stats = trainer.step(**kwargs)
    assert stats["num_updates"] == 0 and stats["num_tokens"] == 0
    assert trainer.state.global_step == trainer.core.state.global_step == step and trainer.core.params_version == version
    for name, value in hf_state_dict(trainer.jax_model).items():
        np.testing.assert_array_equal(value, jax_before[name])


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_step_input_is_rejected_and_changes_nothing(shared, case):
    trainer, model = shared
    kwargs, error, message = BAD_INPUTS[case]
    torch_before = torch_snapshot(trainer.model)  # synced now, so reading it later copies nothing new
    jax_before = hf_state_dict(trainer.jax_model)
    jax_before = {k: v.copy() for k, v in jax_before.items()}
    step, version, logs = trainer.state.global_step, trainer.core.params_version, len(trainer.state.log_history)

    with pytest.raises(error) as raised:
        trainer.step(**kwargs)

    assert message in str(raised.value)
    assert (trainer.state.global_step, trainer.core.state.global_step) == (step, step)
    assert trainer.core.params_version == version and len(trainer.state.log_history) == logs
    for name, value in hf_state_dict(trainer.jax_model).items():
        np.testing.assert_array_equal(value, jax_before[name])
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, torch_before[name]), name


def test_user_labels_are_learned_and_eos_equal_to_pad_is_learned(shared):
    """TRL bug §8.1: causal labels were replaced by input_ids with every pad id (= EOS here) masked."""
    trainer, _ = shared
    eos = trainer.processing_class.eos_token_id
    ids = [torch.tensor([5, 6, 7, 8, eos]), torch.tensor([9, 10, 11, eos])]
    labels = [torch.tensor([-100, -100, 7, 8, eos]), torch.tensor([-100, 10, 11, eos])]
    assert trainer.step(input_ids=ids, labels=labels)["num_tokens"] == 3 + 3  # the prompts are not learned
    # pad == eos (TRL's tests' setting): the EOS tokens are still targets, padding comes from attention_mask
    assert trainer.step(input_ids=ids)["num_tokens"] == 4 + 3


def test_texts_labels_are_tokenized_and_learned_alone(shared):
    """TRL bug §8.2: texts_labels were never tokenized (texts were tokenized twice)."""
    trainer, _ = shared
    tokenizer = trainer.processing_class
    completions = ["jumps over the lazy dog", "sleeps"]
    stats = trainer.step(texts=["the quick brown fox", "a small cat"], texts_labels=completions)
    # each completion's tokens, plus the EOS jaxsft appends to a completion that lacks it (TrainConfig.add_eos)
    assert stats["num_tokens"] == sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in completions)


def test_optimize_device_cache_is_per_instance(shared, tmp_path, monkeypatch):
    """TRL bug §8.13: optimize_device_cache set a process-global class flag."""
    trainer, _ = shared
    freed = []
    monkeypatch.setattr(compat_trainer, "_free_device_memory", lambda: freed.append(1))
    other = IterativeSFTTrainer(tiny.tiny_torch_model("llama"), targs(tmp_path), trainer.processing_class)
    trainer.step(input_ids=[[5, 6, 7]])
    assert freed == [1]
    assert trainer.optimize_device_cache and not other.optimize_device_cache
    assert "optimize_device_cache" not in vars(IterativeSFTTrainer)


def test_save_model_writes_a_folder_transformers_loads(shared, tmp_path):
    trainer, model = shared
    trainer.save_model(str(tmp_path / "saved"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert len(AutoTokenizer.from_pretrained(tmp_path / "saved")) == 300
    assert (tmp_path / "saved" / "training_args.bin").is_file()
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == "llama"


def test_save_model_failing_at_its_last_file_leaves_the_previous_save(shared, tmp_path, monkeypatch):
    """save_model is written whole beside the folder and swapped in: a failure at its last file (here
    training_args.bin) leaves the previous save byte for byte, raised as OSError naming the folder (issue 26)."""
    import hashlib

    trainer, _ = shared
    target = tmp_path / "saved"
    trainer.save_model(str(target))
    digest = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in target.iterdir()}  # noqa: E731
    before = digest()
    trainer.step(input_ids=[[5, 6, 7, 8]])  # new weights to save

    def full_disk(obj, path, *args, **kwargs):
        raise RuntimeError("No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=rf"save_model: writing {re.escape(str(target))} failed") as err:
        trainer.save_model(str(target))
    assert err.value.errno == 28
    assert digest() == before and sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_create_model_card(shared):
    trainer, _ = shared
    trainer.create_model_card(model_name="tiny-iterative", tags=["mine"])
    card = (Path(trainer.args.output_dir) / "README.md").read_text()
    assert "Iterative SFT" in card and "# Model Card for tiny-iterative" in card
    for tag in ("trl", "iterative-sft", "jaxsft", "mine"):
        assert f"- {tag}\n" in card


def test_push_to_hub_offline_fails_with_a_clear_message(shared, monkeypatch):
    import huggingface_hub.constants

    trainer, _ = shared
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match=r"offline mode is enabled \(HF_HUB_OFFLINE=1\)"):
        trainer.push_to_hub()
    folder = Path(trainer.args.output_dir)
    assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()  # saved locally first


# ---------------------------------------------------------------------------------------------------------
# callbacks, logging, evaluation, gradient accumulation, truncation (one trainer, events recorded)


class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []
        self.models = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.events.append(("train_begin", state.global_step, None))
        self.models.append(model)

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append(("step_end", state.global_step, None))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.events.append(("log", state.global_step, tuple(sorted(logs))))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.events.append(("evaluate", state.global_step, tuple(sorted(metrics))))


class FakeIntegration(Recorder):
    """Stands in for a report_to integration (tensorboard is not a dependency)."""

    instances: list = []

    def __init__(self):
        super().__init__()
        FakeIntegration.instances.append(self)


EVAL_IDS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18, 19, 20, 21, 22]]


@pytest.fixture(scope="module")
def events(tmp_path_factory, tok_dir):
    """bs=1, GA=2, max_length=16 (keep_start), eval every 2 updates with compute_metrics; one step() of
    4 examples of 20 tokens. Returns (trainer, recorder, stats, compute_metrics inputs, printed text)."""
    import io
    from contextlib import redirect_stdout

    from transformers.integrations import integration_utils

    seen = []

    def compute_metrics(prediction):
        seen.append(prediction)
        mask = prediction.label_ids[:, 1:] != -100
        hits = prediction.predictions[:, :-1] == prediction.label_ids[:, 1:]
        return {"accuracy": float(hits[mask].mean())}

    tmp = tmp_path_factory.mktemp("events")
    recorder = Recorder()
    FakeIntegration.instances.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "fake", FakeIntegration)
        trainer = IterativeSFTTrainer(
            tiny.tiny_torch_model("gpt2", seed=2),
            targs(tmp, per_device_train_batch_size=1, gradient_accumulation_steps=2, eval_strategy="steps",
                  eval_steps=2, per_device_eval_batch_size=2, report_to=["fake"]),
            tiny.load_tokenizer(tok_dir),
            eval_dataset={"input_ids": [torch.tensor(x) for x in EVAL_IDS]},
            max_length=16,
            truncation_mode="keep_start",
            compute_metrics=compute_metrics,
            preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1),
            callbacks=[recorder],
            mesh=single_mesh(),
        )
    rng = np.random.default_rng(3)
    long_examples = [torch.tensor(rng.integers(3, 300, size=20)) for _ in range(4)]
    printed = io.StringIO()
    with redirect_stdout(printed):
        stats = trainer.step(input_ids=long_examples)
    return trainer, recorder, stats, seen, printed.getvalue()


@pytest.mark.slow
def test_gradient_accumulation_steps_are_honoured(events):
    """TRL bug §8.6: with transformers >= 4.47 every micro-batch was an optimizer update."""
    trainer, _, stats, _, _ = events
    assert (stats["num_microbatches"], stats["num_updates"], trainer.state.global_step) == (4, 2, 2)


def test_max_length_truncates_the_sequence_axis(events):
    """TRL bug §8.3: max_length sliced the batch axis on the token path, dropping examples."""
    _, _, stats, _, _ = events
    assert stats["num_tokens"] == 4 * (16 - 1)  # all 4 examples kept, each cut to 16 tokens


def test_callbacks_fire_like_hf_trainer(events):
    """TRL bug §8.10: only on_log / on_evaluate fired; now on_train_begin, on_step_end too, with grad_norm logged."""
    trainer, recorder, _, _, printed = events
    train_keys = ("grad_norm", "learning_rate", "loss")
    eval_keys = ("eval_accuracy", "eval_loss", "eval_num_tokens", "eval_runtime", "eval_samples_per_second")
    assert recorder.events == [
        ("train_begin", 0, None),
        ("log", 1, train_keys),
        ("step_end", 1, None),
        ("log", 2, eval_keys),  # evaluation before the same step's training log, as TRL
        ("evaluate", 2, eval_keys),
        ("log", 2, train_keys),
        ("step_end", 2, None),
    ]
    assert FakeIntegration.instances and FakeIntegration.instances[-1].events == recorder.events  # report_to
    assert recorder.models == [trainer.model]  # callbacks get the caller's torch model itself
    history = trainer.state.log_history
    assert [h["step"] for h in history] == [1, 2, 2] and "eval_loss" in history[1]
    assert printed.count("'loss':") == 2 and "'eval_loss':" in printed  # PrinterCallback (disable_tqdm=True)


def test_evaluate_computes_hf_metrics(events):
    """HF-style evaluate(); also TRL bug §8.11: evaluation left the torch model in eval mode (here the
    torch model's train/eval mode is never touched)."""
    trainer, recorder, _, seen, _ = events
    mode = trainer.model.training
    prediction = seen[0]
    assert prediction.predictions.shape == prediction.label_ids.shape == (3, 9)  # argmax, padded with -100
    assert prediction.label_ids[1].tolist() == EVAL_IDS[1] + [-100] * 6
    metrics = trainer.evaluate()
    assert trainer.state.global_step == 2  # evaluation does not advance the step
    expected = torch_mean_token_loss(trainer.model, [torch.tensor(x) for x in EVAL_IDS])
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_num_tokens"] == 5 + 2 + 8
    assert recorder.events[-1][0] == "evaluate" and trainer.state.log_history[-1]["step"] == 2
    named = trainer.evaluate({"held_out": [[5, 6, 7, 8]]})
    assert set(named) >= {"eval_held_out_loss", "eval_held_out_accuracy"}
    prefixed = trainer.evaluate(["the quick brown fox"], metric_key_prefix="test")
    assert "test_loss" in prefixed and "eval_loss" not in prefixed
    assert trainer.model.training == mode


# ---------------------------------------------------------------------------------------------------------
# optimizers


def _calls(seed: int, n: int = 4):
    rng = np.random.default_rng(seed)
    return [ids_batch(rng, int(rng.integers(2, 5))) for _ in range(n)]


@pytest.mark.slow
def test_torch_adamw_and_hf_scheduler_reproduce_the_default_run(tmp_path, tokenizer):
    """optimizers=(AdamW with HF's decay groups, get_scheduler('linear')) == the run built from args.

    Also shows that a seeded run is reproducible (TRL shuffled with torch's global RNG).
    """
    args = targs(tmp_path, weight_decay=0.01, warmup_steps=2, max_steps=8)
    first = tiny.tiny_torch_model("llama", seed=4)
    second = copy.deepcopy(first)
    decay = set(Trainer.get_decay_parameter_names(None, second))
    groups = [
        {"params": [p for n, p in second.named_parameters() if n in decay], "weight_decay": 0.01},
        {"params": [p for n, p in second.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=8)
    expected_lrs = []
    for _ in range(5):
        opt.step()
        sched.step()
        expected_lrs.append(sched.get_last_lr()[0])
    opt = torch.optim.AdamW(groups, lr=1e-3)  # fresh, unstepped copies for the trainer
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=8)

    a = IterativeSFTTrainer(first, args, tokenizer, max_length=32, mesh=single_mesh())
    b = IterativeSFTTrainer(second, args, tokenizer, optimizers=(opt, sched), max_length=32, mesh=single_mesh())
    for call in _calls(7, n=5):
        a.step(input_ids=call)
        b.step(input_ids=call)

    ha, hb = a.state.log_history, b.state.log_history
    assert len(ha) == len(hb) == 5
    assert [h["learning_rate"] for h in hb] == [h["learning_rate"] for h in ha] == expected_lrs
    np.testing.assert_allclose([h["grad_norm"] for h in hb], [h["grad_norm"] for h in ha], rtol=1e-6)
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        np.testing.assert_allclose(pb.detach().numpy(), pa.detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=name)


def _update_norm(trainer, call) -> tuple[float, dict]:
    before = {k: v.copy() for k, v in hf_state_dict(trainer.jax_model).items()}
    stats = trainer.step(input_ids=call)
    after = hf_state_dict(trainer.jax_model)
    return math.sqrt(sum(float(np.sum((after[k] - before[k]) ** 2)) for k in before)), stats


def test_optax_optimizer_gets_torch_exact_clipping_in_front(tmp_path, tokenizer):
    model = tiny.tiny_torch_model("llama")
    trainer = IterativeSFTTrainer(
        model, targs(tmp_path, max_grad_norm=1e-3), tokenizer, optimizers=(optax.sgd(1.0), None), max_length=32,
        mesh=single_mesh(),
    )
    norm, stats = _update_norm(trainer, [[5, 6, 7, 8, 9]])
    assert stats["grad_norm"] > 1e-3  # clipping was active
    assert norm == pytest.approx(1e-3 * stats["grad_norm"] / (stats["grad_norm"] + 1e-6), rel=1e-4)
    assert stats["learning_rate"] is None and "learning_rate" not in trainer.state.log_history[-1]


def test_max_grad_norm_zero_disables_clipping(tmp_path, tokenizer):
    """TRL bug §8.8: max_grad_norm=0 zeroed every gradient; HF Trainer (and jaxsft) treat it as no clipping.

    Also: an optax optimizer with an optax schedule in the scheduler slot logs that schedule's rate.
    """
    schedule = optax.linear_schedule(1.0, 0.5, 10)
    trainer = IterativeSFTTrainer(
        tiny.tiny_torch_model("llama"), targs(tmp_path, max_grad_norm=0.0), tokenizer,
        optimizers=(optax.sgd(schedule), schedule), max_length=32, mesh=single_mesh(),
    )
    norm, stats = _update_norm(trainer, [[5, 6, 7, 8, 9]])
    assert stats["grad_norm"] > 0 and norm == pytest.approx(stats["grad_norm"], rel=1e-4)  # sgd at rate 1: -grad
    assert trainer.state.log_history[-1]["learning_rate"] == pytest.approx(0.95)


def test_precompile_converts_like_step_and_trains_nothing(tmp_path, tokenizer):
    """The facade's precompile(): step()'s torch inputs, converted as step() converts them, compiled by the core;
    the caller's model is untouched and the step that follows compiles nothing."""
    model = tiny.tiny_torch_model("llama", seed=5)
    before = torch_snapshot(model)
    trainer = IterativeSFTTrainer(model, targs(tmp_path), tokenizer, max_length=32, mesh=single_mesh())
    batch = torch.randint(4, 60, (3, 12))
    mask = torch.ones_like(batch)
    mask[0, 9:] = 0  # a padded row: the mask must reach the plan, as in step()
    report = trainer.precompile(input_ids=batch, attention_mask=mask)
    assert report["new_programs"] >= 1 and trainer.state.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(TypeError, match=r"precompile\(\) got unexpected keyword argument\(s\) label"):
        trainer.precompile(input_ids=batch, label=batch)
    stats = trainer.step(input_ids=batch, attention_mask=mask)
    assert stats["compile_seconds"] == 0.0 and stats["compiled_shapes"] == report["compiled_shapes"]
