"""The encoder-decoder language model (T5 v1.0, T5 v1.1 / Flan-T5, BART) in Flax NNX.

Parameters are ``nnx.Param`` with ``logical_axes`` as in ``decoder.py``; encoder
and decoder weights are each stacked on a leading ``layers`` axis and run under
``lax.scan``. The layer bodies are pure functions of arrays. Dropout is applied
only when a ``dropout_key`` is passed (training); evaluation and generation pass
none, so they are deterministic and equal the dropout-free model.

Attention here is always the XLA einsum path: T5 adds a relative-position bias
to the scores and both families may drop attention probabilities, neither of
which the cuDNN fused kernel takes.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft.models import layers as L
from jaxsft.models.embedding import embedding_lookup
from jaxsft.models.interface import LMHead
from jaxsft.models.options import REMAT_POLICIES, RunOptions
from jaxsft.models.seq2seq_spec import Seq2SeqSpec
from jaxsft.infra.sharding import constrain

_MASKED = float(np.finfo(np.float32).min)


ParamTable = dict[str, tuple[tuple[int, ...], tuple[Optional[str], ...], str]]


def _attention_params(spec: Seq2SeqSpec, prefix: str) -> ParamTable:
    h, n, d = spec.hidden_size, spec.num_heads, spec.head_dim
    out: ParamTable = {
        f"{prefix}q_proj": ((h, n, d), ("embed", "q_heads", "head_dim"), "normal"),
        f"{prefix}k_proj": ((h, n, d), ("embed", "kv_heads", "head_dim"), "normal"),
        f"{prefix}v_proj": ((h, n, d), ("embed", "kv_heads", "head_dim"), "normal"),
        f"{prefix}o_proj": ((n, d, h), ("q_heads", "head_dim", "embed"), "normal"),
    }
    if spec.bias:
        out[f"{prefix}q_bias"] = ((n, d), ("q_heads", "head_dim"), "zeros")
        out[f"{prefix}k_bias"] = ((n, d), ("kv_heads", "head_dim"), "zeros")
        out[f"{prefix}v_bias"] = ((n, d), ("kv_heads", "head_dim"), "zeros")
        out[f"{prefix}o_bias"] = ((h,), ("norm",), "zeros")
    return out


def _norm_params(spec: Seq2SeqSpec, name: str) -> ParamTable:
    h = spec.hidden_size
    out: ParamTable = {f"{name}_scale": ((h,), ("norm",), "ones")}
    if spec.norm == "layer":
        out[f"{name}_bias"] = ((h,), ("norm",), "zeros")
    return out


def layer_param_shapes(spec: Seq2SeqSpec, stack: str) -> ParamTable:
    """name -> (per-layer shape, logical axes, init) for the ``"encoder"`` or ``"decoder"`` stack.

    The one source of truth for what a layer holds; the HF weight table and the
    sharding rules are checked against it.
    """
    h, f = spec.hidden_size, spec.intermediate_size
    out: ParamTable = {}
    out.update(_norm_params(spec, "attn_norm"))
    out.update(_attention_params(spec, ""))
    if stack == "decoder":
        out.update(_norm_params(spec, "cross_norm"))
        out.update(_attention_params(spec, "cross_"))
    out.update(_norm_params(spec, "mlp_norm"))
    out["up_proj"] = ((h, f), ("embed", "mlp"), "normal")
    out["down_proj"] = ((f, h), ("mlp", "embed"), "normal")
    if spec.mlp == "gated":
        out["gate_proj"] = ((h, f), ("embed", "mlp"), "normal")
    if spec.bias:
        out["up_bias"] = ((f,), ("mlp",), "zeros")
        out["down_bias"] = ((h,), ("norm",), "zeros")
    return out


def top_level_shapes(spec: Seq2SeqSpec) -> ParamTable:
    """Parameters outside the two layer stacks."""
    h, v = spec.hidden_size, spec.vocab_size
    out: ParamTable = {"embed": ((v, h), ("vocab", "embed"), "normal")}
    if not spec.tie_word_embeddings:
        out["lm_head"] = ((v, h), ("vocab", "embed"), "normal")
    if spec.final_logits_bias:
        out["final_logits_bias"] = ((v,), ("vocab",), "zeros")
    if spec.position == "relative":
        for side in ("enc", "dec"):
            out[f"{side}_rel_bias"] = ((spec.relative_buckets, spec.num_heads), ("rel_buckets", "q_heads"), "normal")
    else:
        for side in ("enc", "dec"):
            out[f"{side}_pos_embed"] = ((spec.max_position_embeddings + 2, h), (None, "embed"), "normal")
    if spec.pre_norm:  # T5: a final norm after each stack
        out.update(_norm_params(spec, "enc_final_norm"))
        out.update(_norm_params(spec, "dec_final_norm"))
    else:  # BART: a norm right after the embeddings of each stack
        out.update(_norm_params(spec, "enc_embed_norm"))
        out.update(_norm_params(spec, "dec_embed_norm"))
    return out


def _init(kind: str, key: jax.Array, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
    if kind == "ones":
        return jnp.ones(shape, dtype)
    if kind == "zeros":
        return jnp.zeros(shape, dtype)
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class LayerStack(nnx.Module):
    """One stack's blocks, every weight stacked on a leading layers axis."""

    def __init__(self, spec: Seq2SeqSpec, stack: str, *, param_dtype, rngs: nnx.Rngs):
        count = spec.num_encoder_layers if stack == "encoder" else spec.num_decoder_layers
        for name, (shape, axes, kind) in layer_param_shapes(spec, stack).items():
            value = _init(kind, rngs.params(), (count, *shape), spec.initializer_range, param_dtype)
            setattr(self, name, nnx.Param(value, logical_axes=("layers", *axes)))

    def arrays(self) -> dict[str, jax.Array]:
        return {k: v[...] for k, v in vars(self).items() if isinstance(v, nnx.Param)}


# ---------------------------------------------------------------------------- pure pieces
def relative_buckets(query_len: int, key_len: int, *, bidirectional: bool, num_buckets: int, max_distance: int,
                     query_offset: int = 0) -> np.ndarray:
    """T5's bucket of (key position - query position), [query_len, key_len] int32, in fp32 as torch computes it."""
    context = np.arange(query_len, dtype=np.int64)[:, None] + query_offset
    memory = np.arange(key_len, dtype=np.int64)[None, :]
    rel = memory - context
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        n = np.abs(rel)
    else:
        n = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    with np.errstate(divide="ignore"):
        scaled = np.log(n.astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
        large = max_exact + np.nan_to_num(scaled * np.float32(num_buckets - max_exact), neginf=0.0).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(is_small, n, large)).astype(np.int32)


def _dropout(x: jax.Array, rate: float, key: Optional[jax.Array], site: int) -> jax.Array:
    """Inverted dropout as torch applies it in training; the identity without a key or at rate 0."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(key, site), 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def _norm(spec: Seq2SeqSpec, x: jax.Array, p: dict, name: str) -> jax.Array:
    if spec.norm == "layer":
        return L.layer_norm(x, p[f"{name}_scale"], p[f"{name}_bias"], spec.norm_eps)
    return _t5_rms_norm(x, p[f"{name}_scale"], spec.norm_eps)


def _t5_rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """T5LayerNorm: variance in fp32, no mean, no bias; result cast to the weight's dtype, then scaled."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * normed.astype(scale.dtype)


def _attend(spec: Seq2SeqSpec, q, k, v, *, bias, mask, key, site) -> jax.Array:
    """softmax(q.k [* scale] + bias, masked) [dropped] . v; q [B,T,N,D], k/v [B,S,N,D], mask [B|1,1,T,S] bool."""
    scores = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32)
    if spec.scale_attention:
        scores = scores * np.float32(spec.head_dim**-0.5)
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    scores = jnp.where(mask, scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = _dropout(probs, spec.attention_dropout, key, site)
    return jnp.einsum("bnts,bsnd->btnd", probs.astype(v.dtype), v)


def _project(x, p, name, bias: bool):
    y = jnp.einsum("bth,hnd->btnd", x, p[f"{name}_proj"])
    return y + p[f"{name}_bias"] if bias else y


def _output(attn, p, prefix: str, bias: bool):
    o = jnp.einsum("btnd,ndh->bth", attn, p[f"{prefix}o_proj"])
    return o + p[f"{prefix}o_bias"] if bias else o


def _mlp(spec: Seq2SeqSpec, x, p, key, site):
    up = x @ p["up_proj"]
    if spec.bias:
        up = up + p["up_bias"]
    if spec.mlp == "gated":
        inner = L.activation(spec.activation, x @ p["gate_proj"]) * up
    else:
        inner = L.activation(spec.activation, up)
    inner = constrain(_dropout(inner, spec.activation_dropout, key, site), ("batch", None, "mlp"))
    down = inner @ p["down_proj"]
    return down + p["down_bias"] if spec.bias else down


def _sublayer(spec: Seq2SeqSpec, h, p, norm: str, fn, key, site):
    """Pre-norm (T5): h + drop(fn(norm(h))); post-norm (BART): norm(h + drop(fn(h)))."""
    if spec.pre_norm:
        return h + _dropout(fn(_norm(spec, h, p, norm)), spec.dropout, key, site)
    return _norm(spec, h + _dropout(fn(h), spec.dropout, key, site), p, norm)


def _encoder_layer(spec: Seq2SeqSpec, h, p, *, bias, mask, key):
    h = constrain(h, ("batch", None, None))

    def self_attn(x):
        q, k, v = (_project(x, p, n, spec.bias) for n in ("q", "k", "v"))
        return _output(_attend(spec, q, k, v, bias=bias, mask=mask, key=key, site=0), p, "", spec.bias)

    h = _sublayer(spec, h, p, "attn_norm", self_attn, key, 1)
    return _sublayer(spec, h, p, "mlp_norm", lambda x: _mlp(spec, x, p, key, 2), key, 3)


def _decoder_layer(spec: Seq2SeqSpec, h, p, *, bias, mask, enc, cross_mask, key, self_attend=None, cross_attend=None):
    """One decoder block. Generation hands its cache's attention in: ``self_attend(q, k, v)`` and
    ``cross_attend(q)`` return [B, T, N, D] in place of attention over the whole sequence and ``enc``."""
    h = constrain(h, ("batch", None, None))

    def self_attn(x):
        q, k, v = (_project(x, p, n, spec.bias) for n in ("q", "k", "v"))
        if self_attend is not None:
            return _output(self_attend(q, k, v), p, "", spec.bias)
        return _output(_attend(spec, q, k, v, bias=bias, mask=mask, key=key, site=0), p, "", spec.bias)

    def cross_attn(x):
        q = _project(x, p, "cross_q", spec.bias)
        if cross_attend is not None:
            return _output(cross_attend(q), p, "cross_", spec.bias)
        k, v = (_project(enc, p, n, spec.bias) for n in ("cross_k", "cross_v"))
        return _output(_attend(spec, q, k, v, bias=None, mask=cross_mask, key=key, site=2), p, "cross_", spec.bias)

    h = _sublayer(spec, h, p, "attn_norm", self_attn, key, 1)
    h = _sublayer(spec, h, p, "cross_norm", cross_attn, key, 3)
    return _sublayer(spec, h, p, "mlp_norm", lambda x: _mlp(spec, x, p, key, 4), key, 5)


# ---------------------------------------------------------------------------- the module
class Seq2SeqLM(nnx.Module):
    """An encoder-decoder LM. ``__call__(input_ids, attention_mask, decoder_input_ids)`` returns fp32 logits [B, T, V]."""

    def __init__(
        self,
        spec: Seq2SeqSpec,
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
    ):
        RunOptions(dtype, remat, remat_policy, attention_implementation, scan_layers, dropout,
                   norm_implementation)  # validates the knobs
        self.spec = spec
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.remat = remat
        self.remat_policy = remat_policy
        self.attention_implementation = attention_implementation  # kept for API parity; attention is XLA here
        self.scan_layers = scan_layers
        self.dropout = dropout  # apply the config's dropout rates when a training step passes a dropout rng
        self.norm_implementation = norm_implementation  # kept for API parity; T5/BART norms are XLA here
        self.hf_config_json = hf_config_json
        for name, (shape, axes, kind) in top_level_shapes(spec).items():
            setattr(self, name, nnx.Param(_init(kind, rngs.params(), shape, spec.initializer_range, param_dtype),
                                          logical_axes=axes))
        self.encoder = LayerStack(spec, "encoder", param_dtype=param_dtype, rngs=rngs)
        self.decoder = LayerStack(spec, "decoder", param_dtype=param_dtype, rngs=rngs)

    # ------------------------------------------------------------------ public API
    @property
    def config(self):
        """The Hugging Face config this model was built from."""
        from transformers import AutoConfig

        if self.hf_config_json is None:
            return None
        data = json.loads(self.hf_config_json)
        return AutoConfig.for_model(data.pop("model_type"), **data)

    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None):
        if decoder_input_ids is None:
            raise ValueError("Seq2SeqLM needs decoder_input_ids (labels shifted right; see jaxsft.training.batching.shift_right).")
        hidden = self.hidden_states(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
        return self.logits(hidden)

    def unembedding(self) -> jax.Array:
        return self.embed[...] if self.spec.tie_word_embeddings else self.lm_head[...]

    def logits(self, hidden: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        """The lm head's logits in ``dtype`` (fp32 for losses; generation asks for the compute dtype, as HF's generate)."""
        w = self.unembedding().astype(self.dtype)
        bias = self.spec.final_logits_bias
        out = jnp.einsum("bth,vh->btv", hidden.astype(self.dtype), w,
                         preferred_element_type=jnp.float32 if bias else dtype)
        if bias:
            out = out + self.final_logits_bias[...].astype(jnp.float32)
        return out.astype(dtype)

    def lm_head_operands(self, hidden: jax.Array) -> LMHead:
        """(hidden', W', no soft cap) with hidden' . W'^T = the logits, for the fused loss (which takes no bias).

        BART's ``final_logits_bias`` rides as one extra column against a constant-1 feature; it is a
        buffer in transformers (never trained), so its gradient is stopped.
        """
        w = self.unembedding()
        if not self.spec.final_logits_bias:
            return LMHead(hidden, w)
        ones = jnp.ones((*hidden.shape[:-1], 1), hidden.dtype)
        bias = jax.lax.stop_gradient(self.final_logits_bias[...]).astype(w.dtype)
        return LMHead(jnp.concatenate([hidden, ones], axis=-1), jnp.concatenate([w, bias[:, None]], axis=-1))

    def hidden_states(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                      *, dropout_key: Optional[jax.Array] = None) -> jax.Array:
        """Decoder output states [B, T, H] (T5 v1.0's d_model**-0.5 rescale applied), ready for the lm_head.

        ``dropout_key`` (training steps only) turns on the config's dropout when the model was built
        with ``dropout=True`` (the trainer's view, from ``TrainConfig.dropout``).
        """
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        enc_key = dec_key = None
        if dropout_key is not None and self.dropout:
            enc_key, dec_key = jax.random.fold_in(dropout_key, 0), jax.random.fold_in(dropout_key, 1)
        enc = self.encode(input_ids, attention_mask, dropout_key=enc_key)
        return self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask, dropout_key=dec_key)

    def encode(self, input_ids, attention_mask, *, dropout_key: Optional[jax.Array] = None) -> jax.Array:
        """Encoder output states [B, S, H]; ``attention_mask`` [B, S] marks real tokens (any padding side)."""
        spec = self.spec
        input_ids = jnp.asarray(input_ids)
        b, s = input_ids.shape
        key_mask = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
        bias = None
        if spec.position == "relative":
            bias = self._position_bias("enc", s, s, bidirectional=True)
        h = self._embed(input_ids, "enc", jnp.arange(s), dropout_key)
        params = self._stack_params(self.encoder)

        def layer(h, xs):
            p, key = xs
            return _encoder_layer(spec, h, p, bias=bias, mask=key_mask, key=key), None

        h = self._scan(layer, h, params, dropout_key, spec.num_encoder_layers)
        if spec.pre_norm:
            h = _dropout(_t5_rms_norm(h, self.enc_final_norm_scale[...].astype(self.dtype), spec.norm_eps),
                         spec.dropout, dropout_key, 1 << 20)
        return constrain(h, ("batch", None, None))

    def decode(self, decoder_input_ids, enc, enc_mask, decoder_attention_mask=None, *,
               dropout_key: Optional[jax.Array] = None) -> jax.Array:
        """Decoder states for a whole target sequence (teacher forcing), causal self-attention."""
        spec = self.spec
        ids = jnp.asarray(decoder_input_ids)
        b, t = ids.shape
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        if decoder_attention_mask is not None:
            mask = mask & jnp.asarray(decoder_attention_mask).astype(bool)[:, None, None, :]
        cross_mask = jnp.asarray(enc_mask).astype(bool)[:, None, None, :]
        bias = self._position_bias("dec", t, t, bidirectional=False) if spec.position == "relative" else None
        h = self._embed(ids, "dec", jnp.arange(t), dropout_key)
        enc = enc.astype(self.dtype)
        params = self._stack_params(self.decoder)

        def layer(h, xs):
            p, key = xs
            return _decoder_layer(spec, h, p, bias=bias, mask=mask, enc=enc, cross_mask=cross_mask, key=key), None

        h = self._scan(layer, h, params, dropout_key, spec.num_decoder_layers)
        return self._decoder_output(h, dropout_key)

    # ------------------------------------------------------------------ generation
    # The cache layout and its attention belong to the generation engine (jaxsft.generation.seq2seq),
    # as the decoder-only model's do: the model hands it each layer's projections.
    def cross_kv(self, enc: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Every decoder layer's cross-attention keys and values of ``enc`` [B, S, H], once per prompt:
        [layers, B, S, heads, head_dim] each."""
        enc = enc.astype(self.dtype)

        def cross(p):
            return tuple(_project(enc, p, n, self.spec.bias) for n in ("cross_k", "cross_v"))

        return jax.lax.map(cross, self._stack_params(self.decoder))

    def decode_params(self) -> list[dict[str, jax.Array]]:
        """The decoder layers' weights in the compute dtype, one dict per layer (split once, outside a loop)."""
        params = self._stack_params(self.decoder)
        return [{k: v[i] for k, v in params.items()} for i in range(self.spec.num_decoder_layers)]

    def self_attention_bias(self, query_positions: jax.Array, key_slots: int) -> Optional[jax.Array]:
        """T5's relative-position bias [B, heads, 1, key_slots] of one query per row (at ``query_positions`` [B])
        over decoder positions ``0 .. key_slots - 1``; None for a model without one (BART)."""
        spec = self.spec
        if spec.position != "relative":
            return None
        table = jnp.asarray(relative_buckets(key_slots, key_slots, bidirectional=False,
                                             num_buckets=spec.relative_buckets, max_distance=spec.relative_max_distance))
        buckets = jnp.take(table, query_positions, axis=0)  # [B, S]
        return jnp.take(self.dec_rel_bias[...], buckets, axis=0).transpose(0, 2, 1)[:, :, None].astype(self.dtype)

    def decode_step(self, decoder_input_ids, positions, layer_caches, self_attention, cross_attention, layer_params
                    ) -> tuple[jax.Array, list[Any]]:
        """One decoder token per row [B, 1] at ``positions`` [B, 1] through every layer (unrolled over the
        per-layer caches); returns the output states and the new caches.

        ``self_attention(q, k, v, layer_caches[i]) -> (attn, new_cache)`` (the row's new K/V written and
        attended with its earlier ones) and ``cross_attention(q, layer_caches[i]) -> attn`` are the cache's."""
        h = self._embed(jnp.asarray(decoder_input_ids), "dec", positions, None)
        out = []
        for p, cache in zip(layer_params, layer_caches):
            new = [cache]

            def self_attend(q, k, v, cache=cache, new=new):
                attn, new[0] = self_attention(q, k, v, cache)
                return attn

            h = _decoder_layer(self.spec, h, p, bias=None, mask=None, enc=None, cross_mask=None, key=None,
                               self_attend=self_attend, cross_attend=lambda q, cache=cache: cross_attention(q, cache))
            out.append(new[0])
        return self._decoder_output(h, None), out

    # ------------------------------------------------------------------ internals
    def _stack_params(self, stack: LayerStack) -> dict[str, jax.Array]:
        return {k: v.astype(self.dtype) for k, v in stack.arrays().items()}

    def _scan(self, layer, h, params, dropout_key, count: int):
        keys = None if dropout_key is None else jax.random.split(dropout_key, count)
        body = layer
        if self.remat:
            body = jax.checkpoint(layer, policy=REMAT_POLICIES[self.remat_policy])
        if not self.scan_layers:
            for i in range(count):
                h = body(h, ({k: v[i] for k, v in params.items()}, None if keys is None else keys[i]))[0]
            return h
        if keys is None:
            h, _ = jax.lax.scan(lambda c, p: body(c, (p, None)), h, params)
        else:
            h, _ = jax.lax.scan(body, h, (params, keys))
        return h

    def _position_bias(self, side: str, q_len: int, k_len: int, *, bidirectional: bool) -> jax.Array:
        spec = self.spec
        buckets = relative_buckets(q_len, k_len, bidirectional=bidirectional, num_buckets=spec.relative_buckets,
                                   max_distance=spec.relative_max_distance)
        table = getattr(self, f"{side}_rel_bias")[...]
        return jnp.take(table, jnp.asarray(buckets), axis=0).transpose(2, 0, 1)[None].astype(self.dtype)

    def _embed(self, ids, side: str, positions, dropout_key) -> jax.Array:
        spec = self.spec
        h = embedding_lookup(self.embed[...], ids, ("vocab", "embed")).astype(self.dtype)
        if spec.embedding_padding_idx is not None:  # as torch's padding_idx: the pad row gets no gradient
            h = jnp.where((ids == spec.embedding_padding_idx)[..., None], jax.lax.stop_gradient(h), h)
        if spec.embed_scale != 1.0:
            h = h * jnp.asarray(spec.embed_scale, self.dtype)
        if spec.position == "learned":
            pos = jnp.broadcast_to(jnp.asarray(positions) + 2, ids.shape)  # BART's offset of 2
            h = h + embedding_lookup(getattr(self, f"{side}_pos_embed")[...], pos, (None, "embed")).astype(self.dtype)
            p = {k: getattr(self, f"{side}_embed_norm_{k}")[...] for k in ("scale", "bias")}
            h = L.layer_norm(h, p["scale"], p["bias"], spec.norm_eps)
        return constrain(_dropout(h, spec.dropout, dropout_key, 1 << 21), ("batch", None, None))

    def _decoder_output(self, h, dropout_key) -> jax.Array:
        spec = self.spec
        if spec.pre_norm:
            h = _t5_rms_norm(h, self.dec_final_norm_scale[...].astype(self.dtype), spec.norm_eps)
            h = _dropout(h, spec.dropout, dropout_key, 1 << 20)
        if spec.scale_decoder_outputs:
            h = h * jnp.asarray(spec.hidden_size**-0.5, h.dtype)
        return constrain(h, ("batch", None, None))
