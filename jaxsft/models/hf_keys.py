"""Per-family tables between Hugging Face weight names and jaxsft parameters.

Each rule names HF keys (with ``{i}`` for the layer index), the jaxsft
parameters they fill, and the two pure conversions. Loading and saving both walk
these tables, so a name lives in exactly one place.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from jaxsft.models.spec import ModelSpec

Arrays = tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True)
class KeyRule:
    hf: str  # HF key; "{i}" marks a per-layer rule
    ours: tuple[str, ...]  # jaxsft names: top-level ("embed") or per-layer ("q_proj")
    to_ours: Callable[[np.ndarray, ModelSpec], Arrays]
    to_hf: Callable[[Arrays, ModelSpec], np.ndarray]
    when: Callable[[ModelSpec], bool] = lambda s: True

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


def _same(x: np.ndarray, s: ModelSpec) -> Arrays:
    return (x,)


def _same_back(xs: Arrays, s: ModelSpec) -> np.ndarray:
    return xs[0]


def _transpose(x: np.ndarray, s: ModelSpec) -> Arrays:
    return (np.ascontiguousarray(x.T),)


def _transpose_back(xs: Arrays, s: ModelSpec) -> np.ndarray:
    return np.ascontiguousarray(xs[0].T)


def _heads_in(heads_of: Callable[[ModelSpec], int]):
    """torch Linear [heads*dim, hidden] -> ours [hidden, heads, dim]."""

    def to_ours(x: np.ndarray, s: ModelSpec) -> Arrays:
        return (np.ascontiguousarray(x.T).reshape(s.hidden_size, heads_of(s), s.head_dim),)

    def to_hf(xs: Arrays, s: ModelSpec) -> np.ndarray:
        return np.ascontiguousarray(xs[0].reshape(s.hidden_size, -1).T)

    return to_ours, to_hf


def _head_bias(heads_of: Callable[[ModelSpec], int]):
    def to_ours(x: np.ndarray, s: ModelSpec) -> Arrays:
        return (x.reshape(heads_of(s), s.head_dim),)

    def to_hf(xs: Arrays, s: ModelSpec) -> np.ndarray:
        return xs[0].reshape(-1)

    return to_ours, to_hf


def _o_in(x: np.ndarray, s: ModelSpec) -> Arrays:
    """torch Linear [hidden, heads*dim] -> ours [heads, dim, hidden]."""
    return (np.ascontiguousarray(x.T).reshape(s.num_heads, s.head_dim, s.hidden_size),)


def _o_back(xs: Arrays, s: ModelSpec) -> np.ndarray:
    return np.ascontiguousarray(xs[0].reshape(-1, s.hidden_size).T)


def _q_heads(s: ModelSpec) -> int:
    return s.num_heads


def _kv_heads(s: ModelSpec) -> int:
    return s.num_kv_heads


def _untied(s: ModelSpec) -> bool:
    return not s.tie_word_embeddings


LLAMA_RULES: tuple[KeyRule, ...] = (
    KeyRule("model.embed_tokens.weight", ("embed",), _same, _same_back),
    KeyRule("model.norm.weight", ("final_norm_scale",), _same, _same_back),
    KeyRule("lm_head.weight", ("lm_head",), _same, _same_back, when=_untied),
    KeyRule("model.layers.{i}.input_layernorm.weight", ("attn_norm_scale",), _same, _same_back),
    KeyRule("model.layers.{i}.post_attention_layernorm.weight", ("mlp_norm_scale",), _same, _same_back),
    KeyRule("model.layers.{i}.self_attn.q_proj.weight", ("q_proj",), *_heads_in(_q_heads)),
    KeyRule("model.layers.{i}.self_attn.k_proj.weight", ("k_proj",), *_heads_in(_kv_heads)),
    KeyRule("model.layers.{i}.self_attn.v_proj.weight", ("v_proj",), *_heads_in(_kv_heads)),
    KeyRule("model.layers.{i}.self_attn.o_proj.weight", ("o_proj",), _o_in, _o_back),
    KeyRule("model.layers.{i}.self_attn.q_proj.bias", ("q_bias",), *_head_bias(_q_heads), when=lambda s: s.qkv_bias),
    KeyRule("model.layers.{i}.self_attn.k_proj.bias", ("k_bias",), *_head_bias(_kv_heads), when=lambda s: s.qkv_bias),
    KeyRule("model.layers.{i}.self_attn.v_proj.bias", ("v_bias",), *_head_bias(_kv_heads), when=lambda s: s.qkv_bias),
    KeyRule("model.layers.{i}.self_attn.o_proj.bias", ("o_bias",), _same, _same_back, when=lambda s: s.o_bias),
    KeyRule("model.layers.{i}.self_attn.q_norm.weight", ("q_norm_scale",), _same, _same_back, when=lambda s: s.qk_norm),
    KeyRule("model.layers.{i}.self_attn.k_norm.weight", ("k_norm_scale",), _same, _same_back, when=lambda s: s.qk_norm),
    KeyRule("model.layers.{i}.mlp.gate_proj.weight", ("gate_proj",), _transpose, _transpose_back),
    KeyRule("model.layers.{i}.mlp.up_proj.weight", ("up_proj",), _transpose, _transpose_back),
    KeyRule("model.layers.{i}.mlp.down_proj.weight", ("down_proj",), _transpose, _transpose_back),
    KeyRule("model.layers.{i}.mlp.gate_proj.bias", ("gate_bias",), _same, _same_back, when=lambda s: s.mlp_bias),
    KeyRule("model.layers.{i}.mlp.up_proj.bias", ("up_bias",), _same, _same_back, when=lambda s: s.mlp_bias),
    KeyRule("model.layers.{i}.mlp.down_proj.bias", ("down_bias",), _same, _same_back, when=lambda s: s.mlp_bias),
)


def _split_qkv_weight(x: np.ndarray, s: ModelSpec) -> Arrays:
    """GPT-2 Conv1D c_attn [hidden, 3*hidden] (already in x out) -> q, k, v [hidden, heads, dim]."""
    return tuple(np.ascontiguousarray(part).reshape(s.hidden_size, s.num_heads, s.head_dim) for part in np.split(x, 3, axis=1))


def _join_qkv_weight(xs: Arrays, s: ModelSpec) -> np.ndarray:
    return np.concatenate([x.reshape(s.hidden_size, -1) for x in xs], axis=1)


def _split_qkv_bias(x: np.ndarray, s: ModelSpec) -> Arrays:
    return tuple(part.reshape(s.num_heads, s.head_dim) for part in np.split(x, 3))


def _join_qkv_bias(xs: Arrays, s: ModelSpec) -> np.ndarray:
    return np.concatenate([x.reshape(-1) for x in xs])


def _gpt2_o_in(x: np.ndarray, s: ModelSpec) -> Arrays:
    return (x.reshape(s.num_heads, s.head_dim, s.hidden_size),)


def _gpt2_o_back(xs: Arrays, s: ModelSpec) -> np.ndarray:
    return xs[0].reshape(-1, s.hidden_size)


GPT2_RULES: tuple[KeyRule, ...] = (
    KeyRule("transformer.wte.weight", ("embed",), _same, _same_back),
    KeyRule("transformer.wpe.weight", ("pos_embed",), _same, _same_back),
    KeyRule("transformer.ln_f.weight", ("final_norm_scale",), _same, _same_back),
    KeyRule("transformer.ln_f.bias", ("final_norm_bias",), _same, _same_back),
    KeyRule("lm_head.weight", ("lm_head",), _same, _same_back, when=_untied),
    KeyRule("transformer.h.{i}.ln_1.weight", ("attn_norm_scale",), _same, _same_back),
    KeyRule("transformer.h.{i}.ln_1.bias", ("attn_norm_bias",), _same, _same_back),
    KeyRule("transformer.h.{i}.attn.c_attn.weight", ("q_proj", "k_proj", "v_proj"), _split_qkv_weight, _join_qkv_weight),
    KeyRule("transformer.h.{i}.attn.c_attn.bias", ("q_bias", "k_bias", "v_bias"), _split_qkv_bias, _join_qkv_bias),
    KeyRule("transformer.h.{i}.attn.c_proj.weight", ("o_proj",), _gpt2_o_in, _gpt2_o_back),
    KeyRule("transformer.h.{i}.attn.c_proj.bias", ("o_bias",), _same, _same_back),
    KeyRule("transformer.h.{i}.ln_2.weight", ("mlp_norm_scale",), _same, _same_back),
    KeyRule("transformer.h.{i}.ln_2.bias", ("mlp_norm_bias",), _same, _same_back),
    KeyRule("transformer.h.{i}.mlp.c_fc.weight", ("up_proj",), _same, _same_back),
    KeyRule("transformer.h.{i}.mlp.c_fc.bias", ("up_bias",), _same, _same_back),
    KeyRule("transformer.h.{i}.mlp.c_proj.weight", ("down_proj",), _same, _same_back),
    KeyRule("transformer.h.{i}.mlp.c_proj.bias", ("down_bias",), _same, _same_back),
)

# Keys some checkpoints carry that are buffers, not weights: safe to skip on load.
IGNORED_KEYS = {
    "gpt2": (re.compile(r"transformer\.h\.\d+\.attn\.(masked_)?bias$"),),
    "llama": (re.compile(r".*rotary_emb\.inv_freq$"),),
}


def rules_for(spec: ModelSpec) -> tuple[KeyRule, ...]:
    table = GPT2_RULES if spec.model_type == "gpt2" else LLAMA_RULES
    return tuple(rule for rule in table if rule.when(spec))


def is_ignorable(spec: ModelSpec, key: str) -> bool:
    family = "gpt2" if spec.model_type == "gpt2" else "llama"
    if spec.tie_word_embeddings and key == "lm_head.weight":
        return True  # tied: HF re-ties on load; some files still carry a copy
    return any(p.match(key) for p in IGNORED_KEYS[family])


def normalise_key(spec: ModelSpec, key: str) -> str:
    """Original GPT-2 checkpoints store keys without the ``transformer.`` prefix."""
    if spec.model_type == "gpt2" and not key.startswith(("transformer.", "lm_head.")):
        return "transformer." + key
    return key
