"""Pure building blocks of the decoder: norms, rotary embedding, activations, attention.

They are plain functions of arrays so the scanned layer body stays a pure function
that ``jax.checkpoint`` (remat) and ``lax.scan`` can transform freely.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.models.spec import ModelSpec


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """HF's RMSNorm: normalise in fp32, cast back, then multiply by the weight (``scale``: the last axis)."""
    return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_fwd(x: jax.Array, scale: jax.Array, eps: float):
    # Saved for the backward: the input (kept alive anyway as the residual stream) and one fp32
    # number per row. Autodiff would also keep the fp32 normalised activations, a full-size
    # tensor written and read once per norm.
    x32 = x.astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    y = scale.astype(x.dtype) * (x32 * rstd).astype(x.dtype)
    return y, (x, scale, rstd)


def _rms_norm_bwd(eps: float, residuals, dy: jax.Array):
    """The exact gradient, in two passes over the rows (one reduction, one elementwise) plus the weight's."""
    del eps
    x, scale, rstd = residuals
    normed = x.astype(jnp.float32) * rstd
    d_scale = jnp.sum(
        (dy.astype(jnp.float32) * normed.astype(x.dtype).astype(jnp.float32)).reshape(-1, dy.shape[-1]), axis=0
    )
    d_normed = (dy * scale.astype(x.dtype)).astype(jnp.float32)  # the product is formed in the stream dtype, as autodiff does
    # normed = x * rstd with rstd = mean(x^2)^(-1/2): dx = rstd * (dn - normed * mean(dn * normed)).
    dx = rstd * (d_normed - normed * jnp.mean(d_normed * normed, axis=-1, keepdims=True))
    return dx.astype(x.dtype), d_scale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """torch.nn.LayerNorm in fp32 (what autocast does), cast back to the stream dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rms_norm_plus_one(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm: normalise and multiply by ``(1 + w)`` all in fp32, then cast back (transformers'
    Gemma2RMSNorm / Gemma3RMSNorm; Llama's casts before the multiply)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def norm(kind: str, x: jax.Array, scale: jax.Array, bias: Optional[jax.Array], eps: float) -> jax.Array:
    """The spec's norm kind: ``rms`` (Llama), ``layer`` (GPT-2, with ``bias``) or ``rms_plus_one`` (Gemma)."""
    if kind == "layer":
        return layer_norm(x, scale, bias, eps)
    if kind == "rms_plus_one":
        return rms_norm_plus_one(x, scale, eps)
    return rms_norm(x, scale, eps)


def soft_cap(x: jax.Array, cap: Optional[float]) -> jax.Array:
    """``cap * tanh(x / cap)`` (Gemma 2's logit soft-capping), computed in fp32 and returned in x's dtype.

    The one definition of the cap: the final logits (fused loss, eval, predict, generation) and the
    attention scores all go through it; ``cap=None`` is the identity.
    """
    if cap is None:
        return x
    return (np.float32(cap) * jnp.tanh(x.astype(jnp.float32) / np.float32(cap))).astype(x.dtype)


def soft_cap_slope(x: jax.Array, cap: Optional[float]) -> jax.Array:
    """d soft_cap(x) / dx = 1 - tanh(x / cap)^2 in fp32 (for hand-written backward passes); 1 without a cap."""
    if cap is None:
        return jnp.ones((), jnp.float32)
    t = jnp.tanh(x.astype(jnp.float32) / np.float32(cap))
    return 1.0 - t * t


def activation(name: str, x: jax.Array) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(x)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unknown activation {name!r}")


def rope_inverse_frequencies(spec: ModelSpec) -> np.ndarray:
    """Inverse frequencies in fp32, computed as transformers does (incl. Llama-3 scaling)."""
    dim = spec.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(spec.rope_theta) ** exponents)).astype(np.float32)
    if spec.rope_type == "linear":
        inv_freq = (inv_freq / np.float32(spec.rope_factor)).astype(np.float32)
    elif spec.rope_type == "llama3":
        factor = spec.rope_factor
        low, high = spec.rope_low_freq_factor, spec.rope_high_freq_factor
        old_len = spec.rope_original_max_position
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(spec: ModelSpec, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, head_dim] for integer positions [B, T]."""
    inv_freq = jnp.asarray(rope_inverse_frequencies(spec))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on [B, T, heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["out", "bias", "rope"],
                   meta_fields=["heads", "kv_heads", "head_dim"])
@dataclasses.dataclass(frozen=True)
class JoinedQKV:
    """A decode layer's query, key and value as its joined projection left them, before the split, bias and RoPE.

    Why: a decode step's attention kernel can take this whole (:func:`jaxsft.kernels.decode_attention.
    projection_attention_with_write`) and do the split, bias and rotation itself, so no XLA kernel runs between the
    q/k/v matmul and the attention; every other consumer calls :meth:`split`, which is the model's own computation.
    """

    out: jax.Array  # [B, T, (heads + 2 * kv_heads) * head_dim]: query heads, then key heads, then value heads
    bias: Optional[jax.Array]  # [(heads + 2 * kv_heads) * head_dim] or None
    rope: Optional[tuple[jax.Array, jax.Array]]  # (cos, sin) [B, T, head_dim] or None (no rotary positions)
    heads: int
    kv_heads: int
    head_dim: int

    def split(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(q [B, T, heads, D], k, v [B, T, kv_heads, D]), biased and rotated."""
        n, kv, d = self.heads, self.kv_heads, self.head_dim
        y = self.out if self.bias is None else self.out + self.bias
        q, k, v = jnp.split(y, [n * d, (n + kv) * d], axis=-1)
        q, k, v = (x.reshape(*x.shape[:-1], heads, d) for x, heads in ((q, n), (k, kv), (v, kv)))
        if self.rope is not None:
            q, k = apply_rope(q, *self.rope), apply_rope(k, *self.rope)
        return q, k, v


def attention_kernel(implementation: str, *, softcap: Optional[float], windows_vary: bool) -> str:
    """The rule for when a model may use cuDNN attention: its fused kernel takes neither a score soft cap
    nor a window that changes from layer to layer (the window is a static kernel argument, while
    per-layer windows ride in the layer loop as data), so either one sends the model to XLA attention."""
    if implementation == "cudnn" and (softcap is not None or windows_vary):
        return "xla"
    return implementation


def resolve_attention_implementation(requested: str, dtype, backend: Optional[str] = None) -> str:
    """cuDNN flash attention on GPU for 16-bit compute; XLA everywhere else (CPU, TPU, fp32).

    ``backend``: the platform to decide for (default: JAX's default backend)."""
    if requested in ("xla", "cudnn"):
        return requested
    on_gpu = (backend or jax.default_backend()) == "gpu"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if (on_gpu and half) else "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: Optional[jax.Array],
    causal: bool,
    sliding_window: Optional[int],
    implementation: str,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
) -> jax.Array:
    """Scaled dot-product attention [B, T, N, D] x [B, S, K, D] (GQA when K < N).

    ``mask`` is a boolean [B, 1, T, S] (True = may attend) that already includes
    causality when given; ``causal`` alone serves right-padded training batches.
    ``scale`` defaults to 1/sqrt(D); ``softcap`` caps the scores (Gemma 2), in XLA einsums.
    """
    if softcap is not None:
        return attention_with_dropout(q, k, v, mask=mask, causal=causal, sliding_window=sliding_window, rate=0.0,
                                      key=None, scale=scale, softcap=softcap)
    window = None
    if sliding_window is not None and mask is None and causal:
        window = (sliding_window - 1, 0)
    impl = implementation if mask is None else "xla"
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal and mask is None, local_window_size=window, implementation=impl,
        scale=scale,
    )


class Segments(NamedTuple):
    """Packed rows: which example each token belongs to.

    ``ids`` [B, T]: 1, 2, ... per example in its row, 0 for the padding tail. ``lengths``
    [B, M] (optional): each row's segment lengths in order, the tail as a last segment,
    then zeros; the cuDNN kernel takes these instead of ids.
    """

    ids: jax.Array
    lengths: Optional[jax.Array] = None

    def mask(self) -> jax.Array:
        """[B, 1, T, T]: causal and within one segment (padding attends to padding only)."""
        t = self.ids.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))
        same = self.ids[:, :, None] == self.ids[:, None, :]
        return (causal[None] & same)[:, None]

    def cudnn_tables(self) -> tuple[jax.Array, jax.Array]:
        """(seqlens [B, M], offsets [B, M + 1]) with -1 for absent segments, as cuDNN's ragged layout wants."""
        lengths = self.lengths
        present = lengths > 0
        starts = jnp.cumsum(lengths, axis=1) - lengths
        seqlens = jnp.where(present, lengths, -1).astype(jnp.int32)
        offsets = jnp.where(present, starts, -1).astype(jnp.int32)
        offsets = jnp.concatenate([offsets, jnp.full((lengths.shape[0], 1), -1, jnp.int32)], axis=1)
        return seqlens, offsets


def packed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segments: Segments,
    *,
    mask: Optional[jax.Array],
    sliding_window: Optional[int],
    implementation: str,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
) -> jax.Array:
    """Causal attention within each packed example.

    On GPU with 16-bit inputs and a segment table: cuDNN flash attention over the ragged
    layout (segment offsets and lengths), which never forms the [T, T] mask. Elsewhere
    (CPU, TPU, fp32, or a sliding window, whose ``mask`` the caller built): XLA attention
    with the segment mask.
    """
    if (segments.lengths is not None and mask is None and softcap is None
            and ragged_kernel_applies(implementation, sliding_window, 0.0)):
        return _cudnn_ragged_attention(q, k, v, segments, scale)
    full = segments.mask() if mask is None else mask
    return attention(q, k, v, mask=full, causal=True, sliding_window=None, implementation="xla", scale=scale,
                     softcap=softcap)


def ragged_kernel_applies(implementation: str, sliding_window: Optional[int], attention_dropout: float) -> bool:
    """Whether packed rows run on cuDNN's ragged kernel, whose cost follows the segments, not the row.

    Only cuDNN attention without a sliding window; attention dropout (training) takes the XLA path.
    """
    return implementation == "cudnn" and sliding_window is None and attention_dropout <= 0


def _cudnn_ragged_attention(q, k, v, segments: Segments, scale: Optional[float] = None) -> jax.Array:
    # jax.nn.dot_product_attention does not expose cuDNN's packed (ragged) layout; its own
    # cuDNN module does. Only reached on GPU (resolve_attention_implementation), never on CPU/TPU.
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention as cudnn_attention

    seqlens, offsets = segments.cudnn_tables()
    return cudnn_attention(
        q, k, v, q_seqlen=seqlens, kv_seqlen=seqlens, q_offsets=offsets, kv_offsets=offsets,
        scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else scale, mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH",
    )


def dropout(x: jax.Array, rate: float, key: Optional[jax.Array]) -> jax.Array:
    """Inverted dropout as torch's training mode; the identity without a key or at rate 0."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def attention_with_dropout(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: Optional[jax.Array],
    causal: bool,
    sliding_window: Optional[int],
    rate: float,
    key: Optional[jax.Array],
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
) -> jax.Array:
    """:func:`attention` with dropout on the attention probabilities (HF's training mode), in XLA einsums.

    No fused kernel (cuDNN flash attention included) takes a dropout mask, so training with
    attention dropout on runs this path on every backend; so do soft-capped scores (Gemma 2,
    ``softcap``; ``rate=0`` without dropout). ``scale`` defaults to 1/sqrt(D).
    """
    n, kv = q.shape[2], k.shape[2]
    if kv != n:  # GQA: each kv head serves n // kv query heads
        k, v = jnp.repeat(k, n // kv, axis=2), jnp.repeat(v, n // kv, axis=2)
    scores = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32)
    scores = scores / np.float32(math.sqrt(q.shape[-1])) if scale is None else scores * np.float32(scale)
    scores = soft_cap(scores, softcap)
    t, s = q.shape[1], k.shape[1]
    if mask is not None:  # it already holds causality (and any window)
        allowed = mask
    else:
        allowed = jnp.ones((t, s), bool)
        if causal:
            allowed = jnp.tril(allowed, s - t)
            if sliding_window is not None:
                allowed = allowed & ~jnp.tril(jnp.ones((t, s), bool), s - t - sliding_window)
        allowed = allowed[None, None]
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1), rate, key)
    return jnp.einsum("bnts,bsnd->btnd", probs.astype(v.dtype), v)
