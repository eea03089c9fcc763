"""One description of an encoder-decoder architecture (T5 v1.0, T5 v1.1 / Flan-T5, BART), built from an HF config.

T5 and BART share the block structure (self-attention, cross-attention in the
decoder, MLP) and differ in a handful of switches: pre- vs post-norm, RMS vs
layer norm, relative position bias vs learned positions, biases, attention
scaling and the lm_head rescale. The module in ``seq2seq.py`` reads only this.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from jaxsft.models.spec import UnsupportedModelError

_ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu")


@dataclasses.dataclass(frozen=True)
class Seq2SeqSpec:
    model_type: str  # "t5" | "bart"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_encoder_layers: int
    num_decoder_layers: int
    num_heads: int
    head_dim: int
    norm: str  # "rms" (T5: no mean, no bias) | "layer"
    norm_eps: float
    pre_norm: bool  # T5 normalises before each sub-layer; BART after the residual add
    position: str  # "relative" (T5 bucketed bias) | "learned" (BART, offset 2)
    mlp: str  # "gated" | "plain"
    activation: str
    bias: bool  # BART: every projection has a bias
    scale_attention: bool  # BART scales scores by head_dim**-0.5; T5 does not
    embed_scale: float  # BART scale_embedding: sqrt(d_model), else 1
    scale_decoder_outputs: bool  # T5 v1.0: decoder output * d_model**-0.5 before the tied lm_head
    tie_word_embeddings: bool
    final_logits_bias: bool  # BART's (untrained) buffer added to the logits
    decoder_start_token_id: int
    pad_token_id: int
    eos_token_id: Any = None
    bos_token_id: Optional[int] = None
    max_position_embeddings: Optional[int] = None  # BART's learned table; T5: the default length limit (512)
    # BART's embedding is nn.Embedding(padding_idx=pad): torch never gives the pad row a gradient.
    embedding_padding_idx: Optional[int] = None
    relative_buckets: int = 32
    relative_max_distance: int = 128
    initializer_range: float = 0.02
    # Training-mode dropout as the HF config declares it (applied only when a dropout key is given).
    dropout: float = 0.0  # T5 dropout_rate / BART dropout: embeddings, sub-layer outputs (and T5 attention probs)
    attention_dropout: float = 0.0  # BART attention_dropout; T5 uses dropout_rate on attention probs too
    activation_dropout: float = 0.0  # BART activation_dropout; T5 uses dropout_rate after the MLP activation

    is_encoder_decoder = True

    @property
    def num_layers(self) -> int:
        return self.num_encoder_layers + self.num_decoder_layers

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    def num_parameters(self, *, include_embeddings: bool = True) -> int:
        h, f, q = self.hidden_size, self.intermediate_size, self.q_size
        norm = h * (2 if self.norm == "layer" else 1)
        attn = 4 * h * q + ((3 * q + h) if self.bias else 0)
        mlp = (3 if self.mlp == "gated" else 2) * h * f + ((f + h) if self.bias else 0)
        total = self.num_encoder_layers * (attn + mlp + 2 * norm) + self.num_decoder_layers * (2 * attn + mlp + 3 * norm)
        total += 2 * norm
        if self.position == "relative":
            total += 2 * self.relative_buckets * self.num_heads
        elif include_embeddings:
            total += 2 * (self.max_position_embeddings + 2) * h
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total


def _start_token(config: Any) -> int:
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        raise UnsupportedModelError(
            f"this {config.model_type} config has no decoder_start_token_id; set config.decoder_start_token_id "
            "(T5 uses the pad id 0, BART the eos id 2)."
        )
    return int(start)


def t5_spec(config: Any) -> Seq2SeqSpec:
    """T5 v1.0 and v1.1 / Flan-T5 (the registry's 't5' builder)."""
    act = getattr(config, "dense_act_fn", None) or config.feed_forward_proj.split("-")[-1]
    if act == "gelu" and getattr(config, "is_gated_act", False):
        act = "gelu_new"  # transformers' own alias for gated-gelu
    if act not in _ACTIVATIONS:
        raise UnsupportedModelError(f"T5 feed_forward_proj {config.feed_forward_proj!r} is not supported.")
    tied = bool(getattr(config, "tie_word_embeddings", True))
    # transformers 5 keeps the v1.0 / v1.1 difference in ``scale_decoder_outputs``; 4.x tied it to tying.
    scale = bool(getattr(config, "scale_decoder_outputs", tied))
    rate = float(getattr(config, "dropout_rate", 0.0) or 0.0)
    pad = getattr(config, "pad_token_id", 0)
    return Seq2SeqSpec(
        model_type="t5",
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_encoder_layers=config.num_layers,
        num_decoder_layers=getattr(config, "num_decoder_layers", None) or config.num_layers,
        num_heads=config.num_heads,
        head_dim=config.d_kv,
        norm="rms",
        norm_eps=config.layer_norm_epsilon,
        pre_norm=True,
        position="relative",
        mlp="gated" if getattr(config, "is_gated_act", False) else "plain",
        activation=act,
        bias=False,
        scale_attention=False,
        embed_scale=1.0,
        scale_decoder_outputs=scale,
        tie_word_embeddings=tied,
        final_logits_bias=False,
        decoder_start_token_id=_start_token(config),
        pad_token_id=int(pad if pad is not None else 0),
        eos_token_id=_hashable(getattr(config, "eos_token_id", None)),
        bos_token_id=getattr(config, "bos_token_id", None),
        # T5 has no position limit (relative bias); 512 is its pre-training length and the tokenizer's
        # model_max_length. It is only the default largest length bucket: TrainConfig.max_length overrides it.
        max_position_embeddings=int(getattr(config, "n_positions", None) or 512),
        relative_buckets=config.relative_attention_num_buckets,
        relative_max_distance=config.relative_attention_max_distance,
        initializer_range=0.05 * float(getattr(config, "initializer_factor", 1.0)),
        dropout=rate,
        attention_dropout=rate,
        activation_dropout=rate,
    )


def bart_spec(config: Any) -> Seq2SeqSpec:
    """BART (the registry's 'bart' builder)."""
    for name in ("encoder_layerdrop", "decoder_layerdrop"):
        if float(getattr(config, name, 0.0) or 0.0) > 0:
            raise UnsupportedModelError(f"BART {name}={getattr(config, name)} is not supported; set it to 0.0.")
    if config.encoder_attention_heads != config.decoder_attention_heads or config.encoder_ffn_dim != config.decoder_ffn_dim:
        raise UnsupportedModelError(
            "BART configs whose encoder and decoder differ in heads or ffn size are not supported."
        )
    act = config.activation_function
    if act not in _ACTIVATIONS:
        raise UnsupportedModelError(f"BART activation_function {act!r} is not supported.")
    pad = config.pad_token_id
    if pad is None:
        raise UnsupportedModelError("this BART config has no pad_token_id; shifting labels right needs one.")
    return Seq2SeqSpec(
        model_type="bart",
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.encoder_ffn_dim,
        num_encoder_layers=config.encoder_layers,
        num_decoder_layers=config.decoder_layers,
        num_heads=config.encoder_attention_heads,
        head_dim=config.d_model // config.encoder_attention_heads,
        norm="layer",
        norm_eps=1e-5,
        pre_norm=False,
        position="learned",
        mlp="plain",
        activation=act,
        bias=True,
        scale_attention=True,
        embed_scale=math.sqrt(config.d_model) if getattr(config, "scale_embedding", False) else 1.0,
        scale_decoder_outputs=False,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        final_logits_bias=True,
        decoder_start_token_id=_start_token(config),
        pad_token_id=int(pad),
        eos_token_id=_hashable(getattr(config, "eos_token_id", None)),
        bos_token_id=getattr(config, "bos_token_id", None),
        max_position_embeddings=config.max_position_embeddings,
        embedding_padding_idx=int(pad),
        initializer_range=float(getattr(config, "init_std", 0.02)),
        dropout=float(config.dropout or 0.0),
        attention_dropout=float(config.attention_dropout or 0.0),
        activation_dropout=float(config.activation_dropout or 0.0),
    )


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
