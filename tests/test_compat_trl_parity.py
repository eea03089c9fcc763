"""compat.IterativeSFTTrainer against the real TRL 0.23.1 IterativeSFTTrainer (reference venv, CPU, fp32).

Both trainers start from the same tiny Llama and GPT-2 checkpoints (built locally, saved with
save_pretrained; GPT-2 with dropout 0, since jaxsft has none), get the same TrainingArguments
(lr 1e-3, 2 warmup steps, weight decay 0.01, max_grad_norm 1, linear schedule over max_steps=16,
logging_steps=1) and the same step() calls: 6 calls of token tensors, then 6 calls of texts (texts only:
TRL's texts_labels is buggy). Every call holds at most per_device_train_batch_size examples, so each
call is ONE micro-batch and ONE update on both sides and TRL's shuffling cannot matter; token ids
start at 3, so TRL's pad-id masking (pad = 0) never touches a real token. TRL's per-update loss is then
the mean over that micro-batch's label tokens, which is exactly jaxsft's.

Checked: global_step after every call; the logged losses agree to 1e-4 (both are rounded to 4 places),
the logged learning rates exactly; on the texts path both trained on the same token ids; the final
torch weights agree to 1e-3 relative (per tensor, against its largest magnitude).

Slow: builds the reference venv on first use (about a minute) and runs TRL twice (in parallel with
the jaxsft runs).
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, TrainingArguments

import jaxsft
from compat import IterativeSFTTrainer

from trl_ref import reference_python, run_trl, save_tiny_llama

pytestmark = pytest.mark.slow

TRAINING_ARGS = dict(
    per_device_train_batch_size=4, max_steps=16, learning_rate=1e-3, warmup_steps=2, weight_decay=0.01,
    max_grad_norm=1.0, lr_scheduler_type="linear", logging_steps=1, seed=42,
)
TEXTS = [
    ["the quick brown fox jumps over the lazy dog", "to be or not to be"],
    ["all that glitters is not gold", "a journey of a thousand miles begins with a single step", "the rain"],
    ["iterative supervised fine tuning repeats generate filter train", "that is the question"],
    ["the rain in spain stays mainly in the plain", "a single step", "not gold", "the lazy dog"],
    ["begins with a journey", "generate filter train repeats"],
    ["mainly in spain", "the question is not to be", "over the quick fox"],
]


def token_calls(vocab: int) -> list[dict]:
    """6 calls of 2-4 examples (4-24 tokens, ids >= 3); odd calls also pass attention_mask and labels."""
    rng = np.random.default_rng(11)
    calls = []
    for c in range(6):
        rows = [rng.integers(3, vocab, size=int(rng.integers(4, 25))).tolist() for _ in range(int(rng.integers(2, 5)))]
        call = {"input_ids": rows}
        if c % 2:
            call["attention_mask"] = [[1] * len(r) for r in rows]
            call["labels"] = [list(r) for r in rows]
        calls.append(call)
    return calls


def save_tiny_gpt2(directory: Path, vocab_size: int, seed: int = 0) -> Path:
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(directory / "model", safe_serialization=True)
    return directory / "model"


def run_compat(model_dir: Path, tok_dir: Path, calls: list[dict], out: Path):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))  # what the harness loads too
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    args = TrainingArguments(output_dir=str(out), report_to=[], disable_tqdm=True, **TRAINING_ARGS)
    trainer = IterativeSFTTrainer(model, args, processing_class=tokenizer, mesh=jaxsft.single_device_mesh())
    steps, update_losses = [], []
    for call in calls:
        kwargs = {k: [torch.tensor(row) for row in v] if k != "texts" else v for k, v in call.items()}
        stats = trainer.step(**kwargs)
        steps.append(trainer.state.global_step)
        update_losses += stats["update_losses"]
    return trainer, steps, update_losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_parity")
    llama_dir, tok_dir = save_tiny_llama(root / "llama")
    vocab = len(PreTrainedTokenizerFast.from_pretrained(str(tok_dir)))
    gpt2_dir = save_tiny_gpt2(root / "gpt2", vocab)
    calls = token_calls(vocab) + [{"texts": t} for t in TEXTS]
    reference_python()  # build (or find) the venv once, before the two TRL runs start
    spec = {"tokenizer_dir": str(tok_dir), "training_args": TRAINING_ARGS, "steps": calls}
    models = {"llama": llama_dir, "gpt2": gpt2_dir}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        trl = {
            name: pool.submit(run_trl, {**spec, "model_dir": str(path)}, root / f"trl_{name}")
            for name, path in models.items()
        }
        ours = {name: run_compat(path, tok_dir, calls, root / f"compat_{name}") for name, path in models.items()}
        results = {name: (future.result(), root / f"trl_{name}") for name, future in trl.items()}
    return {name: (results[name][0], results[name][1], *ours[name], calls) for name in models}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logged_losses_and_learning_rates_match_trl(runs, family):
    trl, _, trainer, steps, update_losses, calls = runs[family]
    assert trl["versions"]["trl"] == "0.23.1"
    assert [c["global_step"] for c in trl["calls"]] == steps == list(range(1, len(calls) + 1))
    theirs, ours = trl["final"]["log_history"], trainer.state.log_history
    assert [h["step"] for h in ours] == [h["step"] for h in theirs] == steps
    assert [h["learning_rate"] for h in ours] == [h["learning_rate"] for h in theirs]  # exactly
    np.testing.assert_allclose([h["loss"] for h in ours], [h["loss"] for h in theirs], rtol=0, atol=1.0001e-4)
    # and unrounded: TRL's per-micro-batch loss is each update's loss here
    trl_losses = [mb["loss"] for c in trl["calls"] for mb in c["micro_batches"]]
    np.testing.assert_allclose(update_losses, trl_losses, rtol=2e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_texts_are_tokenized_like_trl(runs, family):
    trl, _, trainer, _, _, calls = runs[family]
    tokenizer = trainer.processing_class
    for call, record in zip(calls, trl["calls"]):
        if "texts" not in call:
            continue
        (micro,) = record["micro_batches"]
        trained = sorted(
            [t for t, m in zip(ids, mask) if m] for ids, mask in zip(micro["input_ids"], micro["attention_mask"])
        )
        assert trained == sorted(tokenizer(call["texts"])["input_ids"])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_final_torch_weights_match_trl(runs, family):
    _, trl_dir, trainer, _, _, _ = runs[family]
    theirs = load_file(str(trl_dir / "final_model.safetensors"))
    ours = {name: p.detach().numpy() for name, p in trainer.model.named_parameters()}
    assert set(ours) <= set(theirs)
    worst = {}
    for name, value in ours.items():
        want = theirs[name]
        scale = float(np.abs(want).max())
        if name.endswith("attn.c_attn.bias"):
            # GPT-2's key bias gets an exactly zero gradient (softmax ignores a shift shared by all keys), so
            # both sides move it by rounding noise only (~1e-6, amplified by Adam): check it stays tiny.
            third = value.shape[0] // 3
            key, want_key = value[third : 2 * third], want[third : 2 * third]
            assert max(np.abs(key).max(), np.abs(want_key).max()) < 1e-4, name
            value, want = np.delete(value, np.s_[third : 2 * third]), np.delete(want, np.s_[third : 2 * third])
        worst[name] = float(np.abs(value - want).max()) / scale
    assert max(worst.values()) <= 1e-3, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    initial = {n: p for n, p in AutoModelForCausalLM.from_pretrained(
        str(Path(trainer.model.config._name_or_path)), dtype=torch.float32).named_parameters()}
    moved = [n for n in ours if not np.array_equal(ours[n], initial[n].detach().numpy())]
    assert len(moved) == len(ours)  # a trivially passing comparison would hide a no-op trainer
