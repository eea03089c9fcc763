"""Masked, shifted causal-LM cross entropy fused with the lm_head matmul.

Returns the *sum* of token losses and the number of target tokens, because the
trainer divides by the token count of a whole update (all its micro-batches),
not of one micro-batch.

The gradient with respect to hidden states and unembedding is computed in the
forward pass itself (a ``custom_vjp``): the loss is the last operation, so its
cotangent is a scalar and the backward pass only scales the saved gradients; it
neither stores logits nor recomputes the lm_head matmul. ``chunk_size`` bounds
memory: tokens are processed in chunks of that many under ``lax.scan``, so the
[tokens, vocab] logits of more than one chunk never exist at once. Without
it the whole micro-batch is one chunk.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from jaxsft.infra.config import IGNORE_INDEX
from jaxsft.models.layers import soft_cap, soft_cap_slope
from jaxsft.infra.sharding import batch_split_axes, constrain


def _shifted_targets(labels: jax.Array, fill: Any = IGNORE_INDEX) -> jax.Array:
    """targets[:, t] = labels[:, t+1]; the last position of each row predicts nothing (``fill``).

    Padding the labels (instead of slicing hidden states) keeps every array at
    length L, so a sequence-sharded layout is not disturbed.
    """
    tail = jnp.full((labels.shape[0], 1), fill, labels.dtype)
    return jnp.concatenate([labels[:, 1:], tail], axis=1)


def _logits(h: jax.Array, w: jax.Array, compute_dtype: Any) -> jax.Array:
    """[..., H] x [V, H] -> [..., V] in ``compute_dtype`` (fp32 accumulation), inputs cast to it.

    Under bf16 mixed precision the logits come out rounded to bf16, as torch autocast's lm_head
    writes them before transformers' loss upcasts them (what TRL trains on); the softmax below
    runs in fp32. Half the bytes of fp32 logits, on the largest tensor of the step.
    """
    return jnp.einsum(
        "...h,vh->...v", h.astype(compute_dtype), w.astype(compute_dtype), preferred_element_type=compute_dtype
    )


def _token_losses(
    logits: jax.Array, targets: jax.Array, token_weights: Optional[jax.Array] = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token loss (0 where ignored), log-sum-exp and each token's weight, all fp32 (logits upcast first)."""
    logits = logits.astype(jnp.float32)
    weight = (targets != IGNORE_INDEX).astype(jnp.float32)
    if token_weights is not None:
        weight = weight * token_weights
    safe = jnp.where(targets != IGNORE_INDEX, targets, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return (lse - picked) * weight, lse, weight


# --- chunked path -----------------------------------------------------------


def _to_chunks(h: jax.Array, t: jax.Array, chunk: int, tw: Optional[jax.Array] = None):
    """[S, N, H] -> [n, S, c, H]: each of the S batch shards is cut into chunks of c tokens.

    S is the number of ways the batch is split over devices; keeping it as an
    explicit axis lets every device walk its own tokens and accumulate its own
    partial unembedding gradient, so devices communicate once per call instead of
    once per chunk.
    """
    shards, n_tok, width = h.shape
    pad = (-n_tok) % chunk
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    t = jnp.pad(t, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    n_chunks = (n_tok + pad) // chunk
    h_c = h.reshape(shards, n_chunks, chunk, width).swapaxes(0, 1)
    t_c = t.reshape(shards, n_chunks, chunk).swapaxes(0, 1)
    if tw is None:
        return h_c, t_c, None
    tw = jnp.pad(tw, ((0, 0), (0, pad)))
    return h_c, t_c, tw.reshape(shards, n_chunks, chunk).swapaxes(0, 1)


def _from_chunks(d_c: jax.Array, n_tok: int) -> jax.Array:
    """Inverse of :func:`_to_chunks` for a per-token array, dropping the padding."""
    n_chunks, shards, chunk, width = d_c.shape
    return d_c.swapaxes(0, 1).reshape(shards, n_chunks * chunk, width)[:, :n_tok]


def _scan_or_call(body, init, xs):
    """``lax.scan`` over the leading axis, or one direct call when there is a single chunk.

    A one-trip loop still costs its carry copies and blocks fusion across its boundary; the
    common case (a whole micro-batch in one chunk) should compile to straight-line code.
    """
    if jax.tree.leaves(xs)[0].shape[0] == 1:
        carry, y = body(init, jax.tree.map(lambda x: x[0], xs))
        return carry, jax.tree.map(lambda x: x[None], y)
    return jax.lax.scan(body, init, xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_loss(
    h: jax.Array, w: jax.Array, t: jax.Array, tw, chunk: int, compute_dtype: Any, softcap: Optional[float]
) -> jax.Array:
    """Loss only (used when nobody differentiates, e.g. evaluation). h: [S, N, H], t: [S, N], tw: [S, N] or None."""
    h_c, t_c, tw_c = _to_chunks(h, t, chunk, tw)
    w_c = w.astype(compute_dtype)

    def body(total, xs):
        h_i, t_i, tw_i = xs
        losses, _, _ = _token_losses(soft_cap(_logits(h_i, w_c, compute_dtype), softcap), t_i, tw_i)
        return total + jnp.sum(losses), None

    total, _ = _scan_or_call(body, _varying_like(jnp.zeros((), jnp.float32), h, w), (h_c, t_c, tw_c))
    return total


def _chunked_fwd(h, w, t, tw, chunk, compute_dtype, softcap):
    """Loss plus d(loss)/d(hidden) and d(loss)/d(unembedding), chunk by chunk.

    The logits' cotangent is formed in ``compute_dtype`` (bf16 under mixed precision), so both
    gradient matmuls run at the low-precision matmul rate with fp32 accumulation, as the
    forward one does. With a final-logit ``softcap`` the logits' cotangent goes through the cap's
    slope (``layers.soft_cap_slope``) before the matmuls.
    """
    h_c, t_c, tw_c = _to_chunks(h, t, chunk, tw)
    w_c = w.astype(compute_dtype)
    shards, vocab = h.shape[0], w.shape[0]

    def body(carry, xs):
        total, d_w = carry
        h_i, t_i, tw_i = xs  # [S, c, H], [S, c], [S, c] or None
        raw = _logits(h_i, w_c, compute_dtype)
        logits = soft_cap(raw, softcap)
        losses, lse, weight = _token_losses(logits, t_i, tw_i)
        probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
        one_hot = jax.nn.one_hot(jnp.where(t_i != IGNORE_INDEX, t_i, 0), vocab, dtype=jnp.float32)
        d_logits = (probs - one_hot) * weight[..., None]
        if softcap is not None:
            d_logits = d_logits * soft_cap_slope(raw, softcap)
        d_logits = d_logits.astype(compute_dtype)
        d_h = jnp.einsum("scv,vh->sch", d_logits, w_c, preferred_element_type=jnp.float32)
        # Per-shard partial sums: no cross-device reduction inside the loop.
        d_w_i = jnp.einsum("scv,sch->svh", d_logits, h_i.astype(compute_dtype), preferred_element_type=jnp.float32)
        d_w = d_w_i if d_w is None else d_w + d_w_i
        return (total + jnp.sum(losses), d_w), d_h.astype(h.dtype)

    total0 = _varying_like(jnp.zeros((), jnp.float32), h, w)
    if h_c.shape[0] == 1:
        # One chunk: the gradient is written once, with no zero-initialised accumulator to re-read.
        (total, d_w), d_h_c = _scan_or_call(body, (total0, None), (h_c, t_c, tw_c))
    else:
        # Each shard's partial sum stays on the devices holding that shard (no reduction inside the loop).
        d_w0 = constrain(jnp.zeros((shards, *w.shape), jnp.float32), ("batch", "vocab", None))
        (total, d_w), d_h_c = jax.lax.scan(body, (total0, _varying_like(d_w0, h, w)), (h_c, t_c, tw_c))
    d_h = _from_chunks(d_h_c, h.shape[1])
    return total, (d_h, jnp.sum(d_w, axis=0).astype(w.dtype))


def _chunked_bwd(chunk, compute_dtype, softcap, residuals, g):
    del chunk, compute_dtype, softcap
    d_h, d_w = residuals
    scale = lambda d: (g * d.astype(jnp.float32)).astype(d.dtype)  # noqa: E731
    return scale(d_h), scale(d_w), None, None  # labels and token weights carry no gradient


_chunked_loss.defvjp(_chunked_fwd, _chunked_bwd)


def causal_lm_loss(
    hidden: jax.Array,
    unembedding: jax.Array,
    labels: jax.Array,
    *,
    chunk_size: Optional[int] = None,
    compute_dtype: Any = jnp.float32,
    num_shards: int = 1,
    shift: bool = True,
    softcap: Optional[float] = None,
    weights: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token cross entropies and the number of target tokens (both fp32 scalars).

    ``weights`` (float [B, L], aligned with ``labels``): each target counts that many times, in the sum
    and in the count (the count is then the weighted one, the normaliser of a weighted loss).

    hidden: [B, L, H] final hidden states; unembedding: [V, H]; labels: [B, L]
    aligned with the inputs, -100 = ignored. Position t is scored against
    ``labels[:, t+1]``. ``num_tokens`` carries no gradient. Under a jaxsft mesh whose
    data/FSDP axes split the rows, each device scores its own rows inside shard_map.
    Without one, ``num_shards`` (it must divide B) makes the chunked path keep one
    partial unembedding gradient per row block. ``shift=False`` scores position t against
    ``labels[:, t]`` (encoder-decoders, whose decoder inputs are the labels shifted right).
    ``softcap``: the model's final-logit soft cap (``LMHead.softcap``; Gemma 2), applied to the
    logits before the softmax and through its slope in the gradient.
    """
    if hidden.ndim != 3 or labels.shape != hidden.shape[:2] or unembedding.ndim != 2:
        raise ValueError(
            f"causal_lm_loss expects hidden [B, L, H], unembedding [V, H], labels [B, L]; got "
            f"{hidden.shape}, {unembedding.shape}, {labels.shape}."
        )
    if unembedding.shape[1] != hidden.shape[2]:
        raise ValueError(f"hidden size {hidden.shape[2]} != unembedding width {unembedding.shape[1]}.")
    compute_dtype = jnp.dtype(compute_dtype)
    targets = _shifted_targets(labels.astype(jnp.int32)) if shift else labels.astype(jnp.int32)
    mask = (targets != IGNORE_INDEX).astype(jnp.float32)
    if weights is not None:
        if weights.shape != labels.shape:
            raise ValueError(f"weights {weights.shape} must have the labels' shape {labels.shape}.")
        weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
        weights = _shifted_targets(weights, 0.0) if shift else weights
        mask = mask * weights
    num_tokens = jax.lax.stop_gradient(jnp.sum(mask))
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be None or a positive integer.")
    if hidden.shape[0] % num_shards:
        raise ValueError(f"num_shards={num_shards} must divide the batch size {hidden.shape[0]}.")
    axes = batch_split_axes(hidden.shape[0])
    if axes:
        return _per_device_then_sum(
            hidden, unembedding, targets, weights, chunk_size, compute_dtype, axes, softcap
        ), num_tokens
    return _loss_sum(hidden, unembedding, targets, weights, chunk_size, compute_dtype, num_shards, softcap), num_tokens


def _loss_sum(hidden, unembedding, targets, weights, chunk_size, compute_dtype, num_shards, softcap=None):
    batch, length, width = hidden.shape
    per_shard = batch // num_shards * length
    chunk = per_shard if chunk_size is None else min(int(chunk_size), per_shard)
    return _chunked_loss(
        hidden.reshape(num_shards, per_shard, width),
        unembedding,
        targets.reshape(num_shards, per_shard),
        None if weights is None else weights.reshape(num_shards, per_shard),
        chunk,
        compute_dtype,
        None if softcap is None else float(softcap),
    )


def _per_device_then_sum(hidden, unembedding, targets, weights, chunk_size, compute_dtype, axes, softcap=None):
    """Each device scores its own rows; the unembedding gradient crosses devices exactly once.

    The table enters shard_map as a per-device ("varying") value, so the transpose of that marking
    is one explicit all-reduce of the summed fp32 partials ([V, H], 0.54 GB at Qwen2.5-0.5B),
    instead of a reduction whose place and count are left to sharding propagation.
    tests/test_scaling.py pins the total: each parameter's gradient is reduced once per update.
    """

    rows = P(axes)
    if weights is None:
        def local(h, w, t):
            return jax.lax.psum(_loss_sum(h, _as_varying(w, axes), t, None, chunk_size, compute_dtype, 1, softcap), axes)

        return jax.shard_map(local, in_specs=(rows, P(), rows), out_specs=P(), axis_names=frozenset(axes))(
            hidden, unembedding, targets
        )

    def weighted(h, w, t, tw):
        return jax.lax.psum(_loss_sum(h, _as_varying(w, axes), t, tw, chunk_size, compute_dtype, 1, softcap), axes)

    return jax.shard_map(weighted, in_specs=(rows, P(), rows, rows), out_specs=P(), axis_names=frozenset(axes))(
        hidden, unembedding, targets, weights
    )


def _varying_like(x: jax.Array, *refs: jax.Array) -> jax.Array:
    """``x`` marked per-device over the manual axes ``refs`` vary over (a scan carry must match its body)."""
    axes = set()
    for ref in refs:
        aval = jax.typeof(ref)
        manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; older releases call it ``vma``
        axes |= set(manual.varying if manual is not None else (getattr(aval, "vma", ()) or ()))
    return _as_varying(x, tuple(sorted(axes))) if axes else x


def _as_varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Mark a replicated value as per-device inside shard_map (its gradient is then summed over ``axes``)."""
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axes, to="varying")
    return jax.lax.pvary(x, axes)
