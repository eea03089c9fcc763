"""One family-independent description of a decoder-only architecture.

Llama, Mistral, Qwen2/2.5, Qwen3, SmolLM2 and GPT-2 differ only in a handful of
switches (norm kind, position encoding, MLP kind, biases, q/k norm, tying), so a
single decoder reads this spec instead of one file per family. The builders here
(HF config -> spec) are named by each family's record in :mod:`jaxsft.models.families`;
:func:`layer_param_shapes` is what one layer holds under a spec.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """Raised for a model_type or an option jaxsft cannot reproduce exactly."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm: str  # "rms" | "layer" | "rms_plus_one" (Gemma: normalise and scale by (1 + w), all in fp32)
    norm_eps: float
    position: str  # "rope" | "learned"
    mlp: str  # "gated" (SwiGLU family) | "plain" (GPT-2)
    activation: str  # "silu" | "gelu_new" | "gelu" | "relu" | "gelu_pytorch_tanh"
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    initializer_range: float = 0.02
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    sliding_window: Optional[int] = None
    pad_token_id: Optional[int] = None
    eos_token_id: Any = None
    bos_token_id: Optional[int] = None
    # Training-mode dropout rates from the HF config (GPT-2 embd/resid/attn_pdrop; Llama-family attention_dropout).
    embd_dropout: float = 0.0
    resid_dropout: float = 0.0
    attention_dropout: float = 0.0
    # Final-logit soft cap (Gemma 2: cap * tanh(logits / cap)); None = none. Read through LMHead.softcap.
    final_logit_softcap: Optional[float] = None
    # Gemma's rules. Per-layer windows: layer i attends within layer_windows[i] tokens (None = global);
    # when set, sliding_window (one window for every layer, Mistral) is None. Read through windows().
    layer_windows: Optional[tuple[Optional[int], ...]] = None
    rope_local_theta: Optional[float] = None  # RoPE base of the sliding layers (Gemma 3); None = rope_theta everywhere
    attention_scale: Optional[float] = None  # query scaling (Gemma: query_pre_attn_scalar ** -0.5); None = head_dim ** -0.5
    attn_logit_softcap: Optional[float] = None  # soft cap on attention scores (Gemma 2)
    sandwich_norms: bool = False  # a norm after attention and after the MLP too (Gemma 2/3)
    embed_multiplier: Optional[float] = None  # embeddings times this, in the embedding dtype (Gemma: sqrt(hidden))

    def windows(self) -> tuple[Optional[int], ...]:
        """Each layer's attention window (None = global): the one sliding-window rule every path reads."""
        if self.layer_windows is not None:
            return self.layer_windows
        return (self.sliding_window,) * self.num_layers

    @property
    def has_windows(self) -> bool:
        """True when any layer attends within a sliding window (such layers need an explicit mask or kernel window)."""
        return any(w is not None for w in self.windows())

    @property
    def windows_vary(self) -> bool:
        """True when layers differ in their window (the window then rides in the layer loop as data)."""
        return len(set(self.windows())) > 1

    def local_rope_layers(self) -> tuple[bool, ...]:
        """Which layers use the local RoPE base (Gemma 3's sliding layers); all False without one."""
        return tuple(self.rope_local_theta is not None and w is not None for w in self.windows())

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self, *, include_embeddings: bool = True) -> int:
        """Parameter count (tied embeddings counted once), used for MFU figures."""
        h, f, L = self.hidden_size, self.intermediate_size, self.num_layers
        attn = h * self.q_size * 2 + h * self.kv_size * 2
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.o_bias:
            attn += h
        if self.qk_norm:
            attn += 2 * self.head_dim
        mlp = (3 if self.mlp == "gated" else 2) * h * f
        if self.mlp_bias:
            mlp += (2 * f if self.mlp == "gated" else f) + h
        norms = (4 if self.sandwich_norms else 2) * h * (2 if self.norm == "layer" else 1)
        total = L * (attn + mlp + norms) + h * (2 if self.norm == "layer" else 1)
        if include_embeddings:
            total += self.vocab_size * h
            if not self.tie_word_embeddings:
                total += self.vocab_size * h
            if self.position == "learned":
                total += self.max_position_embeddings * h
        return total


def _rope_parameters(config: Any) -> dict:
    """transformers 5 keeps rope settings in ``rope_parameters``; 4.x in rope_theta/rope_scaling."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        merged = dict(params)
    else:
        merged = dict(getattr(config, "rope_scaling", None) or {})
        merged.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if "type" in merged and "rope_type" not in merged:
        merged["rope_type"] = merged["type"]
    merged.setdefault("rope_type", "default")
    if merged.get("rope_theta") is None:
        merged["rope_theta"] = getattr(config, "rope_theta", 10000.0) or 10000.0
    return merged


def llama_like_spec(config: Any) -> ModelSpec:
    """Llama, Mistral, Qwen2/2.5, Qwen3 (and SmolLM2): Llama's layout with a few switches."""
    model_type = config.model_type
    rope = _rope_parameters(config)
    rope_type = rope["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} of this {model_type} config is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}."
        )
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported; use silu, gelu, gelu_new or relu.")
    sliding = None
    if model_type == "mistral":
        sliding = getattr(config, "sliding_window", None)
    elif model_type in ("qwen2", "qwen3") and getattr(config, "use_sliding_window", False):
        raise UnsupportedModelError(f"{model_type} with use_sliding_window=True is not supported; set it to False.")
    attention_bias = bool(getattr(config, "attention_bias", False))
    qkv_bias = model_type == "qwen2" or attention_bias
    return ModelSpec(
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=hidden,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        max_position_embeddings=getattr(config, "max_position_embeddings", 2048),
        norm="rms",
        norm_eps=config.rms_norm_eps,
        position="rope",
        mlp="gated",
        activation=act,
        qkv_bias=qkv_bias,
        o_bias=attention_bias and model_type != "qwen2",
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        initializer_range=getattr(config, "initializer_range", 0.02),
        rope_theta=float(rope["rope_theta"]),
        rope_type=rope_type,
        rope_factor=float(rope.get("factor", 1.0) or 1.0),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
        sliding_window=sliding,
        pad_token_id=getattr(config, "pad_token_id", None),
        eos_token_id=_hashable(getattr(config, "eos_token_id", None)),
        bos_token_id=getattr(config, "bos_token_id", None),
        attention_dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
    )


def gpt2_spec(config: Any) -> ModelSpec:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(config, flag, False):
            raise UnsupportedModelError(f"GPT-2 option {flag}=True is not supported; set it to False.")
    if not getattr(config, "scale_attn_weights", True):
        raise UnsupportedModelError("GPT-2 option scale_attn_weights=False is not supported.")
    act = config.activation_function
    if act not in ("gelu_new", "gelu", "relu", "silu", "gelu_pytorch_tanh"):
        raise UnsupportedModelError(f"GPT-2 activation_function {act!r} is not supported.")
    hidden = config.n_embd
    return ModelSpec(
        model_type="gpt2",
        vocab_size=config.vocab_size,
        hidden_size=hidden,
        intermediate_size=config.n_inner or 4 * hidden,
        num_layers=config.n_layer,
        num_heads=config.n_head,
        num_kv_heads=config.n_head,
        head_dim=hidden // config.n_head,
        max_position_embeddings=config.n_positions,
        norm="layer",
        norm_eps=config.layer_norm_epsilon,
        position="learned",
        mlp="plain",
        activation=act,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        qk_norm=False,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        initializer_range=config.initializer_range,
        pad_token_id=getattr(config, "pad_token_id", None),
        eos_token_id=_hashable(getattr(config, "eos_token_id", None)),
        bos_token_id=getattr(config, "bos_token_id", None),
        embd_dropout=float(config.embd_pdrop or 0.0),
        resid_dropout=float(config.resid_pdrop or 0.0),
        attention_dropout=float(config.attn_pdrop or 0.0),
    )


def _hashable(value: Any) -> Any:
    """Specs are jit-static, so list-valued config fields (eos_token_id) become tuples."""
    return tuple(value) if isinstance(value, list) else value


def layer_param_shapes(spec: ModelSpec) -> dict[str, tuple[tuple[int, ...], tuple[Optional[str], ...], str]]:
    """name -> (per-layer shape, logical axes without the layers axis, init kind).

    The single source of truth for what a layer holds; the HF key tables and the
    sharding rules are both checked against it.
    """
    h, f, n, kv, d = spec.hidden_size, spec.intermediate_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    one = norm_identity_init(spec)
    shapes: dict[str, tuple[tuple[int, ...], tuple[Optional[str], ...], str]] = {
        "attn_norm_scale": ((h,), ("norm",), one),
        "q_proj": ((h, n, d), ("embed", "q_heads", "head_dim"), "normal"),
        "k_proj": ((h, kv, d), ("embed", "kv_heads", "head_dim"), "normal"),
        "v_proj": ((h, kv, d), ("embed", "kv_heads", "head_dim"), "normal"),
        "o_proj": ((n, d, h), ("q_heads", "head_dim", "embed"), "normal"),
        "mlp_norm_scale": ((h,), ("norm",), one),
        "up_proj": ((h, f), ("embed", "mlp"), "normal"),
        "down_proj": ((f, h), ("mlp", "embed"), "normal"),
    }
    if spec.norm == "layer":
        shapes["attn_norm_bias"] = ((h,), ("norm",), "zeros")
        shapes["mlp_norm_bias"] = ((h,), ("norm",), "zeros")
    if spec.qkv_bias:
        shapes["q_bias"] = ((n, d), ("q_heads", "head_dim"), "zeros")
        shapes["k_bias"] = ((kv, d), ("kv_heads", "head_dim"), "zeros")
        shapes["v_bias"] = ((kv, d), ("kv_heads", "head_dim"), "zeros")
    if spec.o_bias:
        shapes["o_bias"] = ((h,), ("norm",), "zeros")
    if spec.sandwich_norms:
        shapes["post_attn_norm_scale"] = ((h,), ("norm",), one)
        shapes["post_mlp_norm_scale"] = ((h,), ("norm",), one)
    if spec.qk_norm:
        shapes["q_norm_scale"] = ((d,), ("head_dim",), one)
        shapes["k_norm_scale"] = ((d,), ("head_dim",), one)
    if spec.mlp == "gated":
        shapes["gate_proj"] = ((h, f), ("embed", "mlp"), "normal")
    if spec.mlp_bias:
        shapes["up_bias"] = ((f,), ("mlp",), "zeros")
        shapes["down_bias"] = ((h,), ("norm",), "zeros")
        if spec.mlp == "gated":
            shapes["gate_bias"] = ((f,), ("mlp",), "zeros")
    return shapes


def norm_identity_init(spec: ModelSpec) -> str:
    """The init of a norm weight that makes the norm a plain normalisation: 1, or 0 for ``(1 + w)`` norms."""
    return "zeros" if spec.norm == "rms_plus_one" else "ones"


# ---------------------------------------------------------------------------- Gemma 2 / Gemma 3
_LAYER_TYPES = ("sliding_attention", "full_attention")


def gemma_spec(config: Any) -> ModelSpec:
    """Gemma 2 (``gemma2``) and Gemma 3 text (``gemma3_text``): Llama's layout plus (1 + w) RMSNorms before
    and after attention and the MLP, embeddings scaled by sqrt(hidden), ``query_pre_attn_scalar``, GeGLU,
    per-layer sliding/global windows; Gemma 2 soft-caps attention scores and the final logits, Gemma 3
    has q/k norms and a RoPE base of its own for the sliding layers."""
    model_type = config.model_type
    gemma3 = model_type == "gemma3_text"
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(f"{model_type} with use_bidirectional_attention=True is not supported; set it to False.")
    act = getattr(config, "hidden_activation", None) or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu", "gelu_new", "silu", "relu"):
        raise UnsupportedModelError(f"hidden_activation {act!r} is not supported; use gelu_pytorch_tanh.")
    layers = config.num_hidden_layers
    layer_types = tuple(getattr(config, "layer_types", None) or ())
    if len(layer_types) != layers or any(t not in _LAYER_TYPES for t in layer_types):
        raise UnsupportedModelError(
            f"{model_type} layer_types={list(layer_types)!r} must name {layers} layers, each one of {_LAYER_TYPES}."
        )
    window = getattr(config, "sliding_window", None)
    windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
    rope = getattr(config, "rope_parameters", None) or {}
    if gemma3:  # rope_parameters per layer type (transformers 5); the sliding layers' base is the local one
        full, local = dict(rope.get("full_attention") or {}), dict(rope.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise UnsupportedModelError(
                f"gemma3_text sliding-layer rope type {local.get('rope_type')!r} is not supported; only 'default'."
            )
        local_theta = float(local.get("rope_theta", getattr(config, "rope_local_base_freq", 10000.0)))
    else:
        full, local_theta = _rope_parameters(config), None
    full.setdefault("rope_type", full.pop("type", "default"))
    full.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if full["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {full['rope_type']!r} of this {model_type} config is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}."
        )
    hidden, heads = config.hidden_size, config.num_attention_heads
    attention_bias = bool(getattr(config, "attention_bias", False))
    softcap = lambda v: None if v is None else float(v)  # noqa: E731
    return ModelSpec(
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=hidden,
        intermediate_size=config.intermediate_size,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or hidden // heads,
        max_position_embeddings=getattr(config, "max_position_embeddings", 8192),
        norm="rms_plus_one",
        norm_eps=config.rms_norm_eps,
        position="rope",
        mlp="gated",
        activation=act,
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias=False,
        qk_norm=gemma3,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        initializer_range=getattr(config, "initializer_range", 0.02),
        rope_theta=float(full["rope_theta"]),
        rope_type=full["rope_type"],
        rope_factor=float(full.get("factor", 1.0) or 1.0),
        rope_low_freq_factor=float(full.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(full.get("high_freq_factor", 4.0)),
        rope_original_max_position=int(full.get("original_max_position_embeddings", 8192)),
        pad_token_id=getattr(config, "pad_token_id", None),
        eos_token_id=_hashable(getattr(config, "eos_token_id", None)),
        bos_token_id=getattr(config, "bos_token_id", None),
        attention_dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
        # transformers' Gemma 3 attention never applies attn_logit_softcapping (it reads it, passes nothing)
        final_logit_softcap=softcap(getattr(config, "final_logit_softcapping", None)),
        attn_logit_softcap=None if gemma3 else softcap(getattr(config, "attn_logit_softcapping", None)),
        layer_windows=windows if window is not None else None,
        rope_local_theta=local_theta,
        attention_scale=float(config.query_pre_attn_scalar) ** -0.5,
        sandwich_norms=True,
        embed_multiplier=float(hidden) ** 0.5,
    )

