"""The decode loop's KV cache: each prompt's keys/values once, each sample's own continuation beside them.

Layout (per layer, one buffer each, so the loop updates them in place):

* ``prefix_k/v`` [groups, kv_heads, prompt_slots, head_dim]: a group is one prompt (left-padded
  to ``prompt_slots``) and its ``n`` samples; written once by prefill, read by all ``n`` samples.
* ``suffix_k/v`` [groups * n, kv_heads, new_slots, head_dim]: row ``g * n + j`` is sample ``j`` of
  group ``g``; each decode step writes one slot per row, at that row's own length.

Attention of a decode token reads its group's prefix plus its own filled suffix, as one softmax
over both (:func:`shared_prefix_attention`). Heads lead the per-row slot axis, so both score
products are batched matmuls over (group, kv head) with no transpose of the cache.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.models.layers import soft_cap


class LayerKV(NamedTuple):
    """One layer's cache (see the module doc)."""

    prefix_k: jax.Array
    prefix_v: jax.Array
    suffix_k: jax.Array
    suffix_v: jax.Array


class RowView(NamedTuple):
    """What a decode step's attention needs to know about every row (shared by all layers)."""

    write_slot: jax.Array  # [B] int32: the suffix slot this step's key/value goes to
    prefix_mask: jax.Array  # [G, Lp] bool: prompt slots holding real tokens
    suffix_len: jax.Array  # [B] int32: filled suffix slots after this step's write
    query_pos: jax.Array  # [B] int32: this token's position
    prefix_pos: jax.Array  # [G, Lp] int32: positions of the prompt slots
    prompt_len: jax.Array  # [G] int32: real prompt tokens (suffix slot s has position prompt_len + s)


def empty_layers(num_layers: int, groups: int, n: int, kv_heads: int, prompt_slots: int, new_slots: int, head_dim: int,
                 dtype) -> list[LayerKV]:
    pre = (groups, kv_heads, prompt_slots, head_dim)
    suf = (groups * n, kv_heads, new_slots, head_dim)
    return [LayerKV(jnp.zeros(pre, dtype), jnp.zeros(pre, dtype), jnp.zeros(suf, dtype), jnp.zeros(suf, dtype))
            for _ in range(num_layers)]


def write_prefix(layers: list[LayerKV], k: jax.Array, v: jax.Array, group_slots: jax.Array) -> list[LayerKV]:
    """Put prefill's stacked K/V [layers, Gp, Lp, K, D] into groups ``group_slots`` [Gp] (out-of-range: dropped)."""
    out = []
    for i, layer in enumerate(layers):
        ki = jnp.swapaxes(k[i], 1, 2).astype(layer.prefix_k.dtype)
        vi = jnp.swapaxes(v[i], 1, 2).astype(layer.prefix_v.dtype)
        out.append(layer._replace(prefix_k=layer.prefix_k.at[group_slots].set(ki, mode="drop"),
                                  prefix_v=layer.prefix_v.at[group_slots].set(vi, mode="drop")))
    return out


def _write_rows(buf: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """buf [B, K, S, D] with new [B, K, D] written at each row's slot (a batched in-place update)."""
    return jax.vmap(lambda b, x, s: jax.lax.dynamic_update_slice_in_dim(b, x[:, None], s, axis=1))(buf, new, slots)


def shared_prefix_attention(q: jax.Array, k: jax.Array, v: jax.Array, layer: LayerKV, rows: RowView,
                            sliding_window: Optional[int], scale: Optional[float] = None,
                            softcap: Optional[float] = None) -> tuple[jax.Array, LayerKV]:
    """One decode token per row: write its K/V [B, 1, K, D], attend over prefix + own suffix; returns [B, 1, N, D].

    ``scale``: the query scale (None: head_dim ** -0.5); ``softcap``: the score soft cap (Gemma 2), applied
    to the scaled scores before masking, as transformers does."""
    b, _, n_heads, d = q.shape
    g, kv, lp, _ = layer.prefix_k.shape
    n = b // g
    h = n_heads // kv
    sk = _write_rows(layer.suffix_k, k[:, 0].astype(layer.suffix_k.dtype), rows.write_slot)
    sv = _write_rows(layer.suffix_v, v[:, 0].astype(layer.suffix_v.dtype), rows.write_slot)
    ls = sk.shape[2]
    cdt = q.dtype
    qg = q.reshape(g, n, kv, h, d)  # query head j reads kv head j // h (HF's repeat_kv order)
    scale = np.float32(1.0 / math.sqrt(d) if scale is None else scale)
    s_pre = jnp.einsum("gnkhd,gksd->gnkhs", qg, layer.prefix_k.astype(cdt), preferred_element_type=jnp.float32)
    s_suf = jnp.einsum("gnkhd,gnksd->gnkhs", qg, sk.reshape(g, n, kv, ls, d).astype(cdt),
                       preferred_element_type=jnp.float32)
    pre_ok = jnp.broadcast_to(rows.prefix_mask[:, None, :], (g, n, lp))
    suf_ok = jnp.arange(ls)[None, :] < rows.suffix_len[:, None]  # [B, Ls]
    if sliding_window is not None:
        qp = rows.query_pos.reshape(g, n)
        pre_ok = pre_ok & ((qp[:, :, None] - rows.prefix_pos[:, None, :]) < sliding_window)
        suf_pos = rows.prompt_len[:, None, None] + jnp.arange(ls)[None, None, :]
        suf_ok = suf_ok & ((qp[:, :, None] - suf_pos) < sliding_window).reshape(b, ls)
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
