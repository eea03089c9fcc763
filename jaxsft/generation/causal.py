"""The decoder-only side of the engine: a :class:`~jaxsft.generation.engine.DecodeModel` over ``CausalLM``.

Prefill runs a group's (left-padded) prompt once and keeps its K/V as the group's prefix; every
decode step attends each row over that shared prefix plus its own continuation
(:mod:`jaxsft.generation.kv_cache`). Weights are cast to the compute dtype once per program.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from jaxsft.infra import sharding as shd
from jaxsft.generation import kv_cache
from jaxsft.generation.engine import Shape, pow2_at_most


class PromptCache(NamedTuple):
    """The decoder's engine cache: per-layer K/V plus what each group's prompt looks like."""

    layers: list  # [layers] of kv_cache.LayerKV
    prefix_mask: Any  # [G, Lp] bool: prompt slots holding real tokens
    prompt_len: Any  # [G] int32


def kv_bytes_per_group(spec, dtype, n: int, prompt_slots: int, new_slots: int) -> int:
    """KV bytes one group holds: its prompt once plus ``n`` continuations, every layer (a sliding layer only
    its window's, :func:`kv_cache.layer_slots`): the budget then fits more slot groups."""
    per_slot = 2 * spec.num_kv_heads * spec.head_dim * jnp.dtype(dtype).itemsize
    slots = kv_cache.layer_slots(spec.windows(), prompt_slots, new_slots)
    return per_slot * sum(lp + n * ls for lp, ls in slots)


def compute_view(state, dtype):
    """Parameters cast to the compute dtype once per program (the model casts them at use anyway).

    Without this, a model keeping fp32 parameters with bf16 compute would re-cast every
    weight on every decode step. The final norm is left alone: a LayerNorm reads it in fp32.
    """
    dtype = jnp.dtype(dtype)

    def cast(path, x):
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        if floating and x.dtype != dtype and "final_norm" not in jax.tree_util.keystr(path):
            return x.astype(dtype)
        return x

    return jax.tree_util.tree_map_with_path(cast, state)


class CausalAdapter:
    """The engine's view of a decoder-only model (spec and compute dtype fixed per adapter)."""

    prompt_padding = "left"
    accepts_chat = True

    def __init__(self, spec, dtype):
        self.spec, self.dtype = spec, jnp.dtype(dtype)

    # ------------------------------------------------------------------ host side
    def tokens_before_new(self, longest_prompt: int) -> int:
        """What HF's ``max_length`` counts besides the new tokens: the prompt."""
        return longest_prompt

    def check_lengths(self, prompt_ids: list[list[int]], max_new_tokens: int) -> Optional[str]:
        """Refuse what the positions cannot hold; a warning (returned) past a RoPE model's trained length."""
        spec, longest = self.spec, max(len(p) for p in prompt_ids)
        if longest + max_new_tokens <= spec.max_position_embeddings:
            return None
        if spec.position == "learned":
            raise ValueError(
                f"generate(): prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's {spec.max_position_embeddings} positions; shorten the prompts or lower max_new_tokens.")
        return (f"generate(): prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) runs past the "
                f"{spec.max_position_embeddings} positions this model was trained on; quality may drop.")

    # ------------------------------------------------------------------ inside the programs

    def merge(self, graphdef, state):
        return nnx.merge(graphdef, compute_view(state, self.dtype))

    def empty_cache(self, shape: Shape) -> PromptCache:
        spec, g = self.spec, shape.groups
        layers = kv_cache.empty_layers(spec.windows(), g, shape.n, spec.num_kv_heads, shape.prompt_slots,
                                       shape.new_slots, spec.head_dim, self.dtype)
        prefix_mask = jnp.zeros((g, shape.prompt_slots), bool).at[:, -1].set(True)  # free groups: never empty
        return PromptCache(layers, prefix_mask, jnp.ones((g,), jnp.int32))

    def cache_layouts(self, mesh, shape: Shape, rules) -> PromptCache:
        spec = self.spec

        def named(axes, shp):
            return NamedSharding(mesh, shd.activation_spec(axes, shp, mesh, rules))

        kv, heads = spec.num_kv_heads, ("batch", "kv_heads", None, None)
        layers = []
        for lp, ls in kv_cache.layer_slots(spec.windows(), shape.prompt_slots, shape.new_slots):
            pre = named(heads, (shape.groups, kv, lp, spec.head_dim))
            suf = named(heads, (shape.rows, kv, ls, spec.head_dim))
            layers.append(kv_cache.LayerKV(pre, pre, suf, suf))
        return PromptCache(layers, named(("batch", None), (shape.groups, 1)), named(("batch",), (shape.groups,)))

    def prefill(self, model, cache: PromptCache, ids, mask, slots, shape: Shape):
        lengths = jnp.sum(mask, axis=-1).astype(jnp.int32)
        full = model.init_cache(ids.shape[0], shape.prompt_slots, self.dtype)
        if self.right_aligned_prefill:
            hidden, k, v = self._prefill_right_aligned(model, full, ids, lengths)
        else:
            positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
            hidden, full = model.forward_with_cache(ids, positions, full, jnp.int32(0), mask)
            hidden, k, v = hidden[:, -1:], full.k, full.v
        cache = PromptCache(
            layers=kv_cache.write_prefix(cache.layers, k, v, slots),
            prefix_mask=cache.prefix_mask.at[slots].set(mask, mode="drop"),
            prompt_len=cache.prompt_len.at[slots].set(lengths, mode="drop"),
        )
        return cache, model.logits(hidden, self.dtype)[:, 0]

    @property
    def right_aligned_prefill(self) -> bool:
        """Whether prefill runs its prompts right-padded (every model without sliding-window layers)."""
        return not self.spec.has_windows

    @staticmethod
    def _prefill_right_aligned(model, full, ids, lengths):
        """The left-padded prompts ``ids`` [Gp, Lp] run right-padded, their K/V returned left-padded again.

        Why: with the padding at the end, causal attention alone is exact for every real token, so prefill takes
        the attention kernel training uses (cuDNN's flash attention on GPU) instead of XLA attention under a
        padding mask, which materialises and transposes [Gp, K, Lp, H/K, Lp] scores per layer (31 ms of
        transposes alone in a 0.5B, 512-prompt generate call on one H100, benchmarks/RESULTS.md).
        Returns (the last real token's hidden state [Gp, 1, H], K and V [layers, Gp, Lp, K, D] in the cache's
        left-padded layout)."""
        width = ids.shape[1]
        shift = (width - lengths)[:, None]  # each row's left padding
        slot = jnp.arange(width)[None, :]
        right = jnp.take_along_axis(ids, (slot + shift) % width, axis=1)
        positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), ids.shape)
        hidden, full = model.forward_with_cache(right, positions, full, jnp.int32(0), None)
        back = ((slot - shift) % width)[None, :, :, None, None]  # left slot s holds right slot s - shift
        k, v = (jnp.take_along_axis(x, back, axis=2) for x in (full.k, full.v))
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
        return last, k, v

    def decode_context(self, model, cache: PromptCache, shape: Shape):
        lp = shape.prompt_slots
        prefix_pos = (jnp.arange(lp)[None, :] - (lp - cache.prompt_len)[:, None]).astype(jnp.int32)
        return model.decode_params(), prefix_pos  # weights split once, outside the loop

    def decode_step(self, model, context, cache: PromptCache, last, index, live, shape: Shape):
        layer_params, prefix_pos = context
        query_pos = jnp.repeat(cache.prompt_len, shape.n) + index
        rows = kv_cache.RowView(suffix_index=index, prefix_mask=cache.prefix_mask, query_pos=query_pos,
                                prefix_pos=prefix_pos, live=live)

        def attend(qkv, layer, *, window, scale, softcap):
            return kv_cache.shared_prefix_attention(qkv, layer, rows, window, scale, softcap)

        hidden, layers = model.decode_step(last[:, None], query_pos[:, None], cache.layers, attend, layer_params)
        return cache._replace(layers=layers), model.logits(hidden, self.dtype)[:, 0]

    def kv_bytes_per_group(self, n: int, prompt_slots: int, new_slots: int) -> int:
        return kv_bytes_per_group(self.spec, self.dtype, n, prompt_slots, new_slots)

    def prefill_group_cap(self, prompt_slots: int, budget: int) -> int:
        """Prompts per prefill call so that its attention scores (fp32 [Gp, heads, Lp, Lp]) stay under ``budget``."""
        return pow2_at_most(max(1, budget // (self.spec.num_heads * prompt_slots * prompt_slots * 4)))
