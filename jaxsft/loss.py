"""Masked, shifted causal-LM cross entropy fused with the lm_head matmul.

Returns the *sum* of token losses and the number of target tokens, because the
trainer divides by the token count of a whole update (all its micro-batches),
not of one micro-batch.

With ``chunk_size`` the [tokens, vocab] fp32 logits are never materialised at
once: tokens are processed in chunks under ``lax.scan``, and the gradient with
respect to hidden states and unembedding is computed in the same pass (a
``custom_vjp``), so the backward pass neither stores logits nor recomputes the
lm_head matmul; it only scales the saved gradients by the incoming cotangent.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def _shifted_targets(labels: jax.Array) -> jax.Array:
    """targets[:, t] = labels[:, t+1]; the last position of each row predicts nothing.

    Padding the labels (instead of slicing hidden states) keeps every array at
    length L, so a sequence-sharded layout is not disturbed.
    """
    tail = jnp.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)
    return jnp.concatenate([labels[:, 1:], tail], axis=1)


def _logits(h: jax.Array, w: jax.Array, compute_dtype: Any) -> jax.Array:
    """[..., H] x [V, H] -> [..., V] in fp32, inputs cast to ``compute_dtype``."""
    return jnp.einsum(
        "...h,vh->...v", h.astype(compute_dtype), w.astype(compute_dtype), preferred_element_type=jnp.float32
    )


def _token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token loss (0 where ignored), log-sum-exp and the weight mask, all fp32."""
    weight = (targets != IGNORE_INDEX).astype(jnp.float32)
    safe = jnp.where(targets != IGNORE_INDEX, targets, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return (lse - picked) * weight, lse, weight


def _full_loss(hidden: jax.Array, w: jax.Array, targets: jax.Array, compute_dtype: Any) -> jax.Array:
    losses, _, _ = _token_losses(_logits(hidden, w, compute_dtype), targets)
    return jnp.sum(losses)


# --- chunked path -----------------------------------------------------------


def _to_chunks(h_flat: jax.Array, t_flat: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """[N, H] -> [n, c, H] with *strided* chunks: chunk i holds tokens i, i+n, i+2n, ...

    The loss is a sum, so which tokens share a chunk does not matter; striding
    means a token axis sharded over devices stays sharded inside every chunk,
    so each scan step runs on all devices instead of on one.
    """
    n_tok = h_flat.shape[0]
    pad = (-n_tok) % chunk
    h_flat = jnp.pad(h_flat, ((0, pad), (0, 0)))
    t_flat = jnp.pad(t_flat, (0, pad), constant_values=IGNORE_INDEX)
    n_chunks = (n_tok + pad) // chunk
    h_c = h_flat.reshape(chunk, n_chunks, -1).swapaxes(0, 1)
    t_c = t_flat.reshape(chunk, n_chunks).swapaxes(0, 1)
    return h_c, t_c


def _from_chunks(d_c: jax.Array, n_tok: int) -> jax.Array:
    """Inverse of :func:`_to_chunks` for a per-token array, dropping the padding."""
    n_chunks, chunk, width = d_c.shape
    return d_c.swapaxes(0, 1).reshape(n_chunks * chunk, width)[:n_tok]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_loss(h_flat: jax.Array, w: jax.Array, t_flat: jax.Array, chunk: int, compute_dtype: Any) -> jax.Array:
    """Loss only (used when nobody differentiates, e.g. evaluation)."""
    h_c, t_c = _to_chunks(h_flat, t_flat, chunk)
    w_c = w.astype(compute_dtype)

    def body(total, xs):
        h_i, t_i = xs
        losses, _, _ = _token_losses(_logits(h_i, w_c, compute_dtype), t_i)
        return total + jnp.sum(losses), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h_c, t_c))
    return total


def _chunked_fwd(h_flat, w, t_flat, chunk, compute_dtype):
    """Loss plus d(loss)/d(hidden) and d(loss)/d(unembedding), chunk by chunk."""
    h_c, t_c = _to_chunks(h_flat, t_flat, chunk)
    w_c = w.astype(compute_dtype)
    vocab = w.shape[0]

    def body(carry, xs):
        total, d_w = carry
        h_i, t_i = xs
        logits = _logits(h_i, w_c, compute_dtype)
        losses, lse, weight = _token_losses(logits, t_i)
        probs = jnp.exp(logits - lse[:, None])
        one_hot = jax.nn.one_hot(jnp.where(t_i != IGNORE_INDEX, t_i, 0), vocab, dtype=jnp.float32)
        d_logits = ((probs - one_hot) * weight[:, None]).astype(compute_dtype)
        d_h = jnp.dot(d_logits, w_c, preferred_element_type=jnp.float32)
        d_w = d_w + jnp.dot(d_logits.T, h_i.astype(compute_dtype), preferred_element_type=jnp.float32)
        return (total + jnp.sum(losses), d_w), d_h.astype(h_flat.dtype)

    init = (jnp.zeros((), jnp.float32), jnp.zeros(w.shape, jnp.float32))
    (total, d_w), d_h_c = jax.lax.scan(body, init, (h_c, t_c))
    d_h = _from_chunks(d_h_c, h_flat.shape[0])
    return total, (d_h, d_w.astype(w.dtype))


def _chunked_bwd(chunk, compute_dtype, residuals, g):
    del chunk, compute_dtype
    d_h, d_w = residuals
    scale = lambda d: (g * d.astype(jnp.float32)).astype(d.dtype)  # noqa: E731
    return scale(d_h), scale(d_w), None


_chunked_loss.defvjp(_chunked_fwd, _chunked_bwd)


def causal_lm_loss(
    hidden: jax.Array,
    unembedding: jax.Array,
    labels: jax.Array,
    *,
    chunk_size: Optional[int] = None,
    compute_dtype: Any = jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token cross entropies and the number of target tokens (both fp32 scalars).

    hidden: [B, L, H] final hidden states; unembedding: [V, H]; labels: [B, L]
    aligned with the inputs, -100 = ignored. Position t is scored against
    ``labels[:, t+1]``. ``num_tokens`` carries no gradient.
    """
    if hidden.ndim != 3 or labels.shape != hidden.shape[:2] or unembedding.ndim != 2:
        raise ValueError(
            f"causal_lm_loss expects hidden [B, L, H], unembedding [V, H], labels [B, L]; got "
            f"{hidden.shape}, {unembedding.shape}, {labels.shape}."
        )
    if unembedding.shape[1] != hidden.shape[2]:
        raise ValueError(f"hidden size {hidden.shape[2]} != unembedding width {unembedding.shape[1]}.")
    compute_dtype = jnp.dtype(compute_dtype)
    targets = _shifted_targets(labels.astype(jnp.int32))
    num_tokens = jax.lax.stop_gradient(jnp.sum(targets != IGNORE_INDEX).astype(jnp.float32))
    if chunk_size is None:
        return _full_loss(hidden, unembedding, targets, compute_dtype), num_tokens
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be None or a positive integer.")
    batch, length, width = hidden.shape
    n_tok = batch * length
    chunk = min(int(chunk_size), n_tok)
    loss = _chunked_loss(hidden.reshape(n_tok, width), unembedding, targets.reshape(n_tok), chunk, compute_dtype)
    return loss, num_tokens
