"""Choosing the next token from the logits, per row, in one pass over the vocabulary.

Order as in HF: temperature -> top-k -> top-p, then a draw. The draw is an inverse-CDF
lookup with one uniform number per row: the vocabulary is cut into blocks of
up to ``BLOCK`` tokens, one fused pass computes each block's probability mass, the uniform
picks a block from the (short) running sum of masses and then a token inside it. That
is the exact categorical distribution of the filtered logits, without a sort and without
the ``V`` Gumbel draws per row a ``jax.random.categorical`` costs.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

BLOCK = 256  # the most tokens per block of the two-level inverse-CDF draw
_GROUP = 32  # entries per group when locating a draw in a long row of weights (see locate)


class Mode(NamedTuple):
    """The compile-time part of a sampling request: programs are cached by it."""

    kind: str  # "greedy" | "sample"
    top_k: Optional[int] = None
    top_p: bool = False  # top-p filtering on (its value is a run-time scalar)


class Sampling(NamedTuple):
    """The run-time scalars of a request (device arrays, so new values never recompile)."""

    temperature: Any
    top_p: Any
    eos: Any  # [MAX_EOS_IDS] int32, -1 padded
    pad: Any
    max_new: Any
    seed: Any


def row_keys(seed: jax.Array, row_ids: jax.Array) -> jax.Array:
    """One PRNG key per output row from the call's seed and the row's global index (never its slot)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.maximum(row_ids, 0))


def sample(logits: jax.Array, keys: jax.Array, steps: jax.Array, mode: Mode, temperature, top_p) -> jax.Array:
    """One token per row from logits [B, V] (the model's compute dtype or fp32; arithmetic in fp32); ``steps`` [B]
    is each row's token index (its key is folded with it)."""
    if mode.kind == "greedy":
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    step_keys = jax.vmap(jax.random.fold_in)(keys, steps)
    uniforms = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(step_keys)
    top_k = mode.top_k is not None and mode.top_k < logits.shape[-1]
    if not top_k and not mode.top_p:
        # The common case (temperature alone): the draw divides by the temperature inside its own passes, so no
        # tempered fp32 copy of [B, V] is written and read back (16 % of a 0.5B decode step when it was).
        return inverse_cdf_draw(logits, uniforms, temperature)
    logits = logits.astype(jnp.float32) / temperature
    neg = -jnp.inf
    if top_k:
        kth = jax.lax.top_k(logits, mode.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)  # HF TopKLogitsWarper: ties with the k-th survive
    if mode.top_p:
        logits = jnp.where(logits < _top_p_threshold(logits, top_p), neg, logits)
    return inverse_cdf_draw(logits, uniforms)


def inverse_cdf_draw(logits: jax.Array, uniforms: jax.Array, temperature: Any = 1.0) -> jax.Array:
    """The token whose cumulative probability interval holds ``uniforms`` [B] (in [0, 1)), for the distribution
    softmax(logits / temperature) over logits [B, V] (any float dtype; computed in fp32).

    Two levels (blocks of :func:`block_size` tokens, then inside the chosen block), so every pass is
    over ``V`` elements once or over a short axis; ``-inf`` logits have probability 0 and are never
    drawn. The probabilities are never stored: block masses come from one fused exp-and-sum over the
    logits, and only the chosen block's are formed again. A positive temperature does not move the
    maximum, so it divides each logit's distance to the row maximum inside those passes.
    """
    b, v = logits.shape
    size = block_size(v)
    blocks = -(-v // size)
    if blocks * size != v:
        logits = jnp.pad(logits, ((0, 0), (0, blocks * size - v)), constant_values=-jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True).astype(jnp.float32)
    grouped = logits.reshape(b, blocks, size)

    def weights(x, top):  # exp((x - max) / temperature) in fp32: the unnormalised probabilities
        return jnp.exp((x.astype(jnp.float32) - top) / temperature)

    mass = jnp.sum(weights(grouped, m[:, :, None]), axis=-1)  # [B, blocks]; the max token has 1
    # Kept as computed: otherwise XLA folds the total's sum of block sums into one more exp-and-sum pass over the
    # logits (66 µs of a 0.5B decode step on an H100, twelfth session) instead of adding [B, blocks] numbers.
    mass = jax.lax.optimization_barrier(mass)
    target = uniforms * jnp.sum(mass, axis=-1)
    block, before = locate(mass, target)
    inner = weights(jnp.take_along_axis(grouped, block[:, None, None], axis=1)[:, 0], m)  # [B, size]
    j, _ = locate(inner, target - before)
    return (block * size + j).astype(jnp.int32)


def locate(weights: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row of weights [B, n] (>= 0, some positive) the index whose cumulative interval holds target [B], and
    the weight before it: the first i with cumsum[i] > target, moved to the nearest index with weight (rounding may
    land past the last one), and cumsum[i] - weights[i].

    Why in levels: on GPU XLA lowers a cumulative sum to a windowed reduction whose work grows with the square of
    its length, run by one thread per output; over Qwen's 1,187 blocks of 128 tokens that single cumulative sum
    took 113 µs of a 6.3 ms 1.5B decode step (twelfth session's profile). Groups of ``_GROUP`` keep every
    cumulative sum short: the group is located first, then the index inside it.
    """
    b, n = weights.shape
    if n <= 2 * _GROUP:
        cum = jnp.cumsum(weights, axis=-1)
        i = _last_nonzero_at_most(weights, jnp.minimum(jnp.sum(cum <= target[:, None], axis=-1), n - 1))
        before = jnp.take_along_axis(cum - weights, i[:, None], axis=-1)[:, 0]
        return i, before
    groups = -(-n // _GROUP)
    grouped = jnp.pad(weights, ((0, 0), (0, groups * _GROUP - n))).reshape(b, groups, _GROUP)
    g, before_group = locate(jnp.sum(grouped, axis=-1), target)
    j, before_inside = locate(jnp.take_along_axis(grouped, g[:, None, None], axis=1)[:, 0], target - before_group)
    return g * _GROUP + j, before_group + before_inside


def block_size(vocab: int) -> int:
    """Tokens per block: the largest power of two <= BLOCK dividing the vocabulary (no padded copy of the
    logits), or BLOCK with padding when that would be under 32."""
    size = BLOCK
    while size >= 32 and vocab % size:
        size //= 2
    return size if size >= 32 else BLOCK


def _last_nonzero_at_most(weights: jax.Array, index: jax.Array) -> jax.Array:
    """Per row, the largest i <= index with weights[i] > 0 (else the first i > index with weight)."""
    n = weights.shape[-1]
    ar = jnp.arange(n)
    nonzero = weights > 0
    below = jnp.max(jnp.where(nonzero & (ar <= index[:, None]), ar, -1), axis=-1)
    above = jnp.min(jnp.where(nonzero & (ar > index[:, None]), ar, n - 1), axis=-1)
    return jnp.where(below >= 0, below, above)


def _top_p_threshold(logits: jax.Array, top_p) -> jax.Array:
    """The smallest logit HF's TopPLogitsWarper keeps, per row [B, 1], found by bisection instead of a sort.

    HF sorts ascending and drops a token when the cumulative probability up to it is <= 1 - top_p:
    a token is kept exactly when the probability mass strictly above it is < top_p. That mass only
    shrinks as the logit grows, so the kept tokens are those at or above the smallest logit ``t`` with
    ``mass_above(t) < top_p``. The bisection runs over the float's bits (monotone for finite floats),
    32 passes of one masked sum each, and lands on ``t`` exactly.
    """
    m = jnp.max(logits, axis=-1, keepdims=True)
    probs = jnp.exp(logits - m)
    total = jnp.sum(probs, axis=-1, keepdims=True)
    goal = top_p * total

    def mass_above(t_bits):
        t = _from_ordered(t_bits)
        return jnp.sum(jnp.where(logits > t, probs, 0.0), axis=-1, keepdims=True)

    finite = jnp.where(jnp.isfinite(logits), logits, m)
    lo = _to_ordered(jnp.min(finite, axis=-1, keepdims=True))  # mass_above(max) = 0 < goal: hi always satisfies
    hi = _to_ordered(m)

    def body(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # no int32 overflow
        ok = mass_above(mid) < goal
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo, hi = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return _from_ordered(hi)


def _to_ordered(x: jax.Array) -> jax.Array:
    """float32 -> int32 whose order is the floats' order (sign-magnitude flipped for negatives)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _from_ordered(i: jax.Array) -> jax.Array:
    bits = jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)  # the same flip undoes itself
    return jax.lax.bitcast_convert_type(bits, jnp.float32)
