"""The core's one optional door to PyTorch: torch model instances and GGUF files in, as numpy.

The JAX core never needs torch: it reads and writes safetensors with ``safetensors``
and numpy alone. This module is the only place in ``jaxsft`` that imports torch,
and only when a caller hands over a torch object (``from_pretrained(torch_model)``)
or asks for a torch model (``jaxsft.rft.bundled.torch_model``). GGUF files are read without it
(:mod:`jaxsft.models.gguf_io`).
Installing torch is the ``compat`` extra's business (``pip install jaxsft[compat]``).
"""

from __future__ import annotations

import sys
from typing import Any

TORCH_MISSING = (
    "this needs PyTorch, which the JAX core does not install; install the facade's extra, "
    "pip install 'jaxsft[compat]' (with torch pinned, e.g. torch==2.13.0, to get the CPU build)."
)


def is_torch_model(source: Any) -> bool:
    """True for a ``transformers.PreTrainedModel``; never imports torch (none exists unless torch is loaded)."""
    if "torch" not in sys.modules:
        return False
    try:
        from transformers import PreTrainedModel
    except Exception:  # transformers without its torch classes
        return False
    return isinstance(source, PreTrainedModel)


def checked_state_dict(model: Any) -> dict[str, Any]:
    """A torch model's ``state_dict()``, refusing meta (no values) and sparse tensors before anything is read."""
    import torch

    state = model.state_dict()
    for key, tensor in state.items():
        if tensor.is_meta:
            raise ValueError(
                f"the model's weight {key} is on the meta device (no values: e.g. a model built under "
                "init_empty_weights or with device_map='meta'); load real weights before converting it."
            )
        if tensor.layout != torch.strided:
            raise ValueError(f"the model's weight {key} is a sparse tensor ({tensor.layout}); make it dense first.")
    return state


def tensor_as_numpy(tensor: Any) -> Any:
    """One torch tensor as a host numpy array (bf16/fp16 widened to fp32, which is exact)."""
    import torch

    t = tensor.detach().cpu()
    return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()


def causal_lm_from_arrays(config: Any, state: dict[str, Any]) -> Any:
    """A plain fp32 transformers causal LM built from ``config`` and numpy weights under HF names."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        raise ImportError(f"building a torch model: {TORCH_MISSING}") from err
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"weights do not fit the config: missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    model.tie_weights()
    return model.eval()
