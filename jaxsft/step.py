"""The pure functions that become the compiled train and eval programs.

Each takes the model's graph definition as a closure constant and works on plain
pytrees (params, optimizer state, batch arrays), so the trainer can compile them
ahead of time per batch shape, donate params and optimizer state, and count the
programs it owns.

``params`` is what trains. ``frozen`` (a tuple of states, empty for full fine-tuning) holds
weights that take part in the forward pass but get no gradient, no optimizer state and are
never donated: a LoRA model's base weights.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxsft.loss import causal_lm_loss
from jaxsft.optim import global_norm

Batch = dict[str, jax.Array]


def make_loss_fn(
    graphdef: nnx.GraphDef, chunk_size: Optional[int], num_shards: int = 1
) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
    """(params, batch) -> (sum of token losses, number of label tokens).

    ``num_shards`` is how many ways the batch rows are split over devices; the
    chunked loss keeps per-shard partial sums so it communicates once.
    """

    def loss_fn(params, batch: Batch, frozen=()):
        model = nnx.merge(graphdef, params, *frozen)
        if "decoder_input_ids" in batch:  # encoder-decoder: the batch's keys are static, so this is a trace-time switch
            hidden = model.hidden_states(
                batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
                dropout_key=batch.get("dropout_rng"),
            )
            head = model.lm_head_operands(hidden)
            return causal_lm_loss(
                head.hidden, head.weight, batch["labels"], chunk_size=chunk_size, compute_dtype=model.dtype,
                num_shards=num_shards, shift=False, softcap=head.softcap,
            )
        # Micro-batches are right-padded, so causal attention alone isolates padding; packed
        # ones carry segment ids (attention stays within an example) and per-example positions.
        hidden = model.hidden_states(
            batch["input_ids"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
            segment_lengths=batch.get("segment_lengths"), dropout_key=batch.get("dropout_rng"),
        )
        head = model.lm_head_operands(hidden)
        return causal_lm_loss(
            head.hidden,
            head.weight,
            batch["labels"],
            softcap=head.softcap,
            chunk_size=chunk_size,
            compute_dtype=model.dtype,
            num_shards=num_shards,
        )

    return loss_fn


def compute_view(graphdef: nnx.GraphDef, params, frozen=()):
    """``params`` with the weights the model casts to its compute dtype before any use already cast.

    Differentiating this view instead of the stored weights gives those weights' gradients in
    the compute dtype: the same values (the cast's transpose only upcasts a bf16 cotangent,
    exactly), in half the bytes the backward writes, the layer-stacking concatenate moves and
    the optimizer reads. Which weights: the model class's ``CAST_AT_USE`` top-level names
    (the decoder's layer stacks); the rest (embedding, LoRA adapters) keeps its stored dtype.
    """
    model = nnx.merge(graphdef, params, *frozen)
    names = getattr(type(model), "CAST_AT_USE", ())
    dtype = jnp.dtype(getattr(model, "dtype", jnp.float32))

    def cast(path, leaf):
        top = getattr(path[0], "key", None) if path else None
        if top in names and jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != dtype:
            return leaf.astype(dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(cast, params)


def _sum_grads(graphdef, loss_fn):
    """Gradient of the token-loss SUM; normalisation by the update's token count comes later.

    Gradients of :func:`compute_view`'s weights come out in the compute dtype; the optimizer and
    any accumulator upcast them (they hold the stored dtype).
    """

    def grads_of(params, batch, frozen=()):
        view = compute_view(graphdef, params, frozen)
        (loss_sum, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(view, batch, frozen)
        return grads, loss_sum, count

    return grads_of


def _apply(tx, params, opt_state, grad_sum, loss_sum, count, skip_nonfinite: bool = False):
    scale = 1.0 / jnp.maximum(count, 1.0)
    # In the weights' own dtype (a compute-dtype gradient is upcast first, never rounded after scaling).
    grads = jax.tree.map(lambda g, p: (g.astype(p.dtype) * scale).astype(p.dtype), grad_sum, params)
    grad_norm = global_norm(grads)

    def updated(_):
        updates, new_opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state

    metrics = {
        "loss": loss_sum / jnp.maximum(count, 1.0),
        "loss_sum": loss_sum,
        "num_tokens": count,
        "grad_norm": grad_norm,
    }
    if skip_nonfinite:
        # The guard: a NaN/inf loss or gradient leaves weights and optimizer state as they were.
        finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
        params, opt_state = jax.lax.cond(finite, updated, lambda _: (params, opt_state), None)
        metrics["skipped"] = jnp.logical_not(finite)
    else:
        params, opt_state = updated(None)
    return params, opt_state, metrics


def make_fused_update(graphdef, tx, chunk_size, num_shards=1, skip_nonfinite=False):
    """One micro-batch per update (gradient_accumulation_steps == 1): grads and optimizer in one program."""
    grads_of = _sum_grads(graphdef, make_loss_fn(graphdef, chunk_size, num_shards))

    def fused(params, opt_state, batch, frozen=()):
        grads, loss_sum, count = grads_of(params, batch, frozen)
        return _apply(tx, params, opt_state, grads, loss_sum, count, skip_nonfinite)

    return fused


def make_accumulate(graphdef, chunk_size, num_shards=1):
    """Adds one micro-batch's gradient sum into the running sums (donated)."""
    grads_of = _sum_grads(graphdef, make_loss_fn(graphdef, chunk_size, num_shards))

    def accumulate(params, acc, batch, frozen=()):
        grads, loss_sum, count = grads_of(params, batch, frozen)
        acc_grads, acc_loss, acc_count = acc
        acc_grads = jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc_grads, grads)
        return acc_grads, acc_loss + loss_sum, acc_count + count

    return accumulate


def make_zero_accumulator():
    def zeros(params):
        return jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)

    return zeros


def make_apply(tx, skip_nonfinite=False):
    """Applies one optimizer update from accumulated sums: loss = sum / total label tokens (exact)."""

    def apply(params, opt_state, acc):
        grad_sum, loss_sum, count = acc
        return _apply(tx, params, opt_state, grad_sum, loss_sum, count, skip_nonfinite)

    return apply


def make_eval(graphdef, chunk_size, num_shards=1):
    loss_fn = make_loss_fn(graphdef, chunk_size, num_shards)

    def evaluate(params, batch, frozen=()):
        return loss_fn(params, batch, frozen)

    return evaluate


def make_logits(graphdef):
    """(params, input_ids) -> logits [rows, length, vocab]; rows are right-padded, so causal attention suffices."""

    def logits(params, input_ids, frozen=()):
        return nnx.merge(graphdef, params, *frozen)(input_ids)

    return logits
