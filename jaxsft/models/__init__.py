"""Flax NNX language models and their Hugging Face checkpoint mapping."""

from jaxsft.models.decoder import CausalLM, KVCache
from jaxsft.models.hf_io import CheckpointError, from_pretrained, hf_state_dict, init_model, save_pretrained
from jaxsft.models.spec import SUPPORTED_MODEL_TYPES, ModelSpec, UnsupportedModelError

__all__ = [
    "CausalLM", "KVCache", "CheckpointError", "from_pretrained", "hf_state_dict", "init_model",
    "save_pretrained", "SUPPORTED_MODEL_TYPES", "ModelSpec", "UnsupportedModelError",
]
