"""LoRA adapters in and out against the real ``peft`` library (tiny Llama, Qwen2 with rsLoRA, GPT-2; fp32, CPU).

Adapters are given random non-zero values (PEFT's default init makes B = 0, which would hide
every layout bug), so the logits of jaxsft and of peft on transformers only agree when each
A/B block lands on the right rows, heads and layers. Tolerance: logits 1e-4 absolute
(observed ~1e-6); merged weights 1e-6 (the same fp32 sum, different order).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import jaxsft
from jaxsft.models import lora as lora_lib
from jaxsft.models import peft_io

import tiny

peft = pytest.importorskip("peft")

IDS = np.array([[5, 17, 42, 99, 7, 250, 3, 11, 64, 128, 31, 8]])


def _random_adapters(model, config: jaxsft.LoraConfig, seed: int = 0):
    """Attach adapters with every A and B random (so a mis-mapped block changes the logits)."""
    setup = lora_lib.LoraSetup(config, config.resolve(model.spec))
    rng = np.random.default_rng(seed)
    arrays = {
        name: (0.2 * rng.standard_normal((model.spec.num_layers, *shape))).astype(np.float32)
        for name, (shape, _) in lora_lib.adapter_shapes(model.spec, setup).items()
    }
    return lora_lib.attach(model, setup, arrays)


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(IDS)).logits.float().numpy()


CASES = [
    ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    ("qwen2", dict(r=4, lora_alpha=6, target_modules=("q_proj", "k_proj", "v_proj", "down_proj"), use_rslora=True)),
    ("gpt2", dict(r=2, lora_alpha=4, target_modules=("c_attn", "c_proj", "c_fc"))),
    ("gemma2", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    ("gemma3", dict(r=2, lora_alpha=4, target_modules=("q_proj", "o_proj", "gate_proj"))),
]


@pytest.mark.parametrize("family,kwargs", CASES, ids=[c[0] for c in CASES])
def test_adapter_folder_loads_in_peft_with_same_logits_and_merges_like_peft(tmp_path, family, kwargs):
    torch_base = tiny.tiny_torch_model(family)
    model = jaxsft.from_pretrained(torch_base, mesh=jaxsft.single_device_mesh())
    _random_adapters(model, jaxsft.LoraConfig(**kwargs))
    ours = np.asarray(model(IDS))

    folder = jaxsft.save_adapter(model, tmp_path / "adapter")
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["use_rslora"] == kwargs.get("use_rslora", False)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_base), str(folder)).eval()
    assert isinstance(peft_model.peft_config["default"], peft.LoraConfig)
    theirs = _torch_logits(peft_model)
    assert np.abs(_torch_logits(torch_base) - theirs).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

    # Merged: jaxsft's save_pretrained folds the adapters in exactly as peft's merge_and_unload.
    merged_dir = jaxsft.save_pretrained(model, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    want = peft_model.merge_and_unload().state_dict()
    got = reloaded.state_dict()
    for key, value in want.items():
        np.testing.assert_allclose(got[key].numpy(), value.numpy(), atol=1e-6, rtol=0, err_msg=key)
    np.testing.assert_allclose(_torch_logits(reloaded), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_peft_made_adapter_loads_from_folder_and_from_peft_model(tmp_path, family):
    torch_base = tiny.tiny_torch_model(family)
    base_dir = tmp_path / "base"
    torch_base.save_pretrained(base_dir)
    targets = ["c_attn", "c_fc"] if family == "gpt2" else ["q_proj", "v_proj", "up_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(copy.deepcopy(torch_base), config).eval()  # init_lora_weights=False: B random
    peft_model.save_pretrained(tmp_path / "adapter")
    theirs = _torch_logits(peft_model)

    from_folder = jaxsft.from_pretrained(base_dir, adapter=tmp_path / "adapter", mesh=jaxsft.single_device_mesh())
    assert from_folder.lora.config.r == 4 and from_folder.lora.config.lora_alpha == 16.0
    np.testing.assert_allclose(np.asarray(from_folder(IDS)), theirs, atol=1e-4, rtol=0)
    from_instance = jaxsft.from_pretrained(peft_model, mesh=jaxsft.single_device_mesh())
    np.testing.assert_allclose(np.asarray(from_instance(IDS)), theirs, atol=1e-4, rtol=0)
    # Written back out, the adapter is the one peft made, key for key.
    again = peft_io.export_adapters(from_folder)
    from safetensors.numpy import load_file

    original = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(again) == set(original)
    for key in original:
        np.testing.assert_array_equal(again[key], original[key])


def test_unsupported_peft_methods_and_bad_adapters_are_refused(tmp_path):
    torch_base = tiny.tiny_torch_model("llama")
    model = jaxsft.from_pretrained(torch_base, mesh=jaxsft.single_device_mesh())
    with pytest.raises(ValueError, match=r"c_attn.*use some of \['down_proj', 'gate_proj'"):
        jaxsft.add_lora(model, jaxsft.LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="LoraConfig.r=0"):
        jaxsft.LoraConfig(r=0)
    with pytest.raises(peft_io.AdapterError, match="use_dora=True are not supported; jaxsft supports plain LoRA"):
        peft_io.config_from_peft({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "use_dora": True}, model.spec)
    with pytest.raises(peft_io.AdapterError, match="peft_type='IA3': jaxsft supports LoRA adapters only"):
        peft_io.config_from_peft({"peft_type": "IA3", "target_modules": ["q_proj"]}, model.spec)
    assert lora_lib.lora_setup(model) is None  # nothing was attached by the failures

    # An adapter of another rank than its config says: refused naming the key and both shapes.
    other = jaxsft.from_pretrained(torch_base, mesh=jaxsft.single_device_mesh())
    jaxsft.add_lora(other, jaxsft.LoraConfig(r=4, target_modules=["q_proj"]))
    folder = jaxsft.save_adapter(other, tmp_path / "a")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["r"] = 2
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(peft_io.AdapterError, match=r"q_proj.lora_A.weight has shape \(4, 64\), expected \(2, 64\)"):
        jaxsft.load_adapter(model, folder)
    assert lora_lib.lora_setup(model) is None
