"""Flax NNX language models and their Hugging Face checkpoint mapping."""

from jaxsft.models.decoder import CausalLM, KVCache
from jaxsft.models.interface import LanguageModel, LMHead
from jaxsft.models.hf_io import CheckpointError, hf_state_dict, init_model, save_pretrained
from jaxsft.models.loading import from_pretrained
from jaxsft.models.seq2seq import Seq2SeqLM
from jaxsft.models.seq2seq_spec import Seq2SeqSpec
from jaxsft.models.families import DECODER_MODEL_TYPES as SUPPORTED_MODEL_TYPES, SEQ2SEQ_MODEL_TYPES, spec_from_hf_config
from jaxsft.models.lora import LoraConfig, add_lora
from jaxsft.models.peft_io import AdapterError, load_adapter, save_adapter
from jaxsft.models.spec import ModelSpec, UnsupportedModelError

__all__ = [
    "CausalLM", "KVCache", "CheckpointError", "from_pretrained", "hf_state_dict", "init_model",
    "save_pretrained", "SUPPORTED_MODEL_TYPES", "ModelSpec", "spec_from_hf_config", "UnsupportedModelError",
    "Seq2SeqLM", "Seq2SeqSpec", "SEQ2SEQ_MODEL_TYPES",
    "LanguageModel", "LMHead", "LoraConfig", "add_lora", "AdapterError", "load_adapter", "save_adapter",
]
