"""LoRA in the generate → train loop: generation with the adapted weights, checkpoints/resume, dropout."""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
import torch

import jaxsft
from jaxsft.models import lora as lora_lib
from jaxsft.models import peft_io

import tiny

peft = pytest.importorskip("peft")

@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    """As tests/test_trainer_parity.py: skip LLVM backend optimisation passes (HLO semantics unchanged)."""
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


PROMPTS = ["the quick brown fox", "one two three four five six", "a small cat"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny.load_tokenizer(tiny.tokenizer_dir(str(tmp_path_factory.mktemp("tok"))))


def _peft_llama(seed: int = 0):
    torch.manual_seed(seed)
    base = tiny.tiny_torch_model("llama")
    config = peft.LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")
    return peft.get_peft_model(base, config).eval()


def test_greedy_generation_uses_the_adapted_weights(tok):
    """jaxsft's KV-cache decode with adapters applied in the matmul = peft's generate on transformers."""
    peft_model = _peft_llama()
    model = jaxsft.from_pretrained(peft_model, mesh=jaxsft.single_device_mesh())
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = peft_model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
        plain = peft_model.get_base_model()
        with peft_model.disable_adapter():
            base_ref = plain.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    ref = ref[:, enc["input_ids"].shape[1]:].numpy()
    base_ref = base_ref[:, enc["input_ids"].shape[1]:].numpy()
    assert not np.array_equal(ref, base_ref)  # the adapters change what is generated
    ours = jaxsft.generate(model, tok, PROMPTS, max_new_tokens=10, return_tokens=True)
    for r, row in enumerate(ours.tokens):
        np.testing.assert_array_equal(row, ref[r, : len(row)], err_msg=f"row {r}")


def _trainer(model, **overrides):
    cfg = dict(learning_rate=2e-2, per_device_train_batch_size=2, max_length=32, disable_tqdm=True, max_steps=20,
               warmup_steps=1, seed=7)
    cfg.update(overrides)
    return jaxsft.IterativeSFTTrainer(model, jaxsft.TrainConfig(**cfg))


def _calls(vocab: int, n_calls: int):
    rng = np.random.default_rng(3)
    return [[rng.integers(3, vocab, size=int(rng.integers(10, 30))) for _ in range(6)] for _ in range(n_calls)]


@pytest.mark.slow
def test_checkpoint_resume_covers_the_adapters(tmp_path):
    """Save after two calls, restore into a fresh trainer on a fresh base: the next calls match the unbroken run."""
    peft_model = _peft_llama()
    calls = _calls(300, 4)
    config = dict(lora_dropout=0.1)  # dropout draws from the checkpointed RNG, so it must resume too

    def fresh():
        model = jaxsft.from_pretrained(peft_model, mesh=jaxsft.single_device_mesh())
        setup = lora_lib.LoraSetup(
            lora_lib.LoraConfig(**{**_config_kwargs(model.lora.config), **config}), model.lora.sites
        )
        model.lora = setup  # same adapters, with dropout on
        return model

    unbroken = _trainer(fresh())
    losses = [unbroken.step(input_ids=c)["update_losses"] for c in calls]

    first = _trainer(fresh())
    for c in calls[:2]:
        first.step(input_ids=c)
    path = first.save_checkpoint(str(tmp_path / "ckpt"))
    resumed = _trainer(fresh())
    resumed.restore_checkpoint(path)
    resumed_losses = [resumed.step(input_ids=c)["update_losses"] for c in calls[2:]]
    np.testing.assert_allclose(resumed_losses, losses[2:], rtol=1e-6)
    got, want = peft_io.export_adapters(resumed.model), peft_io.export_adapters(unbroken.model)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)


def _config_kwargs(c: lora_lib.LoraConfig) -> dict:
    return dict(r=c.r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, target_modules=c.target_modules,
                use_rslora=c.use_rslora)


@pytest.mark.slow
def test_dropout_trains_differently_but_never_touches_evaluation():
    base = tiny.tiny_torch_model("llama")
    calls = _calls(300, 1)
    runs = {}
    for rate in (0.0, 0.3):
        model = jaxsft.from_pretrained(base, mesh=jaxsft.single_device_mesh())
        jaxsft.add_lora(model, jaxsft.LoraConfig(r=4, lora_alpha=8, lora_dropout=rate, target_modules="all-linear"), seed=1)
        trainer = _trainer(model, warmup_steps=0)  # (warmup's first update has rate 0 and would move nothing)
        eval_before = trainer.evaluate({"input_ids": calls[0]})["eval_loss"]
        runs[rate] = (eval_before, trainer.step(input_ids=calls[0])["update_losses"])
    (eval0, losses0), (eval3, losses3) = runs[0.0], runs[0.3]
    assert eval0 == pytest.approx(eval3, rel=1e-6)  # no dropout outside training
    assert losses0[0] == pytest.approx(losses3[0], rel=1e-6)  # B = 0 at init: the first forward is the base's
    assert abs(losses0[1] - losses3[1]) > 1e-4  # afterwards dropout changes the training forward
