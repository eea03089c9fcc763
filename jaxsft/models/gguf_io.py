"""GGUF files in, without torch: llama.cpp's single-file checkpoints read with ``gguf`` + numpy.

Why: the bundled SmolLM2 ships as a GGUF file, and transformers' GGUF reader is a torch class,
so reading it through transformers made torch (a CUDA download on plain PyPI) a dependency of
the main job. This module parses the file once, builds the transformers config and the tokenizer
from its metadata, and dequantizes each tensor to fp32 with ``gguf``'s numpy kernels only when
:func:`jaxsft.models.hf_io.from_pretrained` reads it, under its Hugging Face name.

Two things differ from a Hugging Face checkpoint and are undone here:
- llama.cpp stores Llama's q/k projections with the rows of each head interleaved for its own
  rotary embedding (``convert_hf_to_gguf.py``'s permute); :func:`unpermute_rows` restores HF's order.
- tensors are quantized blocks (Q4_1, Q8_0, ...) or F16/F32: every one comes out as fp32, the
  dtype transformers' reader gives them too (``tests/test_smollm2.py`` checks equal logits).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import numpy as np

__all__ = ["GGUFCheckpoint", "is_gguf_file", "unpermute_rows"]

# llama.cpp's metadata keys (after "<architecture>.") -> transformers config names, for the Llama family.
_LLAMA_CONFIG = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
_TOKEN_IDS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "padding_token_id": "pad_token_id"}

# GGUF tensor names -> Hugging Face Llama names ("{i}": the layer).
_LLAMA_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def is_gguf_file(source: Any) -> bool:
    """True for a path to an existing ``.gguf`` file."""
    return isinstance(source, (str, os.PathLike)) and str(source).endswith(".gguf") and Path(source).is_file()


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: within each head, rows [even halves..., odd halves...] -> HF's order.

    llama.cpp writes row ``2j`` / ``2j+1`` of a head's rotary pairs as the pair (j, j + d/2) of HF's
    rotate-half layout; this is the inverse of that reshape-and-swap, on the output (first) axis.
    """
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class GGUFCheckpoint:
    """One GGUF file: its transformers ``config``, its tokenizer, and its tensors under Hugging Face names.

    The file is parsed once (``gguf.GGUFReader`` memory-maps it); tensors are dequantized one at a
    time by :meth:`read`, so it also serves as a tensor source for ``from_pretrained``'s streaming load.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        try:
            import gguf
        except ImportError as err:
            raise ImportError("reading a GGUF file needs the gguf package: pip install 'jaxsft[demo]' "
                              "(or pip install gguf)") from err
        self.path = Path(path)
        self._gguf = gguf
        self._reader = gguf.GGUFReader(str(self.path))
        self.architecture = self._field("general.architecture")
        if self.architecture != "llama":
            raise ValueError(f"{self.path}: GGUF architecture {self.architecture!r} is not supported; jaxsft reads "
                             "Llama-family GGUF files (Llama, SmolLM2). Convert other models to a Hugging Face folder.")
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.config = self._config()
        layers = self.config.num_hidden_layers
        names = {}
        for gguf_name, hf_name in _LLAMA_TENSORS.items():
            for i in range(layers) if "{i}" in gguf_name else [None]:
                names[gguf_name.format(i=i)] = hf_name.format(i=i)
        unknown = sorted(set(self._tensors) - set(names))
        if unknown:
            raise ValueError(f"{self.path}: tensor {unknown[0]} has no Hugging Face Llama counterpart")
        self._hf_to_gguf = {names[g]: g for g in self._tensors}

    # ------------------------------------------------------------------ metadata
    def _field(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def _config(self) -> Any:
        from transformers import LlamaConfig

        values: dict[str, Any] = {}
        for key, name in _LLAMA_CONFIG.items():
            value = self._field(f"llama.{key}")
            if value is not None:
                values[name] = value
        for key, name in _TOKEN_IDS.items():
            value = self._field(f"tokenizer.ggml.{key}")
            if value is not None:
                values[name] = value
        if "vocab_size" not in values:
            values["vocab_size"] = len(self._field("tokenizer.ggml.tokens"))
        values["tie_word_embeddings"] = "output.weight" not in {t.name for t in self._reader.tensors}
        return LlamaConfig(**values)

    def tokenizer(self) -> Any:
        """The tokenizer the file describes (vocabulary, merges, special tokens, chat template), built without torch.

        The backend comes from transformers' GGUF tokenizer builder (the same one ``AutoTokenizer.from_pretrained(
        ..., gguf_file=)`` uses), fed with metadata read here, so no torch-based reader runs.
        """
        from transformers import PreTrainedTokenizerFast

        convert = _gguf_tokenizer_builder()
        tokens = self._field("tokenizer.ggml.tokens")
        spec: dict[str, Any] = {"tokens": tokens}
        for key, name in (("model", "tokenizer_type"), ("pre", "pre_tokenizer_type"), ("scores", "scores"),
                          ("token_type", "token_type"), ("merges", "merges"), ("bos_token_id", "bos_token_id"),
                          ("eos_token_id", "eos_token_id"), ("unknown_token_id", "unk_token_id"),
                          ("padding_token_id", "pad_token_id"), ("add_space_prefix", "add_prefix_space")):
            value = self._field(f"tokenizer.ggml.{key}")
            if value is not None:
                spec[name] = value
        backend, extra = convert(self.architecture, spec)
        special = {}
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
            index = self._field(f"tokenizer.ggml.{key}")
            if index is not None:
                special[name] = tokens[index]
        for key in ("add_bos_token", "add_eos_token"):
            value = self._field(f"tokenizer.ggml.{key}")
            if value is not None:
                special[key] = bool(value)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special, **extra)
        template = self._field("tokenizer.chat_template")
        if template:
            tokenizer.chat_template = template
        return tokenizer

    # ------------------------------------------------------------------ tensors (jaxsft's TensorSource protocol)
    def keys(self) -> list[str]:
        return list(self._hf_to_gguf)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensors[self._hf_to_gguf[key]].shape))

    def is_float(self, key: str) -> tuple[bool, str]:
        return True, "float32"  # every tensor is dequantized (or widened) to fp32

    def read(self, key: str) -> np.ndarray:
        tensor = self._tensors[self._hf_to_gguf[key]]
        values = self._gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        values = np.asarray(values, dtype=np.float32).reshape(self.shape(key))
        if key.endswith("self_attn.q_proj.weight"):
            values = unpermute_rows(values, self.config.num_attention_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            values = unpermute_rows(values, self.config.num_key_value_heads)
        return values

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every tensor, dequantized to fp32, under its Hugging Face name (for torch models and tests)."""
        return {key: self.read(key) for key in self.keys()}


def _gguf_tokenizer_builder():
    """transformers' ``convert_gguf_tokenizer`` (it moved between releases; torch-free in both places)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:
        from transformers.integrations.ggml import convert_gguf_tokenizer
    return convert_gguf_tokenizer
