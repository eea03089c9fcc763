"""The caller's torch model at the facade's edge: loaded from a local folder (never downloaded), checked for what
jaxsft trains, its tokenizer found beside it, its dtype named as ``save_pretrained`` takes it."""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch

import jaxsft


def load_torch_model(model_id: str, init_kwargs: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(model_id) and (os.path.isabs(model_id) or model_id.startswith((".", "~"))
                                         or model_id.count("/") > 1 or os.sep + os.sep in model_id):
        # A path, not a hub id: say the folder is missing (transformers would call it a malformed repo id).
        raise FileNotFoundError(
            f"model={model_id!r}: no such local folder. Pass an existing model folder (config.json and safetensors "
            "weights) or a transformers model instance; jaxsft does not download."
        )

    try:
        return AutoModelForCausalLM.from_pretrained(model_id, **init_kwargs)
    except (OSError, ValueError) as err:
        raise type(err)(
            f"could not load a causal LM from {model_id!r}: {err}. Pass a local model folder (config.json and "
            "safetensors weights) or a transformers model instance."
        ) from err


def check_torch_model(model: Any, adapters: bool = False) -> None:
    """``adapters``: the base of a PeftModel, whose weights are frozen on purpose (only adapters train)."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False) and config.model_type not in jaxsft.models.SEQ2SEQ_MODEL_TYPES:
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder (seq2seq) model of type {config.model_type!r}; jaxsft "
            f"trains the encoder-decoders {', '.join(jaxsft.models.SEQ2SEQ_MODEL_TYPES)} (T5, Flan-T5, BART) and "
            f"the causal LMs {', '.join(jaxsft.models.SUPPORTED_MODEL_TYPES)}."
        )
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen and not adapters:
        raise ValueError(
            f"{len(frozen)} parameter(s) of the model have requires_grad=False (e.g. {frozen[:3]}); jaxsft trains "
            "every parameter. Unfreeze them (param.requires_grad_(True)) before building the trainer."
        )
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and not can_generate():
        warnings.warn(
            f"The current model class {type(model)} is not compatible with `.generate()`"
            "Please make sure that this is intended.",
            UserWarning,
            stacklevel=3,
        )


def local_tokenizer(model_id: Optional[str]) -> Any:
    """TRL 0.18+ loads the tokenizer from the model id; jaxsft only looks in a local folder (never downloads)."""
    if not model_id or not os.path.isdir(model_id):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_id)
    except Exception:  # a weights-only folder: step(input_ids=...) still works
        return None


def dtype_name_of(torch_model: Any) -> str:
    """The torch model's parameter dtype as the name save_pretrained takes ("float32", "bfloat16", "float16")."""
    dtype = next(torch_model.parameters()).dtype
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
