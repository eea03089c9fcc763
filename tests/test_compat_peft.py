"""The facade with peft LoRA models: a TRL 0.23.1 PeftModel script runs with one import changed.

The same script file runs twice: with ``from trl import ...`` in the TRL 0.23.1 reference venv
(tests/trl_reference/; peft, pure Python, is put on its path from this venv's install) and with
``from compat import ...`` here. Every call holds at most per_device_train_batch_size texts, so each
call is one micro-batch and one update on both sides (TRL's shuffling cannot matter), and LoRA
dropout is 0. Checked: the script's PeftModel shows trained adapters (moved from their start,
equal to what jaxsft trained), logged losses agree with TRL's to 1e-4 (both rounded to 4 places),
the final adapters agree with TRL's to 1e-3 relative (per tensor, in norm; every element within 1% of
an Adam step), and the adapter folder ``save_model`` wrote
loads with ``peft.PeftModel.from_pretrained`` to the script's own logits.

The script test is slow: it runs TRL in the reference venv (built on first use).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trl_ref import REPO, reference_python, save_tiny_llama
from xla_settings import child_flags

peft = pytest.importorskip("peft")

SCRIPT = '''
import json, sys
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
{import_line}

model_dir, tok_dir, out = sys.argv[1:4]
tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
torch.manual_seed(0)  # lora_A's random init
model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                                         task_type="CAUSAL_LM"))
before = {{k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}}
args = IterativeSFTConfig(output_dir=out, per_device_train_batch_size=4, learning_rate=2e-2, max_steps=12, warmup_steps=1,
                          logging_steps=1, report_to=[], gradient_checkpointing=False, bf16=False, seed=3,
                          save_strategy="no", disable_tqdm=True)
trainer = IterativeSFTTrainer(model=model, args=args, processing_class=tokenizer)
texts = [["the quick brown fox jumps over the lazy dog", "to be or not to be"],
         ["all that glitters is not gold", "a journey of a thousand miles begins with a single step", "the rain"],
         ["iterative supervised fine tuning repeats generate filter train", "that is the question"],
         ["the rain in spain stays mainly in the plain", "a single step", "not gold", "the lazy dog"]]
for batch in texts:
    trainer.step(texts=batch)
after = get_peft_model_state_dict(trainer.model)
trainer.save_model(out + "/adapter")
with torch.no_grad():
    logits = trainer.model(**tokenizer(["the quick brown fox"], return_tensors="pt")).logits
json.dump({{
    "is_peft_model": type(trainer.model).__name__,
    "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    "global_step": trainer.state.global_step,
    "moved": {{k: float((after[k] - before[k]).abs().max()) for k in after}},
    "adapters": {{k: v.detach().float().tolist() for k, v in after.items()}},
    "logits": logits.float().tolist(),
}}, open(out + "/result.json", "w"))
'''


def _run(python: str, import_line: str, model_dir: Path, tok_dir: Path, out: Path, env: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    script = out / "script.py"
    script.write_text(SCRIPT.format(import_line=import_line))
    proc = subprocess.run([python, str(script), str(model_dir), str(tok_dir), str(out)], capture_output=True, text=True,
                          env=env, timeout=900, cwd=out)
    assert proc.returncode == 0, f"{import_line!r} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_trl_peft_script_runs_with_one_import_changed(tmp_path):
    model_dir, tok_dir = save_tiny_llama(tmp_path / "llama")
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    peft_only = tmp_path / "peft_path"  # this venv's pure-Python peft, and nothing else, for the TRL venv
    peft_only.mkdir()
    (peft_only / "peft").symlink_to(Path(peft.__file__).parent)
    trl_env = {**base_env, "PYTHONPATH": str(peft_only)}
    trl = _run(str(reference_python()), "from trl import IterativeSFTTrainer, IterativeSFTConfig",
               model_dir, tok_dir, tmp_path / "trl", trl_env)

    ours_env = {**base_env, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": child_flags(os.environ.get("XLA_FLAGS", ""))}
    ours = _run(sys.executable, "from compat import IterativeSFTTrainer, IterativeSFTConfig",
                model_dir, tok_dir, tmp_path / "compat", ours_env)

    assert ours["is_peft_model"] == trl["is_peft_model"] == "PeftModelForCausalLM"
    assert ours["global_step"] == trl["global_step"] == 4
    # The script's PeftModel shows the trained adapters: every lora_B moved off its zero start.
    assert set(ours["moved"]) == set(trl["moved"])
    assert all(v > 1e-3 for k, v in ours["moved"].items() if "lora_B" in k)
    np.testing.assert_allclose(ours["losses"], trl["losses"], atol=1.01e-4)
    for key, want in trl["adapters"].items():
        want, got = np.asarray(want), np.asarray(ours["adapters"][key])
        assert np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want), key
        # Every element within 2% of one Adam step (lr 2e-2), the bound tests/test_trainer_parity.py uses:
        # near-zero gradients turn fp32 reduction-order noise into step differences of up to ~1% (1.02% seen
        # on 2026-12-06 at the unchanged 0165e0b as well), while a wrong update moves whole steps.
        assert np.abs(got - want).max() <= 2e-2 * 2e-2, key

    # save_model wrote a PEFT adapter folder; loaded by peft it gives the script's logits.
    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "compat" / "adapter"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    with torch.no_grad():
        logits = loaded(**tok(["the quick brown fox"], return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(logits, np.asarray(ours["logits"]), atol=1e-4)


def test_peft_config_wraps_the_model_and_other_peft_methods_are_refused(tmp_path):
    import torch

    import tiny
    from compat import IterativeSFTConfig, IterativeSFTTrainer

    args = IterativeSFTConfig(output_dir=str(tmp_path), report_to=[], max_steps=4, per_device_train_batch_size=2,
                              learning_rate=1e-2, gradient_checkpointing=False, bf16=False)
    base = tiny.tiny_torch_model("llama")
    with pytest.raises(ValueError, match="peft_config is a IA3Config; the jaxsft facade trains LoRA"):
        IterativeSFTTrainer(base, args, peft_config=peft.IA3Config(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    ia3 = peft.get_peft_model(tiny.tiny_torch_model("llama"), peft.IA3Config(target_modules=["q_proj", "down_proj"],
                                                                            feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match="peft_type='IA3': jaxsft supports LoRA adapters only"):
        IterativeSFTTrainer(ia3, args)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    dora = peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="use_dora=True are not supported"):
        IterativeSFTTrainer(base, args, peft_config=dora)
    with pytest.raises(ValueError, match="optimizers=\\(torch optimizer, ...\\) with a PEFT model"):
        IterativeSFTTrainer(base, args, peft_config=lora, optimizers=(torch.optim.SGD(base.parameters(), lr=0.1), None))
    assert not any(".lora_" in n for n, _ in base.named_parameters())  # nothing was wrapped by the failures

    # peft_config=: TRL SFTTrainer-style; the trainer's model becomes the PeftModel and its adapters train.
    trainer = IterativeSFTTrainer(base, args, peft_config=lora)
    assert trainer.is_peft_model and isinstance(trainer.model, peft.PeftModel)
    with pytest.raises(ValueError, match="already a PeftModel"):
        IterativeSFTTrainer(trainer.model, args, peft_config=lora)
    trainer.step(input_ids=[torch.arange(3, 20), torch.arange(5, 30)])
    trainer.step(input_ids=[torch.arange(3, 20), torch.arange(5, 30)])
    b = dict(trainer.model.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    assert float(b.abs().max()) > 0  # synced back into the PeftModel (B started at 0)
