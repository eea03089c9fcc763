"""The decode loop's KV cache: each prompt's keys/values once, each sample's own continuation beside them.

Layout (per layer, one buffer each, so the loop updates them in place):

* ``prefix_k/v`` [groups, kv_heads, prompt_slots, head_dim]: a group is one prompt (left-padded
  to ``prompt_slots``) and its ``n`` samples; written once by prefill, read by all ``n`` samples.
* ``suffix_k/v`` [groups * n, kv_heads, new_slots, head_dim]: row ``g * n + j`` is sample ``j`` of
  group ``g``; each decode step writes one slot per row, continuation token ``s`` at slot ``s % new_slots``.

A sliding layer (window ``W``) keeps only what a decode token can still reach (:func:`layer_slots`):
the prompt's last ``W - 1`` slots and a ring of ``W`` continuation slots, which the ``s % slots``
write wraps around; each slot's position is then recovered from the row's length, and the mask
reads positions, not slot numbers. Its memory is O(W), not O(prompt + new tokens).

Attention of a decode token reads its group's prefix plus its own filled suffix, as one softmax
over both (:func:`shared_prefix_attention`): this module's XLA form everywhere, the reference; on GPU,
for layers without window or soft cap, a Pallas kernel (:mod:`jaxsft.kernels.decode_attention`) that
reads each prompt from its first real slot and each continuation only as far as it is filled. Heads lead the per-row slot axis, so both score
products are batched matmuls over (group, kv head) with no transpose of the cache.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.kernels import decode_attention
from jaxsft.models.layers import JoinedQKV, soft_cap


class LayerKV(NamedTuple):
    """One layer's cache (see the module doc)."""

    prefix_k: jax.Array
    prefix_v: jax.Array
    suffix_k: jax.Array
    suffix_v: jax.Array


class RowView(NamedTuple):
    """What a decode step's attention needs to know about every row (shared by all layers)."""

    suffix_index: jax.Array  # [B] int32: this token's index in its row's continuation (written at slot index % slots)
    prefix_mask: jax.Array  # [G, Lp] bool: prompt slots holding real tokens
    query_pos: jax.Array  # [B] int32: this token's position
    prefix_pos: jax.Array  # [G, Lp] int32: positions of the prompt slots
    live: Optional[jax.Array] = None  # [B] bool: rows still generating (None: all); others' outputs are discarded


def layer_slots(windows: Sequence[Optional[int]], prompt_slots: int, new_slots: int) -> list[tuple[int, int]]:
    """Each layer's (prompt slots, continuation slots): the one rule for the cache's size, static per shape.

    A decode token at position ``p`` of a layer with window ``W`` attends positions ``p - W + 1 .. p``:
    the first one (``p`` = prompt length) reaches the prompt's last ``W - 1`` tokens, later ones fewer,
    and continuation ``s`` needs only continuations ``s - W + 1 .. s``. So a sliding layer keeps
    ``min(prompt_slots, W - 1)`` and ``min(new_slots, W)`` (at least one prompt slot, so no buffer is
    empty); a global layer (None) keeps both buckets whole."""
    return [(prompt_slots, new_slots) if w is None else (min(prompt_slots, max(w - 1, 1)), min(new_slots, w))
            for w in windows]


def empty_layers(windows: Sequence[Optional[int]], groups: int, n: int, kv_heads: int, prompt_slots: int,
                 new_slots: int, head_dim: int, dtype) -> list[LayerKV]:
    """Zeroed buffers for layers with attention windows ``windows`` (sized by :func:`layer_slots`)."""
    out = []
    for lp, ls in layer_slots(windows, prompt_slots, new_slots):
        pre, suf = (groups, kv_heads, lp, head_dim), (groups * n, kv_heads, ls, head_dim)
        out.append(LayerKV(jnp.zeros(pre, dtype), jnp.zeros(pre, dtype), jnp.zeros(suf, dtype), jnp.zeros(suf, dtype)))
    return out


def write_prefix(layers: list[LayerKV], k: jax.Array, v: jax.Array, group_slots: jax.Array) -> list[LayerKV]:
    """Put prefill's stacked K/V [layers, Gp, Lp, K, D] into groups ``group_slots`` [Gp] (out-of-range: dropped);
    a layer with fewer prompt slots keeps the last ones (prompts are left-padded: the latest tokens)."""
    out = []
    for i, layer in enumerate(layers):
        keep = layer.prefix_k.shape[2]
        ki = jnp.swapaxes(k[i, :, -keep:], 1, 2).astype(layer.prefix_k.dtype)
        vi = jnp.swapaxes(v[i, :, -keep:], 1, 2).astype(layer.prefix_v.dtype)
        out.append(layer._replace(prefix_k=layer.prefix_k.at[group_slots].set(ki, mode="drop"),
                                  prefix_v=layer.prefix_v.at[group_slots].set(vi, mode="drop")))
    return out


def shared_prefix_attention(qkv: Union[tuple[jax.Array, jax.Array, jax.Array], JoinedQKV], layer: LayerKV,
                            rows: RowView, sliding_window: Optional[int], scale: Optional[float] = None,
                            softcap: Optional[float] = None) -> tuple[jax.Array, LayerKV]:
    """One decode token per row: write its K/V [B, 1, K, D], attend over prefix + own suffix; returns [B, 1, N, D].

    ``qkv``: (q [B, 1, N, D], k, v [B, 1, K, D]), or the layer's :class:`~jaxsft.models.layers.JoinedQKV`, which the
    GPU kernel takes whole and everything else splits. ``scale``: the query scale (None: head_dim ** -0.5);
    ``softcap``: the score soft cap (Gemma 2), applied to the scaled scores before masking, as transformers does."""
    g, kv, lp, d = layer.prefix_k.shape  # lp / ls: this layer's slots (a sliding layer may keep fewer)
    ls = layer.suffix_k.shape[2]
    index = rows.suffix_index
    scale = np.float32(1.0 / math.sqrt(d) if scale is None else scale)

    def prefix_start():  # each group's first real prompt slot (the kernels' only use of the mask)
        return lp - jnp.sum(rows.prefix_mask[:, -lp:], axis=1)

    # A kernel's layer is global: its continuation never wraps (ls covers every new token), so slots 0..index hold it.
    if isinstance(qkv, JoinedQKV) and decode_attention.projection_applies(d, sliding_window, softcap):
        out, sk, sv = decode_attention.projection_attention_with_write(
            qkv.out, qkv.bias, qkv.rope, layer.prefix_k, layer.prefix_v, prefix_start(), layer.suffix_k, layer.suffix_v,
            index, scale, heads=qkv.heads, live=rows.live)
        return out, layer._replace(suffix_k=sk, suffix_v=sv)
    q, k, v = qkv.split() if isinstance(qkv, JoinedQKV) else qkv
    b, _, n_heads, _ = q.shape
    n = b // g
    h = n_heads // kv
    if decode_attention.kernel_applies(d, sliding_window, softcap):  # GPU: a Pallas decode kernel
        out, sk, sv = decode_attention.kernel()(q, k, v, layer.prefix_k, layer.prefix_v, prefix_start(), layer.suffix_k,
                                                layer.suffix_v, index, scale, live=rows.live)
        return out, layer._replace(suffix_k=sk, suffix_v=sv)
    sk = decode_attention.write_token(layer.suffix_k, k[:, 0].astype(layer.suffix_k.dtype), index % ls)
    sv = decode_attention.write_token(layer.suffix_v, v[:, 0].astype(layer.suffix_v.dtype), index % ls)
    cdt = q.dtype
    qg = q.reshape(g, n, kv, h, d)  # query head j reads kv head j // h (HF's repeat_kv order)
    s_pre = jnp.einsum("gnkhd,gksd->gnkhs", qg, layer.prefix_k.astype(cdt), preferred_element_type=jnp.float32)
    s_suf = jnp.einsum("gnkhd,gnksd->gnkhs", qg, sk.reshape(g, n, kv, ls, d).astype(cdt),
                       preferred_element_type=jnp.float32)
    pre_ok = jnp.broadcast_to(rows.prefix_mask[:, None, -lp:], (g, n, lp))
    # The continuation index each slot holds: the latest i <= index with i % ls == slot (negative: none yet).
    held = index[:, None] - (index[:, None] - jnp.arange(ls)[None, :]) % ls  # [B, Ls]
    suf_ok = held >= 0
    if sliding_window is not None:
        qp = rows.query_pos.reshape(g, n)
        pre_ok = pre_ok & ((qp[:, :, None] - rows.prefix_pos[:, None, -lp:]) < sliding_window)
        suf_ok = suf_ok & (index[:, None] - held < sliding_window)
    neg = jnp.float32(-jnp.inf)
    s_pre = jnp.where(pre_ok[:, :, None, None, :], soft_cap(s_pre * scale, softcap), neg)
    s_suf = jnp.where(suf_ok.reshape(g, n, 1, 1, ls), soft_cap(s_suf * scale, softcap), neg)
    m = jnp.maximum(jnp.max(s_pre, axis=-1, keepdims=True), jnp.max(s_suf, axis=-1, keepdims=True))
    e_pre, e_suf = jnp.exp(s_pre - m), jnp.exp(s_suf - m)
    denom = jnp.sum(e_pre, axis=-1, keepdims=True) + jnp.sum(e_suf, axis=-1, keepdims=True)
    vdt = layer.prefix_v.dtype
    out = jnp.einsum("gnkhs,gksd->gnkhd", (e_pre / denom).astype(vdt), layer.prefix_v, preferred_element_type=jnp.float32)
    out = out + jnp.einsum("gnkhs,gnksd->gnkhd", (e_suf / denom).astype(vdt), sv.reshape(g, n, kv, ls, d),
                           preferred_element_type=jnp.float32)
    return out.astype(cdt).reshape(b, 1, n_heads, d), layer._replace(suffix_k=sk, suffix_v=sv)
