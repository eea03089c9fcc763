"""Decode attention over the engine's shared-prefix cache as two flash-decoding kernels (Pallas Triton).

Why: on an H100 the XLA form (``jaxsft.generation.kv_cache.shared_prefix_attention``) spends about half
of a Qwen2.5-0.5B decode step in its four attention products: batched matmuls with as few as seven query
rows per KV head, which the GEMM emitters tile poorly, and which read every slot of each continuation
buffer, filled or not. Here a decode token's attention is two passes of jax's Pallas decode kernel
(``jax.experimental.pallas.ops.gpu.decode_attention.mqa``), each one program per (row, KV head) looping
over blocks of slots:

* the prompt pass runs per *group*: the queries of all ``n`` samples of a prompt (``n * h`` rows) read
  the prompt's K/V once, from its first real (left-padded) slot;
* the continuation pass runs per sample and stops at the row's filled length, so it reads only the
  slots written so far;

and the two partial softmaxes are merged by their maxima and sums (the log-sum-exp rule), which gives
the one softmax over prompt + continuation that the XLA form computes.

Where it applies: GPU, layers without a sliding window or score soft cap, power-of-two head sizes of
at least 16 (Triton blocks); everything else, CPU and TPU included, takes the XLA form, the reference
the tests compare this with (Pallas interpret mode on CPU, compiled in the GPU tier).
``JAXSFT_DECODE_ATTENTION=xla|pallas|auto`` overrides the choice for measurements (default ``auto``).
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "pallas", "xla")
ENV = "JAXSFT_DECODE_ATTENTION"
_MAX_QUERY_BLOCK = 64  # query rows per program of the prompt pass (n * h above this splits over programs)


def implementation() -> str:
    """The override from ``JAXSFT_DECODE_ATTENTION`` (read when a program is traced), checked."""
    value = os.environ.get(ENV, "auto")
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"{ENV}={value!r}: must be one of {IMPLEMENTATIONS}; unset it for the default ('auto').")
    return value


def kernel_applies(head_dim: int, sliding_window: Optional[int], softcap: Optional[float],
                   backend: Optional[str] = None, choice: Optional[str] = None) -> bool:
    """Whether a decode layer takes the kernels: ``auto`` on a GPU (``pallas`` anywhere, in interpret mode
    off GPU), a layer without window or soft cap, a power-of-two head size >= 16."""
    choice = choice or implementation()
    fits = sliding_window is None and softcap is None and head_dim >= 16 and head_dim & (head_dim - 1) == 0
    if choice == "xla" or not fits:
        return False
    return choice == "pallas" or (backend or jax.default_backend()) == "gpu"


def _pow2_at_least(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def _partial(q, k, v, start, length, block_h: int, interpret: bool):
    """One flash-decoding pass: unnormalised output [R, H, D] (float32) and its row max / sum [R, H]."""
    from jax.experimental.pallas.ops.gpu import decode_attention as pallas_decode  # GPU ops: imported on use

    slots = k.shape[1]
    out, (total, top) = pallas_decode.mqa(
        q, k, v, start_idx=start, kv_seq_len=length, sm_scale=1.0, block_h=block_h,
        block_k=min(64, slots), k_splits=1, return_residuals=True, normalize_output=False, interpret=interpret)
    return out.astype(jnp.float32), top, total


def shared_prefix_attention(q: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array, prefix_start: jax.Array,
                            suffix_k: jax.Array, suffix_v: jax.Array, suffix_len: jax.Array,
                            scale, interpret: Optional[bool] = None) -> jax.Array:
    """Attention of one decode token per row over its group's prompt plus its own continuation.

    ``q`` [B, 1, N, D] (B = groups * n, query head j reads KV head j // (N / K)); ``prefix_k/v``
    [G, K, Lp, D], real slots from ``prefix_start`` [G] on; ``suffix_k/v`` [B, K, Ls, D], the first
    ``suffix_len`` [B] slots filled (this token's included); ``scale`` the query scale (a number or a
    traced scalar: the layer loop carries it), applied to ``q`` before the kernels, which take a static
    scale of 1. Returns [B, 1, N, D] in ``q``'s dtype.
    """
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    b, _, n_heads, d = q.shape
    g, kv, lp, _ = prefix_k.shape
    ls = suffix_k.shape[2]
    n, h = b // g, n_heads // kv
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    # The prompt pass: the n * h queries of a (group, KV head) against that head's prompt slots.
    q_groups = q.reshape(g, n, kv, h, d).transpose(0, 2, 1, 3, 4).reshape(g * kv, n * h, d)
    o_pre, m_pre, l_pre = _partial(
        q_groups, prefix_k.reshape(g * kv, lp, d), prefix_v.reshape(g * kv, lp, d),
        jnp.repeat(prefix_start.astype(jnp.int32), kv), None,
        min(_MAX_QUERY_BLOCK, _pow2_at_least(n * h, 16)), interpret)
    o_pre = o_pre.reshape(g, kv, n, h, d).transpose(0, 2, 1, 3, 4).reshape(b, kv, h, d)
    m_pre = m_pre.reshape(g, kv, n, h).transpose(0, 2, 1, 3).reshape(b, kv, h)
    l_pre = l_pre.reshape(g, kv, n, h).transpose(0, 2, 1, 3).reshape(b, kv, h)
    # The continuation pass: a row's h queries per KV head against its own filled slots.
    o_suf, m_suf, l_suf = _partial(
        q.reshape(b * kv, h, d), suffix_k.reshape(b * kv, ls, d), suffix_v.reshape(b * kv, ls, d), None,
        jnp.repeat(jnp.clip(suffix_len, 1, ls).astype(jnp.int32), kv), _pow2_at_least(h, 16), interpret)
    o_suf, m_suf, l_suf = o_suf.reshape(b, kv, h, d), m_suf.reshape(b, kv, h), l_suf.reshape(b, kv, h)
    # One softmax over both: rescale each part to the larger maximum (an empty prompt part has sum 0).
    top = jnp.maximum(m_pre, m_suf)
    w_pre, w_suf = jnp.exp(m_pre - top), jnp.exp(m_suf - top)
    out = (o_pre * w_pre[..., None] + o_suf * w_suf[..., None]) / (l_pre * w_pre + l_suf * w_suf)[..., None]
    return out.reshape(b, 1, n_heads, d).astype(q.dtype)
