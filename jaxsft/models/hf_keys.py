"""The decoder families' weight tables (format: :mod:`jaxsft.models.weights`).

Loading, saving, the torch weight sync and the decay-mask translation all read these rows, so
an HF name and its layout live in exactly one place. Axis letters: ``h`` hidden, ``n`` heads
(query or KV, as the parameter has them), ``d`` head_dim, ``f`` MLP width.
"""

from __future__ import annotations

from jaxsft.models.spec import ModelSpec
from jaxsft.models.weights import W, WeightTable

_HEADS_IN = "(n d) h -> h n d"  # torch Linear [heads*dim, hidden] -> ours [hidden, heads, dim]
_HEADS_OUT = "h (n d) -> n d h"  # torch Linear [hidden, heads*dim] -> ours [heads, dim, hidden]
_HEAD_BIAS = "(n d) -> n d"
_LINEAR = "o i -> i o"  # torch Linear [out, in] -> ours [in, out]

LLAMA = WeightTable(
    "llama",
    rows=(
        W("model.embed_tokens.weight", "embed"),
        W("model.norm.weight", "final_norm_scale"),
        W("lm_head.weight", "lm_head", tied_to="embed"),
        W("model.layers.{i}.input_layernorm.weight", "layers/attn_norm_scale"),
        W("model.layers.{i}.post_attention_layernorm.weight", "layers/mlp_norm_scale"),
        W("model.layers.{i}.self_attn.q_proj.weight", "layers/q_proj", _HEADS_IN),
        W("model.layers.{i}.self_attn.k_proj.weight", "layers/k_proj", _HEADS_IN),
        W("model.layers.{i}.self_attn.v_proj.weight", "layers/v_proj", _HEADS_IN),
        W("model.layers.{i}.self_attn.o_proj.weight", "layers/o_proj", _HEADS_OUT),
        W("model.layers.{i}.self_attn.q_proj.bias", "layers/q_bias", _HEAD_BIAS),
        W("model.layers.{i}.self_attn.k_proj.bias", "layers/k_bias", _HEAD_BIAS),
        W("model.layers.{i}.self_attn.v_proj.bias", "layers/v_bias", _HEAD_BIAS),
        W("model.layers.{i}.self_attn.o_proj.bias", "layers/o_bias"),
        W("model.layers.{i}.self_attn.q_norm.weight", "layers/q_norm_scale"),
        W("model.layers.{i}.self_attn.k_norm.weight", "layers/k_norm_scale"),
        W("model.layers.{i}.mlp.gate_proj.weight", "layers/gate_proj", _LINEAR),
        W("model.layers.{i}.mlp.up_proj.weight", "layers/up_proj", _LINEAR),
        W("model.layers.{i}.mlp.down_proj.weight", "layers/down_proj", _LINEAR),
        W("model.layers.{i}.mlp.gate_proj.bias", "layers/gate_bias"),
        W("model.layers.{i}.mlp.up_proj.bias", "layers/up_bias"),
        W("model.layers.{i}.mlp.down_proj.bias", "layers/down_bias"),
    ),
    ignore=(r".*rotary_emb\.inv_freq",),
)


def _gpt2_alias(key: str) -> str:
    """Original GPT-2 checkpoints store keys without the ``transformer.`` prefix."""
    return key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key


GPT2 = WeightTable(
    "gpt2",
    rows=(
        W("transformer.wte.weight", "embed"),
        W("transformer.wpe.weight", "pos_embed"),
        W("transformer.ln_f.weight", "final_norm_scale"),
        W("transformer.ln_f.bias", "final_norm_bias"),
        W("lm_head.weight", "lm_head", tied_to="embed"),
        W("transformer.h.{i}.ln_1.weight", "layers/attn_norm_scale"),
        W("transformer.h.{i}.ln_1.bias", "layers/attn_norm_bias"),
        # Conv1D weights are stored [in, out] already; c_attn holds q, k and v side by side.
        W("transformer.h.{i}.attn.c_attn.weight", ("layers/q_proj", "layers/k_proj", "layers/v_proj"),
          "h (parts n d) -> parts h n d"),
        W("transformer.h.{i}.attn.c_attn.bias", ("layers/q_bias", "layers/k_bias", "layers/v_bias"),
          "(parts n d) -> parts n d"),
        W("transformer.h.{i}.attn.c_proj.weight", "layers/o_proj", "(n d) h -> n d h"),
        W("transformer.h.{i}.attn.c_proj.bias", "layers/o_bias"),
        W("transformer.h.{i}.ln_2.weight", "layers/mlp_norm_scale"),
        W("transformer.h.{i}.ln_2.bias", "layers/mlp_norm_bias"),
        W("transformer.h.{i}.mlp.c_fc.weight", "layers/up_proj"),
        W("transformer.h.{i}.mlp.c_fc.bias", "layers/up_bias"),
        W("transformer.h.{i}.mlp.c_proj.weight", "layers/down_proj"),
        W("transformer.h.{i}.mlp.c_proj.bias", "layers/down_bias"),
    ),
    ignore=(r"transformer\.h\.\d+\.attn\.(masked_)?bias",),
    aliases=_gpt2_alias,
)

TABLES = {"llama": LLAMA, "gpt2": GPT2}


def table_for(spec: ModelSpec) -> WeightTable:
    """The weight table of ``spec``'s family (every supported family but GPT-2 uses Llama's names)."""
    return GPT2 if spec.model_type == "gpt2" else LLAMA
