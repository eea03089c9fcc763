"""Decode attention over the engine's shared-prefix cache as Pallas Triton kernels.

Why: on an H100 the XLA form (``jaxsft.generation.kv_cache.shared_prefix_attention``) spends about half
of a Qwen2.5-0.5B decode step in its four attention products: batched matmuls with as few as seven query
rows per KV head, which the GEMM emitters tile poorly, and which read every slot of each continuation
buffer, filled or not. Two kernel forms read only what a row needs:

* ``fused`` (:func:`one_pass_attention`): one program per (row, KV head) streams the
  group's prompt from its first real (left-padded) slot, then the row's continuation up to its filled
  length, through one online softmax, and writes the normalised output once: one launch per layer;
* ``pallas`` (:func:`shared_prefix_attention`): two passes of jax's Pallas decode kernel
  (``jax.experimental.pallas.ops.gpu.decode_attention.mqa``), the prompt pass per *group* (the ``n * h``
  queries of a prompt's samples read its K/V once), the continuation pass per sample, the two partial
  softmaxes merged by their maxima and sums (the log-sum-exp rule): two launches plus the merge's
  elementwise kernels per layer.

* ``fused_write`` (:func:`one_pass_attention_with_write`; what ``auto`` takes for a layer that hands over split
  q/k/v): the one pass that also writes this
  token's K/V into the cache (aliased buffers, one slot per row), scales and pads the query and writes an
  unpadded output, so no XLA kernel runs around it. Measured on one H100 against ``fused`` (ninth session,
  benchmarks/RESULTS.md): 0.5B at batch 512 147.8k against 142.9k new tok/s, 135M at batch 64 54.4k
  against 52.2k; the GPU tier passed with both.

* ``fused_projection`` (for a layer that hands over its joined q/k/v projection,
  :func:`projection_attention_with_write`): ``fused_write`` that also splits the projection, adds its bias and
  applies RoPE, so nothing runs between the q/k/v matmul and the attention. What ``auto`` takes on GPU for a
  layer that hands over its joined projection (see :func:`projection_applies`).

``fused_projection`` can also split each (row, KV head) over several programs (``Tiling.splits``, flash-decoding:
each program reads its share of the slots, and their partial softmaxes are merged by the log-sum-exp rule in one
small XLA reduction after), so a call of few programs (a batch of 64) has more loads in flight than a program
walking all of a row's slots alone. ``JAXSFT_DECODE_TILING=block,warps,stages,splits`` sets it for measurements;
no default uses it: on one H100 (fourteenth session, benchmarks/RESULTS.md) 4 splits decoded SmolLM2-135M at batch
64 at 51.9k against 58.5k new tok/s with one, and Qwen2.5-0.5B at 64 at 50.8k against 51.7k. Its compiled numerics
passed the GPU tier (1, 3 and 4 splits).

All give the one softmax over prompt + continuation that the XLA form computes. Where they apply: GPU,
layers without a sliding window or score soft cap, power-of-two head sizes of at least 16 (Triton
blocks); everything else, CPU and TPU included, takes the XLA form, the reference the tests compare them
with (Pallas interpret mode on CPU, compiled in the GPU tier). ``JAXSFT_DECODE_ATTENTION=auto|fused|fused_write|fused_projection|pallas|xla``
overrides the choice for measurements (default ``auto``: ``fused_projection`` on GPU where a layer hands over its
joined projection, else ``fused_write``).
"""

from __future__ import annotations

import functools
import os
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "fused", "fused_write", "fused_projection", "pallas", "xla")
ENV = "JAXSFT_DECODE_ATTENTION"
_MAX_QUERY_BLOCK = 64  # query rows per program of the prompt pass (n * h above this splits over programs)


class Tiling(NamedTuple):
    """How a one-pass kernel walks the cache: ``block`` slots per loop step, Triton's warps per program and
    software-pipelining stages; ``splits``: programs per (row, KV head), each over its own share of the slots, their
    partial softmaxes merged after (flash-decoding; 1: one program reads them all)."""

    block: int = 64
    num_warps: int = 4
    num_stages: int = 2
    splits: int = 1


TILING = Tiling()  # every one-pass kernel's settings since the seventh session; the projection kernel's for many programs
FEW_PROGRAMS_TILING = Tiling(64, 2, 3)  # calls of few programs
FEW_PROGRAMS = 512  # (rows x KV heads) at most this many take FEW_PROGRAMS_TILING
TILING_ENV = "JAXSFT_DECODE_TILING"


def implementation() -> str:
    """The override from ``JAXSFT_DECODE_ATTENTION`` (read when a program is traced), checked."""
    value = os.environ.get(ENV, "auto")
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"{ENV}={value!r}: must be one of {IMPLEMENTATIONS}; unset it for the default ('auto').")
    return value


def kernel_applies(head_dim: int, sliding_window: Optional[int], softcap: Optional[float],
                   backend: Optional[str] = None, choice: Optional[str] = None) -> bool:
    """Whether a decode layer takes a kernel: ``auto`` on a GPU (any named kernel anywhere, in interpret
    mode off GPU), a layer without window or soft cap, a power-of-two head size >= 16."""
    choice = choice or implementation()
    fits = sliding_window is None and softcap is None and head_dim >= 16 and head_dim & (head_dim - 1) == 0
    if choice == "xla" or not fits:
        return False
    return choice != "auto" or (backend or jax.default_backend()) == "gpu"


def write_token(buf: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """buf [B, K, S, D] with new [B, K, D] written at each row's slot (a batched in-place update in XLA)."""
    return jax.vmap(lambda b, x, s: jax.lax.dynamic_update_slice_in_dim(b, x[:, None], s, axis=1))(buf, new, slots)


def _with_xla_write(attend: Callable[..., jax.Array]) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array]]:
    """A kernel that reads a cache already holding this token's K/V, behind the write-and-attend interface."""

    def run(q, k, v, prefix_k, prefix_v, prefix_start, suffix_k, suffix_v, index, scale, live=None, interpret=None):
        slots = index % suffix_k.shape[2]
        sk = write_token(suffix_k, k[:, 0].astype(suffix_k.dtype), slots)
        sv = write_token(suffix_v, v[:, 0].astype(suffix_v.dtype), slots)
        out = attend(q, prefix_k, prefix_v, prefix_start, sk, sv, index + 1, scale, interpret=interpret, live=live)
        return out, sk, sv

    return run


def kernel(choice: Optional[str] = None) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array]]:
    """What a layer that :func:`kernel_applies` to runs, one interface for every form:
    ``(q, k, v, prefix_k, prefix_v, prefix_start, suffix_k, suffix_v, index, scale, live=None) -> (out, suffix_k,
    suffix_v)``: this token's K/V [B, 1, K, D] written at continuation slot ``index`` [B], then attention over the
    prompt and the filled continuation. ``fused`` and ``pallas`` write in XLA and then run
    :func:`one_pass_attention` / :func:`shared_prefix_attention`; ``fused_write`` is the one pass doing the write,
    the query scale and the head padding itself (:func:`one_pass_attention_with_write`), which ``auto`` and
    ``fused_projection`` also run for layers that hand over split q/k/v (a layer that hands over its joined
    projection runs :func:`projection_attention_with_write` where :func:`projection_applies`)."""
    choice = choice or implementation()
    if choice in ("auto", "fused_write", "fused_projection"):
        return one_pass_attention_with_write
    return _with_xla_write(shared_prefix_attention if choice == "pallas" else one_pass_attention)


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


def _merge_splits(acc: jax.Array, top: jax.Array, total: jax.Array, dtype) -> jax.Array:
    """Partial softmaxes over disjoint slots (``acc`` [..., S, h, D] unnormalised, running max and sum [..., S, h]:
    the split kernel's programs, or the two-pass form's prompt and continuation) as one normalised output
    [..., h, D]: each rescaled to the largest maximum (the log-sum-exp rule); nothing read gives zeros."""
    best = jnp.max(top, axis=-2, keepdims=True)
    weight = jnp.exp(top - best)
    denominator = jnp.sum(total * weight, axis=-2)
    out = jnp.sum(acc * weight[..., None], axis=-3) / jnp.where(denominator > 0, denominator, 1.0)[..., None]
    return out.astype(dtype)


def shared_prefix_attention(q: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array, prefix_start: jax.Array,
                            suffix_k: jax.Array, suffix_v: jax.Array, suffix_len: jax.Array,
                            scale, interpret: Optional[bool] = None, live: Optional[jax.Array] = None) -> jax.Array:
    """Attention of one decode token per row over its group's prompt plus its own continuation.

    ``q`` [B, 1, N, D] (B = groups * n, query head j reads KV head j // (N / K)); ``prefix_k/v``
    [G, K, Lp, D], real slots from ``prefix_start`` [G] on; ``suffix_k/v`` [B, K, Ls, D], the first
    ``suffix_len`` [B] slots filled (this token's included); ``scale`` the query scale (a number or a
    traced scalar: the layer loop carries it), applied to ``q`` before the kernels, which take a static
    scale of 1. ``live`` [B] (optional): rows whose output is used; this form computes every row anyway
    (jax's kernel takes no empty row), :func:`one_pass_attention` skips the others. Returns [B, 1, N, D] in
    ``q``'s dtype.
    """
    del live
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
    # One softmax over both (an empty prompt part has sum 0).
    out = _merge_splits(jnp.stack([o_pre, o_suf], axis=-3), jnp.stack([m_pre, m_suf], axis=-2),
                        jnp.stack([l_pre, l_suf], axis=-2), q.dtype)
    return out.reshape(b, 1, n_heads, d)


# ---------------------------------------------------------------------------- one pass (the default kernel)
_NEG = -1e30  # a masked score: exp(_NEG - any real maximum) is 0, and _NEG - _NEG is 0, never NaN


def _empty_softmax(rows: int, dim: int):
    """An online softmax over no slots yet: (acc, running max, running sum)."""
    return jnp.zeros((rows, dim), jnp.float32), jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32)


def _attend_slots(q, k_ref, v_ref, block: int, lo, hi, carry):
    """Inside a one-pass kernel: fold slots ``lo..hi-1`` of ``k_ref``/``v_ref`` [S, D] into the online softmax
    ``carry = (acc [R, D], running max [R], running sum [R])`` of queries ``q`` [R, D], ``block`` slots per step;
    blocks wholly outside the range are never loaded.

    ``q`` may also be a tuple of column parts ``((q_part [R, w], its columns), ...)`` covering D (a query rotated
    in halves inside the kernel): the scores are then the sum of each part's product with those key columns."""
    from jax.experimental import pallas as pl

    parts = q if isinstance(q, tuple) else ((q, slice(None)),)

    def body(i, carry):
        acc, top, total = carry
        at = i * block
        scores = None
        for part, cols in parts:
            k = k_ref[pl.ds(at, block), cols]
            product = jax.lax.dot_general(part, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            scores = product if scores is None else scores + product
        slot = at + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
        scores = jnp.where((slot >= lo) & (slot < hi), scores, _NEG)
        new_top = jnp.maximum(top, jnp.max(scores, axis=1))
        weights = jnp.exp(scores - new_top[:, None])
        rescale = jnp.exp(top - new_top)
        v = v_ref[pl.ds(at, block), :]
        acc = acc * rescale[:, None] + jax.lax.dot_general(
            weights.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return acc, new_top, total * rescale + jnp.sum(weights, axis=1)

    return jax.lax.fori_loop(lo // block, (hi + block - 1) // block, body, carry)


def _with_new_token(carry, score, v_new, live):
    """Fold this token's key (its ``score`` [R] per query, computed from registers) and value ``v_new`` [D] into the
    online softmax; a finished row (``live`` False) adds nothing."""
    acc, top, total = carry
    score = jnp.where(live, score, _NEG)
    new_top = jnp.maximum(top, score)
    weight = jnp.where(live, jnp.exp(score - new_top), 0.0)
    rescale = jnp.exp(top - new_top)
    acc = acc * rescale[:, None] + weight.astype(v_new.dtype).astype(jnp.float32)[:, None] * v_new.astype(jnp.float32)[None, :]
    return acc, new_top, total * rescale + weight


def _attend_and_write(q_parts, k_parts, v_new, live, real, start_ref, filled_ref, cache_refs, out_refs, block_p: int,
                      block_s: int) -> None:
    """The part both cache-writing kernels share: the queries (``q_parts``: (tile [R, w], its columns) covering D)
    over the group's prompt from ``start`` and the row's continuation up to ``filled``, then this token's key (same
    column parts) and value from registers, so no read waits on the write; the normalised output stored for the
    ``real`` query rows, and this token's K/V written into its slot of the aliased cache (live rows only)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    pk_ref, pv_ref, sk_ref, sv_ref = cache_refs
    o_ref, sk_out, sv_out = out_refs
    carry = _empty_softmax(q_parts[0][0].shape[0], v_new.shape[0])
    carry = _attend_slots(q_parts, pk_ref, pv_ref, block_p, start_ref[...], pk_ref.shape[0], carry)
    filled = filled_ref[...]
    carry = _attend_slots(q_parts, sk_ref, sv_ref, block_s, 0, filled, carry)
    # This token: one more key (the product in fp32, as the dot's accumulation is).
    score = functools.reduce(jnp.add, (jnp.sum(x.astype(jnp.float32) * k.astype(jnp.float32)[None, :], axis=1)
                                       for (x, _), (k, _) in zip(q_parts, k_parts)))  # one part: no extra add
    acc, _, total = _with_new_token(carry, score, v_new, live)
    out = (acc / jnp.where(total > 0, total, 1.0)[:, None]).astype(o_ref.dtype)
    pl_triton.store(o_ref.at[pl.ds(0, out.shape[0]), :], out, mask=real)

    @pl.when(live)
    def _():
        for k, cols in k_parts:
            sk_out[pl.ds(filled, 1), cols] = k[None, :]
        sv_out[pl.ds(filled, 1), :] = v_new[None, :]


def _one_pass_kernel(start_ref, length_ref, q_ref, pk_ref, pv_ref, sk_ref, sv_ref, o_ref, *, block_p: int,
                     block_s: int):
    """One (row, KV head): the row's queries [Hp, D] against its group's prompt slots ``start..Lp`` and then its
    own continuation slots ``0..length``, one online softmax over both, normalised output written once.

    A row with nothing to read (``start = Lp``, ``length = 0``: a finished row) runs no loop iteration and
    writes zeros."""
    q = q_ref[...]
    carry = _empty_softmax(*q.shape)
    carry = _attend_slots(q, pk_ref, pv_ref, block_p, start_ref[...], pk_ref.shape[0], carry)
    acc, _, total = _attend_slots(q, sk_ref, sv_ref, block_s, 0, length_ref[...], carry)
    o_ref[...] = (acc / jnp.where(total > 0, total, 1.0)[:, None]).astype(o_ref.dtype)


def one_pass_attention(q: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array, prefix_start: jax.Array,
                       suffix_k: jax.Array, suffix_v: jax.Array, suffix_len: jax.Array,
                       scale, interpret: Optional[bool] = None, live: Optional[jax.Array] = None) -> jax.Array:
    """:func:`shared_prefix_attention`'s arguments and result, as one Pallas kernel per (row, KV head).

    Why one pass: the two-pass form launches two kernels plus the merge's and jax's split-combining
    elementwise kernels per layer (a dozen launches of a few microseconds for a few megabytes), and
    writes unnormalised partial outputs to memory to read them back. Here each program streams its
    group's prompt and then its own filled continuation through one online softmax and writes the
    normalised output once. The prompt is read once per sample rather than once per group: the ``n``
    programs of a group run side by side and meet it in L2.

    ``live`` [B] (optional): rows whose output is used. The others read nothing and give zeros, so a call's
    drain tail (most rows finished, a few still running) costs the live rows' K/V, not every row's.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    b, _, n_heads, d = q.shape
    g, kv, lp, _ = prefix_k.shape
    ls = suffix_k.shape[2]
    n, h = b // g, n_heads // kv
    rows = _pow2_at_least(h, 16)  # Triton's smallest dot tile
    q = (q.astype(jnp.float32) * scale).astype(q.dtype).reshape(b, kv, h, d)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - h), (0, 0)))
    kernel = functools.partial(_one_pass_kernel, block_p=min(TILING.block, lp), block_s=min(TILING.block, ls))
    start = jnp.repeat(prefix_start.astype(jnp.int32), n)  # per row
    length = jnp.clip(suffix_len, 1, ls).astype(jnp.int32)
    if live is not None:
        start, length = jnp.where(live, start, lp), jnp.where(live, length, 0)
    out = pl.pallas_call(
        kernel,
        grid=(b, kv),
        in_specs=[
            pl.BlockSpec((None,), lambda r, k: (r,)),  # the row's first prompt slot to read (its group's first real one)
            pl.BlockSpec((None,), lambda r, k: (r,)),  # the row's filled continuation slots
            pl.BlockSpec((None, None, rows, d), lambda r, k: (r, k, 0, 0)),
            pl.BlockSpec((None, None, lp, d), lambda r, k: (r // n, k, 0, 0)),
            pl.BlockSpec((None, None, lp, d), lambda r, k: (r // n, k, 0, 0)),
            pl.BlockSpec((None, None, ls, d), lambda r, k: (r, k, 0, 0)),
            pl.BlockSpec((None, None, ls, d), lambda r, k: (r, k, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, rows, d), lambda r, k: (r, k, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kv, rows, d), q.dtype),
        compiler_params=pl_triton.CompilerParams(num_warps=TILING.num_warps, num_stages=TILING.num_stages),
        interpret=interpret,
        name="shared_prefix_decode_attention",
    )(start, length, q, prefix_k, prefix_v, suffix_k, suffix_v)
    return out[:, :, :h].reshape(b, 1, n_heads, d)


def _row_scalar_specs():
    """The block specs of the scalars the cache-writing kernels take first: the query scale, then per row its
    first prompt slot to read, its continuation slots already filled (this token's slot) and whether it is live."""
    from jax.experimental import pallas as pl

    per_row = pl.BlockSpec((None,), lambda r, k: (r,))
    return [pl.BlockSpec((1,), lambda r, k: (0,)), per_row, per_row, per_row]


def _row_scalars(scale, prefix_start: jax.Array, index: jax.Array, live: Optional[jax.Array], n: int, lp: int):
    """The operands :func:`_row_scalar_specs` describes: the query scale [1], each row's first prompt slot (its
    group's), its continuation slots already filled and whether it is live; a finished row reads no slot."""
    live = jnp.ones(index.shape, bool) if live is None else live
    start = jnp.where(live, jnp.repeat(prefix_start.astype(jnp.int32), n), lp)
    filled = jnp.where(live, index, 0).astype(jnp.int32)  # continuation slots holding earlier tokens
    return jnp.reshape(jnp.asarray(scale, jnp.float32), (1,)), start, filled, live.astype(jnp.int32)


def _written_cache_specs(n: int, lp: int, ls: int, d: int, h: int):
    """The block specs the kernels that write the cache share, for a (row, KV head) program: the inputs
    (group prompt K and V, then the row's continuation K and V) and the outputs (the row's h query heads, and the
    continuation K and V, updated in place)."""
    from jax.experimental import pallas as pl

    def row_head(r, k):
        return r, k, 0, 0

    def group_head(r, k):
        return r // n, k, 0, 0

    inputs = [pl.BlockSpec((None, None, lp, d), group_head), pl.BlockSpec((None, None, lp, d), group_head),
              pl.BlockSpec((None, None, ls, d), row_head), pl.BlockSpec((None, None, ls, d), row_head)]
    outputs = [pl.BlockSpec((None, None, h, d), row_head), pl.BlockSpec((None, None, ls, d), row_head),
               pl.BlockSpec((None, None, ls, d), row_head)]
    return inputs, outputs


def _written_cache_shapes(out_shape: tuple, out_dtype, suffix_k: jax.Array, suffix_v: jax.Array):
    return [jax.ShapeDtypeStruct(out_shape, out_dtype), jax.ShapeDtypeStruct(suffix_k.shape, suffix_k.dtype),
            jax.ShapeDtypeStruct(suffix_v.shape, suffix_v.dtype)]


# ---------------------------------------------------------------------------- one pass that also writes the token
def _one_pass_write_kernel(scale_ref, start_ref, filled_ref, live_ref, q_ref, k_ref, v_ref, pk_ref, pv_ref, sk_ref,
                           sv_ref, o_ref, sk_out, sv_out, *, heads: int, rows: int, block_p: int, block_s: int):
    """One (row, KV head), as :func:`_one_pass_kernel`, plus what XLA did around it: the query's scale and its
    padding to ``rows`` (masked loads of the ``heads`` real rows), this token's K/V written into its continuation
    slot ``filled`` (the buffers are aliased: only that slot is stored), and an unpadded output.

    The continuation is read from slot 0 to ``filled - 1`` (the cache as it was), and this token's key and value
    join the softmax from registers, so no read waits on the write. A finished row (``live`` 0) reads, writes and
    attends to nothing and gives zeros."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    real = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) < heads
    q = pl_triton.load(q_ref.at[pl.ds(0, rows), :], mask=real, other=0)
    q = (q.astype(jnp.float32) * scale_ref[0]).astype(q_ref.dtype)  # the rounding XLA's scaling had
    live = live_ref[...] > 0
    k_new, v_new = k_ref[...], v_ref[...]  # [D] each, in the cache dtype

    _attend_and_write(((q, slice(None)),), ((k_new, slice(None)),), v_new, live, real, start_ref, filled_ref,
                      (pk_ref, pv_ref, sk_ref, sv_ref), (o_ref, sk_out, sv_out), block_p, block_s)


def one_pass_attention_with_write(q: jax.Array, k: jax.Array, v: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array,
                                  prefix_start: jax.Array, suffix_k: jax.Array, suffix_v: jax.Array, index: jax.Array,
                                  scale, live: Optional[jax.Array] = None, interpret: Optional[bool] = None
                                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`kernel`'s interface as one kernel: the write of this token's K/V, the query scale, the padding of
    the query heads to a Triton tile and the slice back all happen inside the one-pass kernel.

    Why: around the attention kernel a decode layer otherwise runs XLA kernels of a few microseconds each (the
    two cache writes, the scaled and padded query, the sliced output); at small models and batches, where a step
    is a chain of such launches, they are a visible share of the step. Global layers only (``index`` < the
    continuation slots, as :func:`kernel_applies` guarantees); the cache buffers are updated in place
    (``input_output_aliases``), one slot per live row.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    b, _, n_heads, d = q.shape
    g, kv, lp, _ = prefix_k.shape
    ls = suffix_k.shape[2]
    n, h = b // g, n_heads // kv
    kernel = functools.partial(_one_pass_write_kernel, heads=h, rows=_pow2_at_least(h, 16),
                               block_p=min(TILING.block, lp), block_s=min(TILING.block, ls))
    scalars_in, (cache_in, cache_out) = _row_scalar_specs(), _written_cache_specs(n, lp, ls, d, h)
    out, sk, sv = pl.pallas_call(
        kernel,
        grid=(b, kv),
        in_specs=[
            *scalars_in,
            pl.BlockSpec((None, None, h, d), lambda r, k: (r, k, 0, 0)),  # the row's queries of this KV head, unpadded
            pl.BlockSpec((None, None, d), lambda r, k: (r, k, 0)),  # this token's key
            pl.BlockSpec((None, None, d), lambda r, k: (r, k, 0)),  # and value
            *cache_in,
        ],
        out_specs=cache_out,
        out_shape=_written_cache_shapes((b, kv, h, d), q.dtype, suffix_k, suffix_v),
        input_output_aliases={9: 1, 10: 2},
        compiler_params=pl_triton.CompilerParams(num_warps=TILING.num_warps, num_stages=TILING.num_stages),
        interpret=interpret,
        name="shared_prefix_decode_attention_write",
    )(*_row_scalars(scale, prefix_start, index, live, n, lp), q.reshape(b, kv, h, d),
      k[:, 0].astype(suffix_k.dtype), v[:, 0].astype(suffix_v.dtype), prefix_k, prefix_v, suffix_k, suffix_v)
    return out.reshape(b, 1, n_heads, d), sk, sv


# ---------------------------------------------------------------------------- one pass from the joined projection
def _projected_token(scale_ref, q_ref, k_ref, v_ref, qb_ref, kb_ref, vb_ref, cos_ref, sin_ref, *, heads: int,
                     rows: int, biased: bool, rotate: bool, dtype, cache_dtype):
    """This token's q/k/v read from the joined projection's output inside a kernel: the bias added and RoPE applied
    (rotate-half, in two column halves), rounded to the compute dtype as XLA's ops are, the query scaled. Returns
    (query parts ((tile [rows, w], its columns), ...), key parts (same columns), value [D], the real query rows)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    f32 = jnp.float32
    d = q_ref.shape[-1]
    half = d // 2
    real = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) < heads
    halves = (pl.ds(0, half), pl.ds(half, half)) if rotate else (slice(None),)

    def query(cols):  # the query heads' columns plus their bias, in the compute dtype
        x = pl_triton.load(q_ref.at[pl.ds(0, rows), cols], mask=real, other=0).astype(f32)
        if biased:
            x = x + pl_triton.load(qb_ref.at[pl.ds(0, rows), cols], mask=real, other=0).astype(f32)
        return x.astype(dtype).astype(f32)

    def vector(ref, bias_ref, cols):  # this token's key or value columns plus bias, in the compute dtype
        x = ref[cols].astype(f32)
        return (x + bias_ref[cols].astype(f32) if biased else x).astype(dtype).astype(f32)

    cos = tuple(cos_ref[cols].astype(f32) for cols in halves)
    sin = tuple(sin_ref[cols].astype(f32) for cols in halves)

    def rotated(parts, lead=lambda t: t):  # rotate-half RoPE on (first half, second half); ``lead`` shapes the tables
        if not rotate:
            return parts
        (x1, x2), (c1, c2), (s1, s2) = parts, map(lead, cos), map(lead, sin)
        return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2

    q = rotated(tuple(query(cols) for cols in halves), lead=lambda t: t[None])  # tables broadcast over the heads
    q = tuple((x.astype(dtype).astype(f32) * scale_ref[0]).astype(dtype) for x in q)  # XLA's rounding, then scale
    k_new = rotated(tuple(vector(k_ref, kb_ref, cols) for cols in halves))
    k_new = tuple(x.astype(dtype).astype(cache_dtype) for x in k_new)
    v_new = vector(v_ref, vb_ref, slice(None)).astype(cache_dtype)
    return tuple(zip(q, halves)), tuple(zip(k_new, halves)), v_new, real


def _projection_write_kernel(scale_ref, start_ref, filled_ref, live_ref, q_ref, k_ref, v_ref, qb_ref, kb_ref, vb_ref,
                             cos_ref, sin_ref, pk_ref, pv_ref, sk_ref, sv_ref, o_ref, sk_out, sv_out, *, heads: int,
                             rows: int, block_p: int, block_s: int, biased: bool, rotate: bool):
    """:func:`_one_pass_write_kernel` reading this token's q/k/v straight from the joined projection's output
    (:func:`_projected_token`), so no XLA kernel runs between the projection matmul and this one."""
    q_parts, k_parts, v_new, real = _projected_token(
        scale_ref, q_ref, k_ref, v_ref, qb_ref, kb_ref, vb_ref, cos_ref, sin_ref, heads=heads, rows=rows,
        biased=biased, rotate=rotate, dtype=o_ref.dtype, cache_dtype=sk_out.dtype)
    _attend_and_write(q_parts, k_parts, v_new, live_ref[...] > 0, real, start_ref, filled_ref,
                      (pk_ref, pv_ref, sk_ref, sv_ref), (o_ref, sk_out, sv_out), block_p, block_s)


def _projection_split_kernel(scale_ref, start_ref, filled_ref, live_ref, q_ref, k_ref, v_ref, qb_ref, kb_ref, vb_ref,
                             cos_ref, sin_ref, pk_ref, pv_ref, sk_ref, sv_ref, acc_ref, top_ref, sum_ref, sk_out, sv_out,
                             *, heads: int, rows: int, block_p: int, block_s: int, biased: bool, rotate: bool,
                             splits: int):
    """One of ``splits`` programs of a (row, KV head): the online softmax over its share of the row's slots (the
    group's prompt from ``start``, then the row's continuation up to ``filled``, cut into ``splits`` equal runs), left
    unnormalised (``acc``, running max, running sum) for :func:`_merge_splits`. The last split also folds in this
    token's key and value from registers; the first writes them into the cache (live rows only)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    split = pl.program_id(2)
    q_parts, k_parts, v_new, real = _projected_token(
        scale_ref, q_ref, k_ref, v_ref, qb_ref, kb_ref, vb_ref, cos_ref, sin_ref, heads=heads, rows=rows,
        biased=biased, rotate=rotate, dtype=q_ref.dtype, cache_dtype=sk_out.dtype)
    live = live_ref[...] > 0
    start, filled, lp = start_ref[...], filled_ref[...], pk_ref.shape[0]
    prompt = lp - start
    share = (prompt + filled + splits - 1) // splits
    lo, hi = split * share, jnp.minimum((split + 1) * share, prompt + filled)  # this split's run of the joined slots

    def run(first, last):  # an empty run loads no block (its one block would be wholly masked: a wasted load)
        return jnp.where(last > first, first, 0), jnp.where(last > first, last, 0)

    carry = _empty_softmax(rows, v_new.shape[0])
    carry = _attend_slots(q_parts, pk_ref, pv_ref, block_p, *run(start + jnp.minimum(lo, prompt),
                                                                   start + jnp.minimum(hi, prompt)), carry)
    carry = _attend_slots(q_parts, sk_ref, sv_ref, block_s, *run(jnp.clip(lo - prompt, 0, filled),
                                                                   jnp.clip(hi - prompt, 0, filled)), carry)
    score = functools.reduce(jnp.add, (jnp.sum(x.astype(jnp.float32) * k.astype(jnp.float32)[None, :], axis=1)
                                       for (x, _), (k, _) in zip(q_parts, k_parts)))
    acc, top, total = _with_new_token(carry, score, v_new, live & (split == splits - 1))
    pl_triton.store(acc_ref.at[pl.ds(0, rows), :], acc, mask=real)
    row_real = real[:, 0]
    pl_triton.store(top_ref.at[pl.ds(0, rows)], top, mask=row_real)
    pl_triton.store(sum_ref.at[pl.ds(0, rows)], total, mask=row_real)

    @pl.when(live & (split == 0))
    def _():
        for k, cols in k_parts:
            sk_out[pl.ds(filled, 1), cols] = k[None, :]
        sv_out[pl.ds(filled, 1), :] = v_new[None, :]


def tiling_for(programs: int) -> Tiling:
    """The tiling for a call of ``programs`` (rows x KV heads) kernel programs.

    Why by the program count: with few programs (a batch of 64) each one's loop over its slots is the step's
    critical path, and two warps with three pipeline stages keep more loads in flight per program; with many
    (batch 512) four warps with two stages fill the card better. Measured end to end on one H100 (eleventh
    session, benchmarks/RESULTS.md): SmolLM2-135M at batch 64 (192 programs) 61.4k against 57.1-59.9k new tok/s,
    Qwen2.5-0.5B at 64 (128) 53.5k against 52.5k; at batch 512 the other way, 135M (1,536) 179.4k against 173.3k.
    """
    return FEW_PROGRAMS_TILING if programs <= FEW_PROGRAMS else TILING


def configured_tiling(programs: int) -> Tiling:
    """:func:`tiling_for` ``programs``, or ``JAXSFT_DECODE_TILING=block,warps,stages[,splits]`` (read when a program
    is traced) for measurements, checked."""
    value = os.environ.get(TILING_ENV)
    if not value:
        return tiling_for(programs)
    parts = value.split(",")
    tiling = Tiling(*map(int, parts)) if len(parts) in (3, 4) and all(p.strip().isdigit() for p in parts) else None
    if tiling is None or min(tiling) < 1 or tiling.block & (tiling.block - 1):
        raise ValueError(f"{TILING_ENV}={value!r}: must be 'block,warps,stages[,splits]', positive integers with a "
                         "power-of-two block (e.g. '64,4,2' or '64,2,3,4'); unset it for the default.")
    return tiling


def projection_applies(head_dim: int, sliding_window: Optional[int], softcap: Optional[float],
                       backend: Optional[str] = None, choice: Optional[str] = None) -> bool:
    """Whether a layer that hands over its joined projection runs :func:`projection_attention_with_write`: where
    :func:`kernel_applies` to ``auto`` or ``fused_projection``, with a head size whose halves are Triton tiles (>= 32).

    ``auto`` takes it: measured faster than ``fused_write`` on one H100 (eleventh session, benchmarks/RESULTS.md:
    +4.0 % at Qwen2.5-0.5B batch 512, +7.0 % at SmolLM2-135M batch 64; the same at Qwen2.5-1.5B batch 512 in the
    twelfth), and its compiled numerics passed the GPU tier
    (``tests/test_gpu_tier.py::test_projection_kernel_equals_the_xla_form_compiled``, twelfth session). On CPU it is
    checked in Pallas interpret mode.
    """
    choice = choice or implementation()
    return choice in ("auto", "fused_projection") and head_dim >= 32 and kernel_applies(head_dim, sliding_window,
                                                                                      softcap, backend, choice)


def projection_attention_with_write(qkv: jax.Array, bias: Optional[jax.Array], rope: Optional[tuple[jax.Array, jax.Array]],
                                    prefix_k: jax.Array, prefix_v: jax.Array, prefix_start: jax.Array,
                                    suffix_k: jax.Array, suffix_v: jax.Array, index: jax.Array, scale, *, heads: int,
                                    live: Optional[jax.Array] = None, interpret: Optional[bool] = None,
                                    tiling: Optional[Tiling] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`one_pass_attention_with_write` taking this token's joined projection ``qkv`` [B, 1, (N + 2K) * D] (query
    heads, then key heads, then value heads, as :func:`jaxsft.models.layers.JoinedQKV` describes), its ``bias``
    [(N + 2K) * D] (or None) and the RoPE tables ``rope = (cos, sin)`` [B, 1, D] (or None): the split, the bias and
    the rotation happen inside the kernel.

    Why: between the q/k/v matmul and the attention kernel XLA otherwise runs the split, the bias and RoPE as two or
    three fusions of a couple of microseconds each per layer (one H100 profile, Qwen2.5-0.5B at batch 512: two
    "concatenate" fusions of 2.3 and 1.8 us per layer); at small models a decode step is a chain of such launches.
    Returns (out [B, 1, N, D], suffix_k, suffix_v) as the other forms do. ``tiling``: slots per loop step and the
    Triton launch settings (None: :func:`configured_tiling`; ``benchmarks/bench_decode_kernel.py`` measures them).
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    g, kv, lp, d = prefix_k.shape
    b, ls = qkv.shape[0], suffix_k.shape[2]
    n, h = b // g, heads // kv
    joined = qkv.reshape(b, heads + 2 * kv, d)
    biased, rotate = bias is not None, rope is not None
    bias = (bias if biased else jnp.zeros((heads + 2 * kv) * d, qkv.dtype)).reshape(heads + 2 * kv, d)
    cos, sin = (x.reshape(b, d) for x in rope) if rotate else (jnp.zeros((1, d), qkv.dtype),) * 2
    tiling = tiling or configured_tiling(b * kv)
    settings = dict(heads=h, rows=_pow2_at_least(h, 16), block_p=min(tiling.block, lp), block_s=min(tiling.block, ls),
                    biased=biased, rotate=rotate)
    scalars_in, (cache_in, cache_out) = _row_scalar_specs(), _written_cache_specs(n, lp, ls, d, h)
    table = (lambda r, k: (r, 0)) if rotate else (lambda r, k: (0, 0))
    in_specs = [
        *scalars_in,
        pl.BlockSpec((None, h, d), lambda r, k: (r, k, 0)),  # the query heads of this KV head (blocks of h)
        pl.BlockSpec((None, None, d), lambda r, k: (r, heads + k, 0)),  # this token's key head
        pl.BlockSpec((None, None, d), lambda r, k: (r, heads + kv + k, 0)),  # and value head
        pl.BlockSpec((h, d), lambda r, k: (k, 0)),  # their biases
        pl.BlockSpec((None, d), lambda r, k: (heads + k, 0)),
        pl.BlockSpec((None, d), lambda r, k: (heads + kv + k, 0)),
        pl.BlockSpec((None, d), table),  # the row's cos
        pl.BlockSpec((None, d), table),  # and sin
        *cache_in,
    ]
    operands = (*_row_scalars(scale, prefix_start, index, live, n, lp), joined, joined, joined, bias, bias, bias, cos,
                sin, prefix_k, prefix_v, suffix_k, suffix_v)
    params = pl_triton.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    if tiling.splits == 1:
        out, sk, sv = pl.pallas_call(
            functools.partial(_projection_write_kernel, **settings),
            grid=(b, kv),
            in_specs=in_specs,
            out_specs=cache_out,
            out_shape=_written_cache_shapes((b, kv, h, d), qkv.dtype, suffix_k, suffix_v),
            input_output_aliases={14: 1, 15: 2},
            compiler_params=params,
            interpret=interpret,
            name="shared_prefix_decode_attention_projection",
        )(*operands)
        return out.reshape(b, 1, heads, d), sk, sv
    splits = tiling.splits

    def split_grid(spec):  # a (row, KV head) block spec for the (row, KV head, split) grid
        return pl.BlockSpec(spec.block_shape, lambda r, k, _, index=spec.index_map: index(r, k))

    per_split = lambda *block: pl.BlockSpec((None, None, None, *block), lambda r, k, i: (r, k, i) + (0,) * len(block))  # noqa: E731
    f32 = jnp.float32
    acc, top, total, sk, sv = pl.pallas_call(
        functools.partial(_projection_split_kernel, **settings, splits=splits),
        grid=(b, kv, splits),
        in_specs=[split_grid(spec) for spec in in_specs],
        out_specs=[per_split(h, d), per_split(h), per_split(h), *map(split_grid, cache_out[1:])],
        out_shape=[jax.ShapeDtypeStruct((b, kv, splits, h, d), f32), jax.ShapeDtypeStruct((b, kv, splits, h), f32),
                   jax.ShapeDtypeStruct((b, kv, splits, h), f32), jax.ShapeDtypeStruct(suffix_k.shape, suffix_k.dtype),
                   jax.ShapeDtypeStruct(suffix_v.shape, suffix_v.dtype)],
        input_output_aliases={14: 3, 15: 4},
        compiler_params=params,
        interpret=interpret,
        name="shared_prefix_decode_attention_projection_split",
    )(*operands)
    return _merge_splits(acc, top, total, qkv.dtype).reshape(b, 1, heads, d), sk, sv
