"""The Hugging Face weight tables of T5 and BART, and strict import/export through them.

Each rule names one HF key (``{i}`` = layer index), the jaxsft parameters it
fills, which stack it belongs to (encoder, decoder or none) and the two pure
conversions. Loading and saving both walk these tables, so a name lives in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import numpy as np

from jaxsft.models.seq2seq import layer_param_shapes, top_level_shapes
from jaxsft.models.weights import expand
from jaxsft.models.seq2seq_spec import Seq2SeqSpec

Arrays = tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True)
class WeightRule:
    hf: str
    ours: str
    to_ours: Callable[[np.ndarray, Seq2SeqSpec], np.ndarray]
    to_hf: Callable[[np.ndarray, Seq2SeqSpec], np.ndarray]
    stack: Optional[str] = None  # "encoder" | "decoder" for per-layer rules
    when: Callable[[Seq2SeqSpec], bool] = lambda s: True
    optional: bool = False  # may be absent from a checkpoint (then the parameter keeps its zeros)


def _same(x, s):
    return np.asarray(x)


def _t(x, s):
    return np.ascontiguousarray(np.asarray(x).T)


def _heads_in(x, s):
    """torch Linear [heads*dim, hidden] -> ours [hidden, heads, dim]."""
    return np.ascontiguousarray(np.asarray(x).T).reshape(s.hidden_size, s.num_heads, s.head_dim)


def _heads_out(x, s):
    return np.ascontiguousarray(np.asarray(x).reshape(s.hidden_size, -1).T)


def _o_in(x, s):
    """torch Linear [hidden, heads*dim] -> ours [heads, dim, hidden]."""
    return np.ascontiguousarray(np.asarray(x).T).reshape(s.num_heads, s.head_dim, s.hidden_size)


def _o_out(x, s):
    return np.ascontiguousarray(np.asarray(x).reshape(-1, s.hidden_size).T)


def _bias_in(x, s):
    return np.asarray(x).reshape(s.num_heads, s.head_dim)


def _bias_out(x, s):
    return np.asarray(x).reshape(-1)


def _row_in(x, s):
    return np.asarray(x).reshape(-1)


def _row_out(x, s):
    return np.asarray(x).reshape(1, -1)


def _untied(s):
    return not s.tie_word_embeddings


def _gated(s):
    return s.mlp == "gated"


def _plain(s):
    return s.mlp == "plain"


def _t5_attention(stack: str, hf_block: str, prefix: str) -> list[WeightRule]:
    return [
        WeightRule(f"{stack}.block.{{i}}.{hf_block}.q.weight", f"{prefix}q_proj", _heads_in, _heads_out, stack),
        WeightRule(f"{stack}.block.{{i}}.{hf_block}.k.weight", f"{prefix}k_proj", _heads_in, _heads_out, stack),
        WeightRule(f"{stack}.block.{{i}}.{hf_block}.v.weight", f"{prefix}v_proj", _heads_in, _heads_out, stack),
        WeightRule(f"{stack}.block.{{i}}.{hf_block}.o.weight", f"{prefix}o_proj", _o_in, _o_out, stack),
    ]


def _t5_mlp(stack: str, n: int) -> list[WeightRule]:
    base = f"{stack}.block.{{i}}.layer.{n}"
    return [
        WeightRule(f"{base}.DenseReluDense.wi.weight", "up_proj", _t, _t, stack, when=_plain),
        WeightRule(f"{base}.DenseReluDense.wi_0.weight", "gate_proj", _t, _t, stack, when=_gated),
        WeightRule(f"{base}.DenseReluDense.wi_1.weight", "up_proj", _t, _t, stack, when=_gated),
        WeightRule(f"{base}.DenseReluDense.wo.weight", "down_proj", _t, _t, stack),
        WeightRule(f"{base}.layer_norm.weight", "mlp_norm_scale", _same, _same, stack),
    ]


T5_RULES: tuple[WeightRule, ...] = (
    WeightRule("shared.weight", "embed", _same, _same),
    WeightRule("lm_head.weight", "lm_head", _same, _same, when=_untied),
    WeightRule("encoder.final_layer_norm.weight", "enc_final_norm_scale", _same, _same),
    WeightRule("decoder.final_layer_norm.weight", "dec_final_norm_scale", _same, _same),
    WeightRule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "enc_rel_bias", _same, _same),
    WeightRule("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "dec_rel_bias", _same, _same),
    *_t5_attention("encoder", "layer.0.SelfAttention", ""),
    WeightRule("encoder.block.{i}.layer.0.layer_norm.weight", "attn_norm_scale", _same, _same, "encoder"),
    *_t5_mlp("encoder", 1),
    *_t5_attention("decoder", "layer.0.SelfAttention", ""),
    WeightRule("decoder.block.{i}.layer.0.layer_norm.weight", "attn_norm_scale", _same, _same, "decoder"),
    *_t5_attention("decoder", "layer.1.EncDecAttention", "cross_"),
    WeightRule("decoder.block.{i}.layer.1.layer_norm.weight", "cross_norm_scale", _same, _same, "decoder"),
    *_t5_mlp("decoder", 2),
)


def _bart_attention(stack: str, hf: str, prefix: str) -> list[WeightRule]:
    base = f"model.{stack}.layers.{{i}}.{hf}"
    rules = []
    for p in ("q", "k", "v"):
        rules.append(WeightRule(f"{base}.{p}_proj.weight", f"{prefix}{p}_proj", _heads_in, _heads_out, stack))
        rules.append(WeightRule(f"{base}.{p}_proj.bias", f"{prefix}{p}_bias", _bias_in, _bias_out, stack))
    rules.append(WeightRule(f"{base}.out_proj.weight", f"{prefix}o_proj", _o_in, _o_out, stack))
    rules.append(WeightRule(f"{base}.out_proj.bias", f"{prefix}o_bias", _same, _same, stack))
    return rules


def _bart_norm(stack: str, hf: str, ours: str) -> list[WeightRule]:
    base = f"model.{stack}.layers.{{i}}.{hf}"
    return [
        WeightRule(f"{base}.weight", f"{ours}_scale", _same, _same, stack),
        WeightRule(f"{base}.bias", f"{ours}_bias", _same, _same, stack),
    ]


def _bart_stack(stack: str) -> list[WeightRule]:
    side = stack[:3]
    base = f"model.{stack}.layers.{{i}}"
    rules = [
        WeightRule(f"model.{stack}.embed_positions.weight", f"{side}_pos_embed", _same, _same),
        WeightRule(f"model.{stack}.layernorm_embedding.weight", f"{side}_embed_norm_scale", _same, _same),
        WeightRule(f"model.{stack}.layernorm_embedding.bias", f"{side}_embed_norm_bias", _same, _same),
        *_bart_attention(stack, "self_attn", ""),
        *_bart_norm(stack, "self_attn_layer_norm", "attn_norm"),
    ]
    if stack == "decoder":
        rules += [*_bart_attention(stack, "encoder_attn", "cross_"), *_bart_norm(stack, "encoder_attn_layer_norm", "cross_norm")]
    rules += [
        WeightRule(f"{base}.fc1.weight", "up_proj", _t, _t, stack),
        WeightRule(f"{base}.fc1.bias", "up_bias", _same, _same, stack),
        WeightRule(f"{base}.fc2.weight", "down_proj", _t, _t, stack),
        WeightRule(f"{base}.fc2.bias", "down_bias", _same, _same, stack),
        *_bart_norm(stack, "final_layer_norm", "mlp_norm"),
    ]
    return rules


BART_RULES: tuple[WeightRule, ...] = (
    WeightRule("model.shared.weight", "embed", _same, _same),
    WeightRule("lm_head.weight", "lm_head", _same, _same, when=_untied),
    WeightRule("final_logits_bias", "final_logits_bias", _row_in, _row_out, optional=True),
    *_bart_stack("encoder"),
    *_bart_stack("decoder"),
)

# Tied copies of the shared embedding that some files carry; HF re-ties them on load.
_TIED_COPIES = {
    "t5": ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"),
    "bart": ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"),
}


def rules_for(spec: Seq2SeqSpec) -> tuple[WeightRule, ...]:
    table = T5_RULES if spec.model_type == "t5" else BART_RULES
    return tuple(r for r in table if r.when(spec))


def _layers(spec: Seq2SeqSpec, stack: str) -> int:
    return spec.num_encoder_layers if stack == "encoder" else spec.num_decoder_layers


def _our_shape(spec: Seq2SeqSpec, rule: WeightRule) -> tuple[int, ...]:
    table = top_level_shapes(spec) if rule.stack is None else layer_param_shapes(spec, rule.stack)
    return table[rule.ours][0]


def _keys(spec: Seq2SeqSpec, rule: WeightRule) -> list[tuple[Optional[int], str]]:
    return expand(rule.hf, None if rule.stack is None else _layers(spec, rule.stack))


def hf_shapes(spec: Seq2SeqSpec) -> dict[str, tuple[int, ...]]:
    """Every HF key a model of ``spec`` reads and writes (layers expanded) with its HF shape."""
    out = {}
    for rule in rules_for(spec):
        shape = rule.to_hf(np.zeros(_our_shape(spec, rule), np.int8), spec).shape
        for _, key in _keys(spec, rule):
            out[key] = tuple(shape)
    return out


def import_params(spec: Seq2SeqSpec, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """HF-named arrays -> {'embed': ..., 'encoder': {...[L, ...]}, 'decoder': {...}} (numpy), strictly."""
    shapes = hf_shapes(spec)
    remaining = set(tensors)
    top: dict[str, np.ndarray] = {}
    stacks: dict[str, dict[str, list]] = {
        s: {name: [None] * _layers(spec, s) for name in layer_param_shapes(spec, s)} for s in ("encoder", "decoder")
    }
    missing, wrong = [], []
    for rule in rules_for(spec):
        for i, key in _keys(spec, rule):
            if key not in tensors:
                if rule.optional:
                    top[rule.ours] = np.zeros(_our_shape(spec, rule), np.float32)
                else:
                    missing.append(key)
                continue
            remaining.discard(key)
            array = np.asarray(tensors[key])
            if tuple(array.shape) != shapes[key]:
                wrong.append(f"{key} has shape {tuple(array.shape)}, expected {shapes[key]}")
                continue
            value = rule.to_ours(array, spec)
            if i is None:
                top[rule.ours] = value
            else:
                stacks[rule.stack][rule.ours][i] = value
    ignorable = set(_TIED_COPIES[spec.model_type]) if spec.tie_word_embeddings else set(_TIED_COPIES[spec.model_type][:2])
    extra = sorted(k for k in remaining if k not in ignorable)
    if missing or extra or wrong:
        parts = []
        for what, items in (("missing weights", missing), ("unexpected weights", extra), ("wrong weights", wrong)):
            if items:
                parts.append(f"{what}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}")
        from jaxsft.models.hf_io import CheckpointError  # late: hf_io imports this module

        raise CheckpointError(
            f"checkpoint does not match its {spec.model_type} config ({'; '.join(parts)}); "
            "check that config.json belongs to these weights."
        )
    params: dict[str, Any] = dict(top)
    for stack, names in stacks.items():
        params[stack] = {name: np.stack(values) for name, values in names.items()}
    return params


def export_params(spec: Seq2SeqSpec, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of :func:`import_params`: jaxsft arrays -> HF-named numpy arrays."""
    out: dict[str, np.ndarray] = {}
    for rule in rules_for(spec):
        for i, key in _keys(spec, rule):
            value = params[rule.ours] if i is None else params[rule.stack][rule.ours][i]
            out[key] = rule.to_hf(np.asarray(value), spec)
    return out
