"""The decoder-only language model shared by every supported family.

Parameters live as ``nnx.Param`` with a ``logical_axes`` tuple (read by
``jaxsft.infra.sharding``). Per-layer weights are stacked on a leading ``layers`` axis
and run under ``lax.scan`` so compile time does not grow with depth; the layer
body is a pure function, so remat is a ``jax.checkpoint`` around it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsft.kernels.add_rms_norm import add_rms_norm, kernel_applies
from jaxsft.models import layers as L
from jaxsft.models import lora as lora_lib
from jaxsft.models.embedding import embedding_lookup
from jaxsft.models.interface import LMHead
from jaxsft.models.options import REMAT_POLICIES, RunOptions
from jaxsft.infra.sharding import active_mesh, batch_split_axes, constrain
from jaxsft.models.spec import ModelSpec, layer_param_shapes, norm_identity_init


class KVCache(NamedTuple):
    """Per-layer keys and values, [layers, batch, max_len, kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array


def _init(kind: str, key: jax.Array, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
    if kind == "ones":
        return jnp.ones(shape, dtype)
    if kind == "zeros":
        return jnp.zeros(shape, dtype)
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class DecoderLayers(nnx.Module):
    """All transformer blocks, each weight stacked on a leading layers axis."""

    def __init__(self, spec: ModelSpec, *, param_dtype, rngs: nnx.Rngs):
        for name, (shape, axes, kind) in layer_param_shapes(spec).items():
            value = _init(kind, rngs.params(), (spec.num_layers, *shape), spec.initializer_range, param_dtype)
            setattr(self, name, nnx.Param(value, logical_axes=("layers", *axes)))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self._names()}

    def _names(self) -> list[str]:
        return [k for k, v in vars(self).items() if isinstance(v, nnx.Param)]


class CausalLM(nnx.Module):
    """A decoder-only LM. ``__call__(input_ids, attention_mask=None)`` returns fp32 logits [B, T, V]."""

    # Top-level attributes whose arrays are cast to ``dtype`` before any use (``_run_layers``), so a
    # training step may differentiate compute-dtype copies of them (jaxsft.training.step.compute_view).
    CAST_AT_USE = ("layers",)

    def __init__(
        self,
        spec: ModelSpec,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        remat: bool = False,
        remat_policy: str = "nothing_saveable",
        attention_implementation: str = "auto",
        scan_layers: bool = True,
        dropout: bool = False,
        norm_implementation: str = RunOptions.norm_implementation,  # the default lives in RunOptions
        hf_config_json: Optional[str] = None,
        lora: Optional["lora_lib.LoraSetup"] = None,
    ):
        RunOptions(dtype, remat, remat_policy, attention_implementation, scan_layers, dropout,
                   norm_implementation)  # validates the knobs
        self.spec = spec
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.remat = remat
        self.remat_policy = remat_policy
        self.attention_implementation = attention_implementation
        self.scan_layers = scan_layers
        self.dropout = dropout  # apply the config's dropout rates when a training step passes a dropout rng
        self.norm_implementation = norm_implementation
        self.hf_config_json = hf_config_json
        std = spec.initializer_range
        h = spec.hidden_size
        self.embed = nnx.Param(
            _init("normal", rngs.params(), (spec.vocab_size, h), std, param_dtype), logical_axes=("vocab", "embed")
        )
        if spec.position == "learned":
            self.pos_embed = nnx.Param(
                _init("normal", rngs.params(), (spec.max_position_embeddings, h), std, param_dtype),
                logical_axes=(None, "embed"),
            )
        self.layers = DecoderLayers(spec, param_dtype=param_dtype, rngs=rngs)
        self.final_norm_scale = nnx.Param(_init(norm_identity_init(spec), None, (h,), std, param_dtype), logical_axes=("norm",))
        if spec.norm == "layer":
            self.final_norm_bias = nnx.Param(jnp.zeros((h,), param_dtype), logical_axes=("norm",))
        if not spec.tie_word_embeddings:
            self.lm_head = nnx.Param(
                _init("normal", rngs.params(), (spec.vocab_size, h), std, param_dtype), logical_axes=("vocab", "embed")
            )
        if lora is not None:  # structure only (zeros): adapters get their values from lora.add_lora / attach
            self.lora = lora
            self.lora_layers = lora_lib.LoraLayers.zeros(spec, lora)

    # ------------------------------------------------------------------ public API
    @property
    def config(self):
        """The Hugging Face config this model was built from (a ``transformers.PretrainedConfig``)."""
        from transformers import AutoConfig

        if self.hf_config_json is None:
            return None
        data = json.loads(self.hf_config_json)
        return AutoConfig.for_model(data.pop("model_type"), **data)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: Optional[jax.Array] = None,
        positions: Optional[jax.Array] = None,
    ) -> jax.Array:
        hidden = self.hidden_states(input_ids, attention_mask, positions)
        return self.logits(hidden)

    def unembedding(self) -> jax.Array:
        """The output projection as [vocab, hidden] (the embedding itself when tied)."""
        if self.spec.tie_word_embeddings:
            return self.embed[...]
        return self.lm_head[...]

    def lm_head_operands(self, hidden: jax.Array) -> LMHead:
        """The lm head's operands (hidden, [V, H] weight, final-logit soft cap) for the fused loss and the sampler."""
        return LMHead(hidden, self.unembedding(), self.spec.final_logit_softcap)

    def logits(self, hidden: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        """The lm head's logits in ``dtype``: fp32 for losses and eval; generation asks for the compute dtype,
        the logits HF's generate samples from, which halves what a decode step writes and reads over the vocabulary."""
        head = self.lm_head_operands(hidden)
        w = head.weight.astype(self.dtype)
        out = jnp.einsum("bth,vh->btv", head.hidden.astype(self.dtype), w,
                         preferred_element_type=jnp.float32 if head.softcap else dtype)
        return L.soft_cap(out, head.softcap).astype(dtype)

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: Optional[jax.Array] = None,
        positions: Optional[jax.Array] = None,
        segment_ids: Optional[jax.Array] = None,
        segment_lengths: Optional[jax.Array] = None,
        *,
        dropout_key: Optional[jax.Array] = None,
    ) -> jax.Array:
        """Final-norm hidden states [B, T, H].

        Without ``attention_mask`` the batch is taken as unpadded or right-padded
        (causal attention alone keeps real tokens from seeing padding), which lets
        the GPU use cuDNN flash attention. With a mask (left padding, holes),
        positions count real tokens only and padded keys are masked out.
        ``dropout_key`` (training only) drives LoRA dropout; without it there is none. With
        ``segment_ids`` (packed rows: 1, 2, ... per example, 0 = padding, with
        ``positions`` counting from 0 in each example) a token attends only to
        earlier tokens of its own example; ``segment_lengths`` (the packer's table, see
        ``batching.segment_table``) lets the GPU run that as cuDNN flash attention. With the
        model built with ``dropout=True`` (the trainer's view) it also drives the HF config's own dropout.
        """
        input_ids = jnp.asarray(input_ids)
        batch, length = input_ids.shape
        mask = None
        segments = None
        if segment_ids is not None:
            if attention_mask is not None or positions is None:
                raise ValueError("hidden_states: segment_ids need positions and exclude attention_mask.")
            segments = L.Segments(jnp.asarray(segment_ids), None if segment_lengths is None else jnp.asarray(segment_lengths))
            positions = jnp.asarray(positions)
        elif attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask).astype(bool)
            if positions is None:
                positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
            causal = jnp.tril(jnp.ones((length, length), bool))
            mask = causal[None, None] & attention_mask[:, None, None, :]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        own_rng = self._own_dropout_key(dropout_key)
        h = L.dropout(self._embed(input_ids, positions), self.spec.embd_dropout,
                      None if own_rng is None else jax.random.fold_in(own_rng, 1))
        h, _ = self._run_layers(h, positions, mask=mask, causal=True, cache=None, write_index=None, dropout_key=dropout_key, segments=segments)
        return self._final_norm(h)

    def init_cache(self, batch: int, max_length: int, dtype: Any = None) -> KVCache:
        s = self.spec
        shape = (s.num_layers, batch, max_length, s.num_kv_heads, s.head_dim)
        dtype = dtype or self.dtype
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def forward_with_cache(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        cache: KVCache,
        write_index: jax.Array,
        kv_mask: Optional[jax.Array],
    ) -> tuple[jax.Array, KVCache]:
        """Run T new tokens against a KV cache; returns final hidden states and the updated cache.

        The new keys/values are written at cache slots ``write_index .. write_index+T-1``
        (the same slots for every row: prompts are left-padded). ``kv_mask`` [B, S]
        marks cache slots holding real tokens, the new ones included.

        ``kv_mask=None``: rows are right-padded prompts filling an empty cache (``write_index`` 0, T = S), so
        plain causal attention is exact for every real token and no mask is built: the attention kernel of
        training (cuDNN's on GPU) serves. Models with sliding windows need the mask.
        """
        t = input_ids.shape[1]
        mask = None
        if kv_mask is not None:
            slots = jnp.arange(cache.k.shape[2])
            query_slots = write_index + jnp.arange(t)
            causal = slots[None, :] <= query_slots[:, None]  # [T, S]
            mask = causal[None, None] & kv_mask.astype(bool)[:, None, None, :]  # windows: _run_layers, per layer
        elif self.spec.has_windows or t != cache.k.shape[2]:
            raise ValueError("forward_with_cache(kv_mask=None) takes right-padded prompts filling the cache, for "
                             "models without sliding windows; pass kv_mask otherwise.")
        h = self._embed(input_ids, positions)
        h, cache = self._run_layers(h, positions, mask=mask, causal=True, cache=cache, write_index=write_index)
        return self._final_norm(h), cache

    def decode_params(self) -> list[dict[str, jax.Array]]:
        """The layers' weights (and adapters) in the compute dtype, split into one dict per layer.

        Called once outside a decode loop: the loop body then indexes nothing, so no weight is
        sliced (copied) per step. Projections that read the same input are joined here
        (:func:`join_projections`), once per program instead of once per step.
        """
        dtype = self.dtype
        params = {k: v.astype(dtype) for k, v in self.layers.arrays().items()}
        if projections_joinable():
            params = join_projections(self.spec, params)
        params.update(lora_lib.layer_inputs(self, dtype, None))
        return [{k: v[i] for k, v in params.items()} for i in range(self.spec.num_layers)]

    def decode_step(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        layer_caches: Sequence[Any],
        cached_attention: Callable[..., tuple[jax.Array, Any]],
        layer_params: Sequence[dict[str, jax.Array]],
    ) -> tuple[jax.Array, list[Any]]:
        """One token per row [B, 1] through every layer; returns the final hidden states and the new caches.

        The layers run unrolled over per-layer caches (``layer_caches[i]``, any pytree), each updated by
        ``cached_attention(qkv, layer_caches[i], window=, scale=, softcap=) -> (attn, new_cache)`` (``qkv``: (q, k, v)
        or a :class:`~jaxsft.models.layers.JoinedQKV`, see :func:`_decoder_block`; the
        layer's attention window, query scale and score soft cap; None = none / head_dim ** -0.5): a loop that carries one
        buffer per layer updates each in place, where a stacked cache would be sliced and written back
        whole every step. ``layer_params`` comes from :meth:`decode_params`.
        """
        spec = self.spec
        rope = L.rope_cos_sin(spec, positions, self.dtype) if spec.position == "rope" else None
        local_rope = None
        if rope is not None and any(spec.local_rope_layers()):  # Gemma 3's sliding layers: their own base
            local_rope = L.rope_cos_sin(dataclasses.replace(spec, rope_theta=spec.rope_local_theta, rope_type="default"),
                                        positions, self.dtype)
        impl = L.resolve_attention_implementation(self.attention_implementation, self.dtype)
        lora = lora_lib.lora_setup(self)
        h = self._embed(input_ids, positions)
        norm_impl = decode_norm_implementation(self.norm_implementation)
        fused = fuses_norms(spec, norm_impl, dropout=False, batch=h.shape[0])
        pending = jnp.zeros_like(h) if fused else None
        new_caches = []
        layers = zip(layer_params, layer_caches, spec.windows(), spec.local_rope_layers())
        for p, layer_cache, window, local in layers:  # unrolled: each layer's window and RoPE table are static
            out, new_cache = _decoder_block(
                spec, h, p, local_rope if local else rope, mask=None, causal=True, impl=impl, layer_cache=layer_cache,
                write_index=None, lora=lora, window=window, cached_attention=cached_attention,
                norm_impl=norm_impl, pending=pending,
            )
            h, pending = out if pending is not None else (out, None)
            new_caches.append(new_cache)
        return self._final_norm(h if pending is None else h + pending), new_caches

    # ------------------------------------------------------------------ internals
    def _own_dropout_key(self, dropout_key: Optional[jax.Array]) -> Optional[jax.Array]:
        """The key of the config's own dropout (a stream apart from LoRA's), or None when it is off."""
        s = self.spec
        if dropout_key is None or not self.dropout or max(s.embd_dropout, s.resid_dropout, s.attention_dropout) <= 0:
            return None
        return jax.random.fold_in(dropout_key, 0x0D50)

    def _embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        h = embedding_lookup(self.embed[...], input_ids, ("vocab", "embed"))
        if self.spec.embed_multiplier is not None:  # in the embedding's dtype, as transformers scales it
            h = h * jnp.asarray(self.spec.embed_multiplier, h.dtype)
        h = h.astype(self.dtype)
        if self.spec.position == "learned":
            h = h + embedding_lookup(self.pos_embed[...], positions, (None, "embed")).astype(self.dtype)
        return constrain(h, ("batch", None, None))

    def _final_norm(self, h: jax.Array) -> jax.Array:
        h = constrain(h, ("batch", None, None))
        bias = self.final_norm_bias[...] if self.spec.norm == "layer" else None
        return L.norm(self.spec.norm, h, self.final_norm_scale[...], bias, self.spec.norm_eps)

    def _run_layers(self, h, positions, *, mask, causal, cache: Optional[KVCache], write_index, dropout_key=None, segments=None):
        spec, dtype = self.spec, self.dtype
        impl = L.attention_kernel(L.resolve_attention_implementation(self.attention_implementation, dtype),
                                  softcap=spec.attn_logit_softcap, windows_vary=spec.windows_vary)
        rope = L.rope_cos_sin(spec, positions, dtype) if spec.position == "rope" else None
        params = {k: v.astype(dtype) for k, v in self.layers.arrays().items()}
        if any(spec.local_rope_layers()):  # Gemma 3: both tables, each layer picks its own (in the loop)
            local = L.rope_cos_sin(dataclasses.replace(spec, rope_theta=spec.rope_local_theta, rope_type="default"),
                                   positions, dtype)
            rope = (jnp.stack([rope[0], local[0]]), jnp.stack([rope[1], local[1]]))
            params[ROPE_KEY] = jnp.asarray(spec.local_rope_layers(), jnp.int32)
        window = None  # one static window for every layer (a kernel's local window when nothing else masks)
        if spec.has_windows:
            if not spec.windows_vary and mask is None and segments is None and cache is None:
                window = spec.windows()[0]
            else:  # the window becomes part of the mask, per layer when layers differ
                distance = _distances(positions, h.shape[1], cache, write_index)
                mask = _base_mask(mask, segments, h.shape[1], cache)
                if spec.windows_vary:
                    params[WINDOW_KEY] = jnp.asarray([_GLOBAL if w is None else w for w in spec.windows()], jnp.int32)
                    mask = (mask, distance)
                else:
                    mask = mask & (distance < spec.windows()[0])[:, None]
        params.update(lora_lib.layer_inputs(self, dtype, dropout_key))  # adapters ride with their layer
        own_rng = self._own_dropout_key(dropout_key) if cache is None else None
        if own_rng is not None:
            params[DROPOUT_KEY] = jax.random.split(jax.random.fold_in(own_rng, 2), spec.num_layers)
        lora = lora_lib.lora_setup(self)
        # The stream: h, or (h, the last MLP output not yet added) where the adds run in the fused norm kernel.
        deferred = fuses_norms(spec, self.norm_implementation, dropout=own_rng is not None, batch=h.shape[0])
        stream = (h, jnp.zeros_like(h)) if deferred else h

        def parts(stream):
            return stream if deferred else (stream, None)

        def block(stream, p, layer_cache):
            h, pending = parts(stream)
            return _decoder_block(
                spec, h, p, rope, mask=mask, causal=causal, impl=impl, layer_cache=layer_cache, write_index=write_index,
                lora=lora, segments=segments, window=window, norm_impl=self.norm_implementation, pending=pending,
            )

        def added(stream):
            h, pending = parts(stream)
            return h if pending is None else h + pending

        if self.remat and cache is None:
            block = jax.checkpoint(block, policy=REMAT_POLICIES[self.remat_policy], static_argnums=())

        if cache is None and not self.scan_layers:
            # Unrolled: longer compiles, but XLA can overlap each layer's gradient
            # all-reduce with the rest of the backward pass. The stacks are split into
            # layers in one op: the transpose of a split is one concatenate, where per-layer
            # slices would each transpose to a full-size pad and their sum to a chain of adds.
            # The block is a jitted function of explicit arrays, so it is traced, linearized and
            # transposed once and called per layer (XLA inlines the calls): tracing no longer
            # grows with depth, which a call meeting several new shapes (packing) pays per shape.
            def train_block(stream, p, rope, mask, segments):
                p = {k: v.reshape(v.shape[1:]) for k, v in p.items()}  # [1, ...] pieces of the split, here traced once
                h, pending = parts(stream)
                return _decoder_block(
                    spec, h, p, rope, mask=mask, causal=causal, impl=impl, layer_cache=None, write_index=None,
                    lora=lora, segments=segments, window=window, norm_impl=self.norm_implementation, pending=pending,
                )[0]

            if self.remat:
                train_block = jax.checkpoint(train_block, policy=REMAT_POLICIES[self.remat_policy])
            layer_fn = jax.jit(train_block)
            pieces = {k: jax.lax.split(v, [1] * spec.num_layers, axis=0) for k, v in params.items()}
            for i in range(spec.num_layers):
                stream = layer_fn(stream, {k: pieces[k][i] for k in params}, rope, mask, segments)
            return added(stream), None
        if cache is None:
            stream, _ = jax.lax.scan(lambda c, p: (block(c, p, None)[0], None), stream, params)
            return added(stream), None
        # The whole cache rides in the scan carry and only the T new slots of each layer are written back, in
        # place: scanning over it as xs/ys would rebuild (copy) the full [layers, B, S, ...] cache every call,
        # which dominated CPU decode steps.
        t = h.shape[1]

        def cached_layer(carry, xs):
            stream, k_all, v_all = carry
            p, i = xs
            stream, (k_layer, v_layer) = block(stream, p, (k_all[i], v_all[i]))
            start = (i, 0, write_index, 0, 0)
            k_all = jax.lax.dynamic_update_slice(k_all, jax.lax.dynamic_slice_in_dim(k_layer, write_index, t, 1)[None], start)
            v_all = jax.lax.dynamic_update_slice(v_all, jax.lax.dynamic_slice_in_dim(v_layer, write_index, t, 1)[None], start)
            return (stream, k_all, v_all), None

        layer_ids = jnp.arange(spec.num_layers, dtype=jnp.int32)
        (stream, k, v), _ = jax.lax.scan(cached_layer, (stream, cache.k, cache.v), (params, layer_ids))
        return added(stream), KVCache(k, v)


DROPOUT_KEY = "model_dropout_key"  # per-layer keys of the config's dropout, scanned with the weights
WINDOW_KEY = "layer_window"  # per-layer attention windows (when layers differ), scanned with the weights
ROPE_KEY = "layer_rope"  # per-layer choice of RoPE table (0 global, 1 local), scanned with the weights
_GLOBAL = 2**30  # "no window" as a per-layer number


def _distances(positions, length: int, cache: Optional[KVCache], write_index) -> jax.Array:
    """Query-minus-key distance [B or 1, T, S] that the window rule compares: positions in training
    (per example when packed), cache slots when decoding (prompts are contiguous, left-padded)."""
    if cache is None:
        return positions[:, :, None] - positions[:, None, :]
    query_slots = write_index + jnp.arange(length)
    return (query_slots[:, None] - jnp.arange(cache.k.shape[2])[None, :])[None]


def _base_mask(mask, segments, length: int, cache: Optional[KVCache]) -> jax.Array:
    """The boolean [B or 1, 1, T, S] mask before any window: the given one, the packed segments', or causal."""
    if mask is not None:
        return mask
    if segments is not None:
        return segments.mask()
    if cache is not None:
        raise ValueError("decoding with a cache needs its mask (forward_with_cache builds it).")
    return jnp.tril(jnp.ones((length, length), bool))[None, None]


def _layer_mask(mask, p):
    """This layer's mask: with per-layer windows ``mask`` is (base, distance) and the layer's window is applied."""
    if isinstance(mask, tuple):
        base, distance = mask
        return base & (distance < p[WINDOW_KEY])[:, None]
    return mask


def _norm(spec: ModelSpec, x, p, name: str):
    return L.norm(spec.norm, x, p[f"{name}_scale"], p.get(f"{name}_bias"), spec.norm_eps)


def fuses_norms(spec: ModelSpec, norm_impl: str, *, dropout: bool, batch: int) -> bool:
    """Whether the residual adds and the RMSNorms after them run as the fused kernel's passes (``norm_impl`` "auto"
    or "pallas"): an RMSNorm model (Llama's, or Gemma's ``1 + w``: the kernel's ``plus_one``), no residual dropout in this
    step (``dropout``: the config's dropout is on), and a mesh whose every split axis splits the ``batch`` rows
    (one device, or data/FSDP parallelism): the kernel then runs on each device's own rows
    (:func:`_add_rms_norm`). Under tensor parallelism the Pallas call, which has no sharding rule, would have XLA
    gather its operands, so the XLA form runs there."""
    if norm_impl == "xla" or (norm_impl == "auto" and not kernel_applies(spec.hidden_size)):
        return False  # off a GPU, "auto" keeps the XLA form's program exactly (no deferred residual either)
    dropped = dropout and spec.resid_dropout > 0
    return spec.norm in ("rms", "rms_plus_one") and not dropped and _rows_split_alone(batch)


def decode_norm_implementation(norm_impl: str) -> str:
    """The norm form of the one-token decode step: "auto" takes XLA's form there, "pallas" still forces the kernel.

    Why: measured on one H100 (benchmarks/RESULTS.md, seventeenth session), the kernel's forward alone is slower than
    XLA's own add-and-norm fusion (20.6 against 18.9 µs at 4,096 × 896). Training gains from its backward (+1.6 to
    +4.4 % at 135M-1.5B); a decode step has none, and ran 4 % slower with it (0.5B, batch 512)."""
    return "xla" if norm_impl == "auto" else norm_impl


def _rows_split_alone(batch: int) -> bool:
    """No jaxsft mesh, one device, or one whose axes of more than one device all split the ``batch`` rows."""
    mesh = active_mesh()
    if mesh is None or mesh.size == 1:
        return True
    return int(np.prod([mesh.shape[a] for a in batch_split_axes(batch)])) == mesh.size


def _add_rms_norm(spec: ModelSpec, h, delta, scale, norm_impl: str):
    """The fused add + the spec's RMSNorm, on each device's own rows where a mesh splits them (see
    :func:`fuses_norms`).

    The scale enters replicated (``P()``); shard_map's transpose sums its per-device gradients over the row axes.
    ``check_vma`` is off because a Pallas call's outputs carry no per-device marking."""
    eps, plus_one = spec.norm_eps, spec.norm == "rms_plus_one"
    axes = batch_split_axes(h.shape[0])
    if not axes:
        return add_rms_norm(h, delta, scale, eps, implementation=norm_impl, plus_one=plus_one)
    rows = P(axes)

    def local(h, delta, scale):
        return add_rms_norm(h, delta, scale, eps, implementation=norm_impl, plus_one=plus_one)

    return jax.shard_map(local, in_specs=(rows, rows, P()), out_specs=(rows, rows), axis_names=frozenset(axes),
                         check_vma=False)(h, delta, scale)


def _add_then_mlp_norm(spec: ModelSpec, h, o, p, key, norm_impl: str, fused: bool):
    """``(h + dropout(o), mlp_norm(h + dropout(o)))``: the residual stream after attention and the MLP's input.

    Why a function: where the layer loop chose to fuse (``fused``: :func:`fuses_norms`, decided once by the caller
    of the blocks), both run as one fused pass each way (:func:`jaxsft.kernels.add_rms_norm.add_rms_norm`, which
    decides "auto" by backend). Everything else is the XLA form, which the kernel equals.
    """
    if fused:
        return _add_rms_norm(spec, h, o, p["mlp_norm_scale"], norm_impl)
    h = h + L.dropout(o, spec.resid_dropout, None if key is None else jax.random.fold_in(key, 1))
    return h, _norm(spec, h, p, "mlp_norm")


JOINED_QKV, JOINED_QKV_BIAS, JOINED_GATE_UP = "joined_qkv_proj", "joined_qkv_bias", "joined_gate_up_proj"  # decode only


def projections_joinable() -> bool:
    """Whether :func:`join_projections` may run here: no ``tensor`` axis splits heads or the MLP (joined
    columns would mix the shards of different projections), i.e. no jaxsft mesh or one without tensor
    parallelism."""
    mesh = active_mesh()
    return mesh is None or mesh.shape["tensor"] == 1


def join_projections(spec: ModelSpec, params: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Stacked layer weights with q/k/v joined into one ``[L, H, (N + 2K) * D]`` matrix and gate/up into one
    ``[L, H, 2F]``: a decode step then runs one matmul per input instead of three and two.

    Why: XLA merges dots that share an operand on its own, but inside the decode loop it joins the weights
    anew on every step (one H100 profile, Qwen2.5-0.5B at batch 512: 0.40 ms of a 3.47 ms step, 24 copies
    of 17 MB each). Joined here, outside the loop, it happens once per call: the step fell to 2.97 ms, and
    with the right-aligned prefill the decode ran 21 % faster (another H100, benchmarks/RESULTS.md, tenth session).

    Memory: parameters kept in another dtype (fp32 masters under bf16 compute) are cast here anyway, and the
    cast writes the joined copy instead of separate ones. Parameters already in the compute dtype (a bf16
    base under LoRA) get a second copy of these weights while the decode program runs: about 0.7 of the
    layer weights (about 9 GB at a Llama-7B shape in bf16, by a count of its weights).
    """
    gated = spec.mlp == "gated"
    joined = ("q_proj", "k_proj", "v_proj") + (("gate_proj", "up_proj") if gated else ())
    out = {k: v for k, v in params.items() if k not in joined}
    out[JOINED_QKV] = jnp.concatenate([params[name].reshape(*params[name].shape[:2], -1) for name in joined[:3]], axis=-1)
    if spec.qkv_bias:  # the biases in the same column order, so a kernel can add them to the joined output
        out[JOINED_QKV_BIAS] = jnp.concatenate([params[f"{name[0]}_bias"].reshape(params[name].shape[0], -1)
                                                for name in joined[:3]], axis=-1)
    if gated:
        out[JOINED_GATE_UP] = jnp.concatenate([params["gate_proj"], params["up_proj"]], axis=-1)
    return out


def _hands_over_projection(spec: ModelSpec, p: dict, lora) -> bool:
    """Whether a decode layer gives its attention the joined projection untouched (:class:`~jaxsft.models.layers.
    JoinedQKV`): the weights were joined, and nothing but the bias and RoPE stands between the matmul and the
    attention (no q/k norm, no LoRA term on q, k or v)."""
    adapted = lora is not None and any(lora.site_of(name) is not None for name in ("q_proj", "k_proj", "v_proj"))
    return JOINED_QKV in p and not spec.qk_norm and not adapted


def _projected_qkv(spec: ModelSpec, x, p, rope, lora):
    """(q, k, v) of the normalised input ``x``: projections, LoRA terms, biases, q/k norms and RoPE (``rope`` the
    layer's own (cos, sin) or None)."""
    if JOINED_QKV in p:  # decode with q/k norms or adapters: one matmul against the weights joined outside the loop
        q, k, v = L.JoinedQKV(x @ p[JOINED_QKV], None, None, spec.num_heads, spec.num_kv_heads, spec.head_dim).split()
    else:
        q = jnp.einsum("bth,hnd->btnd", x, p["q_proj"])
        k = jnp.einsum("bth,hnd->btnd", x, p["k_proj"])
        v = jnp.einsum("bth,hnd->btnd", x, p["v_proj"])
    q = lora_lib.adapted(q, x, p, "q_proj", lora)
    k = lora_lib.adapted(k, x, p, "k_proj", lora)
    v = lora_lib.adapted(v, x, p, "v_proj", lora)
    if spec.qkv_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    q = constrain(q, ("batch", None, "q_heads", None))
    k = constrain(k, ("batch", None, "kv_heads", None))
    v = constrain(v, ("batch", None, "kv_heads", None))
    if spec.qk_norm:
        q = L.norm(spec.norm, q, p["q_norm_scale"], None, spec.norm_eps)
        k = L.norm(spec.norm, k, p["k_norm_scale"], None, spec.norm_eps)
    if rope is not None:
        q, k = L.apply_rope(q, *rope), L.apply_rope(k, *rope)
    return q, k, v


def _decoder_block(spec: ModelSpec, h, p, rope, *, mask, causal, impl, layer_cache, write_index, lora=None, segments=None,
                   window=None, cached_attention=None, norm_impl: str = "xla", pending=None):
    """One pre-norm transformer block (with Gemma's post-norms when the spec has them); returns (h, (k_cache, v_cache) or None).

    ``lora`` (a static LoraSetup) adds each adapted projection's ``x @ A @ B`` term (lora.adapted). ``window``:
    one static attention window (kernel path, no mask); per-layer windows arrive in ``mask`` and ``p``.
    ``cached_attention(qkv, layer_cache, window=, scale=, softcap=) -> (attn, new_layer_cache)`` (decode steps)
    replaces the attention; ``qkv`` is (q, k, v), biased and rotated, or, where :func:`_hands_over_projection`,
    the :class:`~jaxsft.models.layers.JoinedQKV` still to split, bias and rotate. ``norm_impl``: the fused kernel's
    implementation, where ``pending`` is given.

    ``pending`` (where the caller's :func:`fuses_norms` held): the previous layer's MLP output, not yet added to
    ``h``. The block then runs both of its residual adds with the norm after each as the fused kernel (this one
    into the attention norm, the attention output's into the MLP norm), and returns ``((h, down), kv)`` with its own
    MLP output left pending in turn (zeros for the first layer; the caller adds the last one). Without it, the
    XLA form.
    """
    h = constrain(h, ("batch", None, None))
    mask = _layer_mask(mask, p)
    if pending is None:
        x = _norm(spec, h, p, "attn_norm")
    else:
        h, x = _add_rms_norm(spec, h, pending, p["attn_norm_scale"], norm_impl)
    if rope is not None and ROPE_KEY in p:  # [2, B, T, D] tables: this layer's own
        rope = (rope[0][p[ROPE_KEY]], rope[1][p[ROPE_KEY]])
    if cached_attention is not None and _hands_over_projection(spec, p, lora):
        # decode: the joined projection as it is; the cache's attention splits, biases and rotates it (in its kernel)
        qkv = L.JoinedQKV(x @ p[JOINED_QKV], p.get(JOINED_QKV_BIAS), rope, spec.num_heads, spec.num_kv_heads,
                          spec.head_dim)
    else:
        qkv = _projected_qkv(spec, x, p, rope, lora)
    new_kv = None
    key = p.get(DROPOUT_KEY)  # training with the config's dropout only
    if cached_attention is not None:  # generation's decode step: the cache layout and its attention are the caller's
        attn, new_kv = cached_attention(qkv, layer_cache, window=window, scale=spec.attention_scale,
                                        softcap=spec.attn_logit_softcap)
    else:
        q, k, v = qkv
        if layer_cache is not None:
            k_cache, v_cache = layer_cache
            k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), write_index, axis=1)
            v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), write_index, axis=1)
            new_kv = (k_cache, v_cache)
            k, v = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
        if key is not None and spec.attention_dropout > 0:  # no fused kernel drops probabilities: the XLA path
            full = mask if segments is None or mask is not None else segments.mask()
            attn = L.attention_with_dropout(q, k, v, mask=full, causal=causal, sliding_window=window,
                                            rate=spec.attention_dropout, key=jax.random.fold_in(key, 0),
                                            scale=spec.attention_scale, softcap=spec.attn_logit_softcap)
        elif segments is not None:
            attn = L.packed_attention(q, k, v, segments, mask=mask, sliding_window=window, implementation=impl,
                                      scale=spec.attention_scale, softcap=spec.attn_logit_softcap)
        else:
            attn = L.attention(q, k, v, mask=mask, causal=causal, sliding_window=window, implementation=impl,
                               scale=spec.attention_scale, softcap=spec.attn_logit_softcap)
    o = lora_lib.adapted(jnp.einsum("btnd,ndh->bth", attn, p["o_proj"]), attn, p, "o_proj", lora)
    if spec.o_bias:
        o = o + p["o_bias"]
    if spec.sandwich_norms:
        o = _norm(spec, o, p, "post_attn_norm")
    h, x = _add_then_mlp_norm(spec, h, o, p, key, norm_impl, fused=pending is not None)
    if JOINED_GATE_UP in p:
        gate, up = jnp.split(x @ p[JOINED_GATE_UP], 2, axis=-1)
    else:
        up, gate = x @ p["up_proj"], (x @ p["gate_proj"] if spec.mlp == "gated" else None)
    up = lora_lib.adapted(up, x, p, "up_proj", lora)
    if spec.mlp_bias:
        up = up + p["up_bias"]
    if spec.mlp == "gated":
        gate = lora_lib.adapted(gate, x, p, "gate_proj", lora)
        if spec.mlp_bias:
            gate = gate + p["gate_bias"]
        inner = L.activation(spec.activation, gate) * up
    else:
        inner = L.activation(spec.activation, up)
    inner = constrain(inner, ("batch", None, "mlp"))
    down = lora_lib.adapted(inner @ p["down_proj"], inner, p, "down_proj", lora)
    if spec.mlp_bias:
        down = down + p["down_bias"]
    if spec.sandwich_norms:
        down = _norm(spec, down, p, "post_mlp_norm")
    if pending is not None:  # fuses_norms held: no residual dropout here
        return (h, down), new_kv
    return h + L.dropout(down, spec.resid_dropout, None if key is None else jax.random.fold_in(key, 2)), new_kv
