"""The encoder-decoder side of the engine: a :class:`~jaxsft.generation.engine.DecodeModel` over ``Seq2SeqLM``.

Prefill runs a group's (right-padded) prompt through the encoder once, keeps every decoder layer's
cross-attention K/V once per group (its ``n`` samples read the same), and feeds the decoder start
token, whose self-attention K/V every row of the group starts from. A decode step writes each
row's new self-attention K/V at its own position and attends over its filled slots, then over its
group's cross K/V. T5 (relative position bias) and BART (learned positions) alike.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxsft.infra import sharding as shd
from jaxsft.generation.engine import Shape, pow2_at_most


class LayerKV(NamedTuple):
    """One decoder layer's cache."""

    self_k: jax.Array  # [G * n, heads, new_slots, head_dim]: row r's decoder tokens, position p at slot p
    self_v: jax.Array
    cross_k: jax.Array  # [G, heads, prompt_slots, head_dim]: the group's encoder output, projected once
    cross_v: jax.Array


class EncoderCache(NamedTuple):
    """The encoder-decoder's engine cache."""

    layers: list  # [decoder layers] of LayerKV
    enc_mask: Any  # [G, Lp] bool: encoder slots holding real tokens


def _shapes(spec, shape: Shape) -> tuple[tuple, tuple]:
    heads, d = spec.num_heads, spec.head_dim
    return (shape.rows, heads, shape.new_slots, d), (shape.groups, heads, shape.prompt_slots, d)


def _softmax_attend(scores: jax.Array, ok: jax.Array, v: jax.Array, spec: str) -> jax.Array:
    """softmax over the last axis of fp32 ``scores`` where ``ok``, then the weighted sum of ``v``."""
    probs = jax.nn.softmax(jnp.where(ok, scores, -jnp.inf), axis=-1)
    return jnp.einsum(spec, probs.astype(v.dtype), v)


class Seq2SeqAdapter:
    """The engine's view of an encoder-decoder model (spec and compute dtype fixed per adapter)."""

    prompt_padding = "right"  # BART's encoder positions count from the first slot
    accepts_chat = False  # an encoder reads text, not a chat template's turns

    def __init__(self, spec, dtype):
        self.spec, self.dtype = spec, jnp.dtype(dtype)

    # ------------------------------------------------------------------ host side
    def tokens_before_new(self, longest_prompt: int) -> int:
        """What HF's ``max_length`` counts besides the new tokens: the decoder start token."""
        return 1

    def check_lengths(self, prompt_ids: list[list[int]], max_new_tokens: int) -> Optional[str]:
        """Refuse what learned positions cannot hold; a warning (returned) past T5's trained length."""
        spec = self.spec
        limit = spec.max_position_embeddings
        if spec.position == "learned":
            if max_new_tokens > limit:
                raise ValueError(f"generate(): max_new_tokens ({max_new_tokens}) exceeds the decoder's {limit} "
                                 "positions; lower max_new_tokens.")
            for i, row in enumerate(prompt_ids):
                if len(row) > limit:
                    raise ValueError(f"generate(): prompts[{i}] is {len(row)} tokens, over the encoder's {limit} "
                                     "positions; shorten it (or truncate with the tokenizer).")
            return None
        longest = max(len(p) for p in prompt_ids)
        if longest > limit:
            return (f"generate(): a {longest}-token prompt runs past the {limit} tokens this encoder was trained on; "
                    "quality may drop.")
        return None

    # ------------------------------------------------------------------ inside the programs

    def merge(self, graphdef, state):
        return nnx.merge(graphdef, state)  # the model casts its layer weights to the compute dtype itself

    def empty_cache(self, shape: Shape) -> EncoderCache:
        own, cross = _shapes(self.spec, shape)
        layers = [LayerKV(jnp.zeros(own, self.dtype), jnp.zeros(own, self.dtype), jnp.zeros(cross, self.dtype),
                          jnp.zeros(cross, self.dtype)) for _ in range(self.spec.num_decoder_layers)]
        enc_mask = jnp.zeros((shape.groups, shape.prompt_slots), bool).at[:, 0].set(True)  # free groups: never empty
        return EncoderCache(layers, enc_mask)

    def cache_layouts(self, mesh, shape: Shape, rules) -> EncoderCache:
        def named(axes, shp):
            return NamedSharding(mesh, shd.activation_spec(axes, shp, mesh, rules))

        own, cross = _shapes(self.spec, shape)
        heads = ("batch", "kv_heads", None, None)
        layer = LayerKV(named(heads, own), named(heads, own), named(heads, cross), named(heads, cross))
        return EncoderCache([layer] * self.spec.num_decoder_layers, named(("batch", None), (shape.groups, 1)))

    def prefill(self, model, cache: EncoderCache, ids, mask, slots, shape: Shape):
        spec, n, gp = self.spec, shape.n, ids.shape[0]
        enc = model.encode(ids, mask)  # once per prompt
        cross_k, cross_v = model.cross_kv(enc)  # [layers, Gp, Lp, heads, D], once per prompt
        start = jnp.full((gp, 1), spec.decoder_start_token_id, jnp.int32)
        started = []

        def self_attention(q, k, v, layer):  # the start token attends to itself only: softmax of one score is 1
            started.append((k[:, 0], v[:, 0]))
            return v, layer

        def cross_attention(q, i):
            k, v = cross_k[i].astype(q.dtype), cross_v[i].astype(q.dtype)
            return _attention(spec, q, k, v, mask)

        hidden, _ = model.decode_step(start, jnp.zeros((gp, 1), jnp.int32), range(spec.num_decoder_layers),
                                      self_attention, cross_attention, model.decode_params())
        rows = (slots[:, None] * n + jnp.arange(n)[None, :]).reshape(-1)
        rows = jnp.where(jnp.repeat(slots, n) < shape.groups, rows, shape.rows)  # fillers: dropped
        layers = []
        for i, (layer, (k0, v0)) in enumerate(zip(cache.layers, started)):
            def put_rows(buf, x):  # position 0 of every row of the group
                return buf.at[rows, :, 0].set(jnp.repeat(x, n, axis=0).astype(buf.dtype), mode="drop")

            def put_groups(buf, x):  # [Gp, Lp, heads, D] -> the groups' [heads, Lp, D]
                return buf.at[slots].set(jnp.swapaxes(x, 1, 2).astype(buf.dtype), mode="drop")

            layers.append(LayerKV(put_rows(layer.self_k, k0), put_rows(layer.self_v, v0),
                                  put_groups(layer.cross_k, cross_k[i]), put_groups(layer.cross_v, cross_v[i])))
        cache = EncoderCache(layers, cache.enc_mask.at[slots].set(mask, mode="drop"))
        return cache, model.logits(hidden, self.dtype)[:, 0]

    def decode_context(self, model, cache: EncoderCache, shape: Shape):
        return model.decode_params()  # weights split once, outside the loop

    def decode_step(self, model, context, cache: EncoderCache, last, index, live, shape: Shape):
        del live  # XLA attention over fixed shapes: a finished row costs the same, and its logits are discarded
        spec, n, ls = self.spec, shape.n, shape.new_slots
        position = index + 1  # continuation token i sits at decoder position i + 1 (the start token at 0)
        bias = model.self_attention_bias(position, ls)  # [B, heads, 1, Ls] or None, shared by the layers
        own_ok = (jnp.arange(ls)[None, :] <= position[:, None])[:, None, None, :]  # [B, 1, 1, Ls]
        scale = np.float32(spec.head_dim ** -0.5) if spec.scale_attention else None

        def self_attention(q, k, v, layer: LayerKV):
            at = position % ls  # within the bucket (position < max_new <= Ls); % keeps stale rows in range
            write = jax.vmap(lambda buf, x, s: jax.lax.dynamic_update_slice_in_dim(buf, x[:, None], s, axis=1))
            sk = write(layer.self_k, k[:, 0].astype(layer.self_k.dtype), at)
            sv = write(layer.self_v, v[:, 0].astype(layer.self_v.dtype), at)
            scores = jnp.einsum("btnd,bnsd->bnts", q, sk.astype(q.dtype), preferred_element_type=jnp.float32)
            if scale is not None:
                scores = scores * scale
            if bias is not None:
                scores = scores + bias.astype(jnp.float32)
            attn = _softmax_attend(scores, own_ok, sv.astype(q.dtype), "bnts,bnsd->btnd")
            return attn, layer._replace(self_k=sk, self_v=sv)

        def cross_attention(q, layer: LayerKV):
            b, _, heads, d = q.shape
            qg = q.reshape(b // n, n, heads, d)
            scores = jnp.einsum("gjnd,gnsd->gjns", qg, layer.cross_k.astype(q.dtype), preferred_element_type=jnp.float32)
            if scale is not None:
                scores = scores * scale
            ok = cache.enc_mask[:, None, None, :]
            attn = _softmax_attend(scores, ok, layer.cross_v.astype(q.dtype), "gjns,gnsd->gjnd")
            return attn.reshape(b, 1, heads, d)

        hidden, layers = model.decode_step(last[:, None], position[:, None], cache.layers, self_attention,
                                           cross_attention, context)
        return cache._replace(layers=layers), model.logits(hidden, self.dtype)[:, 0]

    def kv_bytes_per_group(self, n: int, prompt_slots: int, new_slots: int) -> int:
        """Per decoder layer: the prompt's cross K/V once plus ``n`` rows' own K/V."""
        spec = self.spec
        per_slot = 2 * spec.num_heads * spec.head_dim * jnp.dtype(self.dtype).itemsize
        return per_slot * spec.num_decoder_layers * (prompt_slots + n * new_slots)

    def prefill_group_cap(self, prompt_slots: int, budget: int) -> int:
        """Prompts per prefill call so that the encoder's scores (fp32 [Gp, heads, Lp, Lp]) stay under ``budget``."""
        return pow2_at_most(max(1, budget // (self.spec.num_heads * prompt_slots * prompt_slots * 4)))


def _attention(spec, q, k, v, mask) -> jax.Array:
    """Prefill's cross-attention: q [Gp, 1, N, D] over k/v [Gp, Lp, N, D] where ``mask`` [Gp, Lp]."""
    scores = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32)
    if spec.scale_attention:
        scores = scores * np.float32(spec.head_dim ** -0.5)
    return _softmax_attend(scores, mask[:, None, None, :], v, "bnts,bsnd->btnd")
