"""Every family's weight table (format: :mod:`jaxsft.models.weights`): the decoders (Llama's names,
GPT-2's) and the encoder-decoders (T5 v1.0, T5 v1.1 / Flan-T5, BART).

Loading, saving, the torch weight sync and the decay-mask translation all read these rows, so
an HF name and its layout live in exactly one place; which family uses which table is its record in
:mod:`jaxsft.models.families`. Axis letters: ``h`` hidden, ``n`` heads
(query or KV, as the parameter has them), ``d`` head_dim, ``f`` MLP width, ``v`` vocabulary.
Encoder-decoder layer parameters sit under ``encoder/`` and ``decoder/``, each stacked over its
own stack's layers.
"""

from __future__ import annotations

from jaxsft.models.weights import Row, W, WeightTable

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


# Gemma 2 / Gemma 3 text: Llama's names, but four norms per layer. Careful: Gemma's
# post_attention_layernorm is the norm *after* attention; its pre-MLP norm is pre_feedforward_layernorm.
_GEMMA_NORMS = {
    "model.layers.{i}.post_attention_layernorm.weight": "layers/post_attn_norm_scale",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "layers/mlp_norm_scale",
    "model.layers.{i}.post_feedforward_layernorm.weight": "layers/post_mlp_norm_scale",
}
GEMMA = WeightTable(
    "gemma",
    rows=tuple(r for r in LLAMA.rows if r.hf != "model.layers.{i}.post_attention_layernorm.weight")
    + tuple(W(hf, ours) for hf, ours in _GEMMA_NORMS.items()),
    ignore=LLAMA.ignore,
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


# ---------------------------------------------------------------------------- T5
def _t5_attention(stack: str, block: str, prefix: str) -> list[Row]:
    base = f"{stack}.block.{{i}}.{block}"
    return [
        *(W(f"{base}.{p}.weight", f"{stack}/{prefix}{p}_proj", _HEADS_IN) for p in ("q", "k", "v")),
        W(f"{base}.o.weight", f"{stack}/{prefix}o_proj", _HEADS_OUT),
    ]


def _t5_stack(stack: str, gated: bool) -> list[Row]:
    """One stack's layers: self-attention (layer.0), the decoder's cross-attention (layer.1), the MLP (last)."""
    block = f"{stack}.block.{{i}}.layer"
    mlp = 2 if stack == "decoder" else 1
    rows = [*_t5_attention(stack, "layer.0.SelfAttention", ""), W(f"{block}.0.layer_norm.weight", f"{stack}/attn_norm_scale")]
    if stack == "decoder":
        rows += [*_t5_attention(stack, "layer.1.EncDecAttention", "cross_"),
                 W(f"{block}.1.layer_norm.weight", f"{stack}/cross_norm_scale")]
    dense = f"{block}.{mlp}.DenseReluDense"
    if gated:  # v1.1 / Flan-T5: wi_0 is the gate, wi_1 the up projection
        rows += [W(f"{dense}.wi_0.weight", f"{stack}/gate_proj", _LINEAR), W(f"{dense}.wi_1.weight", f"{stack}/up_proj", _LINEAR)]
    else:
        rows.append(W(f"{dense}.wi.weight", f"{stack}/up_proj", _LINEAR))
    rows += [W(f"{dense}.wo.weight", f"{stack}/down_proj", _LINEAR), W(f"{block}.{mlp}.layer_norm.weight", f"{stack}/mlp_norm_scale")]
    return rows


def _t5(family: str, gated: bool) -> WeightTable:
    return WeightTable(
        family,
        rows=(
            W("shared.weight", "embed"),
            W("lm_head.weight", "lm_head", tied_to="embed"),
            W("encoder.final_layer_norm.weight", "enc_final_norm_scale"),
            W("decoder.final_layer_norm.weight", "dec_final_norm_scale"),
            # the relative-position bias lives in block 0 only and is shared by every layer of its stack
            W("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "enc_rel_bias"),
            W("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "dec_rel_bias"),
            *_t5_stack("encoder", gated),
            *_t5_stack("decoder", gated),
        ),
        ignore=(r"(encoder|decoder)\.embed_tokens\.weight",),  # tied copies of shared.weight (HF re-ties them)
    )


T5 = _t5("t5", gated=False)  # T5 v1.0: one ReLU projection wi
T5_GATED = _t5("t5-gated", gated=True)  # T5 v1.1 / Flan-T5: gated GELU (wi_0, wi_1)


# ---------------------------------------------------------------------------- BART
def _bart_attention(stack: str, hf: str, prefix: str) -> list[Row]:
    base, ours = f"model.{stack}.layers.{{i}}.{hf}", f"{stack}/{prefix}"
    rows = []
    for p in ("q", "k", "v"):
        rows += [W(f"{base}.{p}_proj.weight", f"{ours}{p}_proj", _HEADS_IN), W(f"{base}.{p}_proj.bias", f"{ours}{p}_bias", _HEAD_BIAS)]
    return rows + [W(f"{base}.out_proj.weight", f"{ours}o_proj", _HEADS_OUT), W(f"{base}.out_proj.bias", f"{ours}o_bias")]


def _bart_norm(hf: str, ours: str) -> list[Row]:
    return [W(f"{hf}.weight", f"{ours}_scale"), W(f"{hf}.bias", f"{ours}_bias")]


def _bart_stack(stack: str) -> list[Row]:
    side, base = stack[:3], f"model.{stack}.layers.{{i}}"
    rows = [
        W(f"model.{stack}.embed_positions.weight", f"{side}_pos_embed"),
        *_bart_norm(f"model.{stack}.layernorm_embedding", f"{side}_embed_norm"),
        *_bart_attention(stack, "self_attn", ""),
        *_bart_norm(f"{base}.self_attn_layer_norm", f"{stack}/attn_norm"),
    ]
    if stack == "decoder":
        rows += [*_bart_attention(stack, "encoder_attn", "cross_"), *_bart_norm(f"{base}.encoder_attn_layer_norm", f"{stack}/cross_norm")]
    return rows + [
        W(f"{base}.fc1.weight", f"{stack}/up_proj", _LINEAR),
        W(f"{base}.fc1.bias", f"{stack}/up_bias"),
        W(f"{base}.fc2.weight", f"{stack}/down_proj", _LINEAR),
        W(f"{base}.fc2.bias", f"{stack}/down_bias"),
        *_bart_norm(f"{base}.final_layer_norm", f"{stack}/mlp_norm"),
    ]


BART = WeightTable(
    "bart",
    rows=(
        W("model.shared.weight", "embed"),
        W("lm_head.weight", "lm_head", tied_to="embed"),
        # an untrained buffer HF stores as [1, V]; some files lack it (then zeros, which is what it holds)
        W("final_logits_bias", "final_logits_bias", "1 v -> v", optional=True),
        *_bart_stack("encoder"),
        *_bart_stack("decoder"),
    ),
    ignore=(r"model\.(encoder|decoder)\.embed_tokens\.weight",),  # tied copies of model.shared.weight
)

TABLES = {"llama": LLAMA, "gemma": GEMMA, "gpt2": GPT2, "t5": T5, "t5-gated": T5_GATED, "bart": BART}
