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

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxsft.training.objectives import Objective
from jaxsft.training.optim import global_norm

Batch = dict[str, jax.Array]


def make_loss_fn(graphdef: nnx.GraphDef, objective: Objective) -> Callable[..., tuple[jax.Array, tuple]]:
    """(params, batch, frozen) -> (sum, (denominator, aux)): ``objective.loss`` on the merged model.

    The shape ``jax.value_and_grad(..., has_aux=True)`` takes: the sum is differentiated, the
    denominator (the one normaliser) and the objective's additive statistics ride along.
    """

    def loss_fn(params, batch: Batch, frozen=()):
        total, denominator, aux = objective.loss(nnx.merge(graphdef, params, *frozen), batch)
        return total, (denominator, aux)

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
        (loss_sum, (denominator, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(view, batch, frozen)
        return grads, loss_sum, denominator, aux

    return grads_of


def _apply(tx, params, opt_state, grad_sum, loss_sum, denominator, aux, skip_nonfinite: bool = False):
    """The update from summed gradients: normalised once, by the summed denominator (label tokens, or their
    weighted count under example weights)."""
    count = denominator
    scale = 1.0 / jnp.maximum(count, 1e-12)
    # In the weights' own dtype (a compute-dtype gradient is upcast first, never rounded after scaling).
    grads = jax.tree.map(lambda g, p: (g.astype(p.dtype) * scale).astype(p.dtype), grad_sum, params)
    grad_norm = global_norm(grads)

    def updated(_):
        updates, new_opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state

    metrics = {
        **aux,  # the objective's statistics (num_tokens: the real label-token count)
        "loss": loss_sum / jnp.maximum(count, 1e-12),
        "loss_sum": loss_sum,
        "denominator": count,
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


def make_fused_update(graphdef, tx, objective: Objective, skip_nonfinite=False):
    """One micro-batch per update (gradient_accumulation_steps == 1): grads and optimizer in one program."""
    grads_of = _sum_grads(graphdef, make_loss_fn(graphdef, objective))

    def fused(params, opt_state, batch, frozen=()):
        grads, loss_sum, denominator, aux = grads_of(params, batch, frozen)
        return _apply(tx, params, opt_state, grads, loss_sum, denominator, aux, skip_nonfinite)

    return fused


def make_accumulate(graphdef, objective: Objective):
    """Adds one micro-batch's gradient sum, loss sum, denominator and statistics into the running sums (donated)."""
    grads_of = _sum_grads(graphdef, make_loss_fn(graphdef, objective))

    def accumulate(params, acc, batch, frozen=()):
        grads, loss_sum, denominator, aux = grads_of(params, batch, frozen)
        acc_grads, acc_loss, acc_denominator, acc_aux = acc
        acc_grads = jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc_grads, grads)
        acc_aux = {k: acc_aux[k] + aux[k] for k in acc_aux}
        return acc_grads, acc_loss + loss_sum, acc_denominator + denominator, acc_aux

    return accumulate


def make_zero_accumulator(objective: Objective):
    """Zero sums of the gradients, loss, denominator and the objective's statistics."""
    def zeros(params):
        scalar = lambda: jnp.zeros((), jnp.float32)  # noqa: E731
        return jax.tree.map(jnp.zeros_like, params), scalar(), scalar(), {k: scalar() for k in objective.logged_aux()}

    return zeros


def make_apply(tx, skip_nonfinite=False):
    """Applies one optimizer update from accumulated sums: loss = sum / summed denominator (exact)."""

    def apply(params, opt_state, acc):
        grad_sum, loss_sum, denominator, aux = acc
        return _apply(tx, params, opt_state, grad_sum, loss_sum, denominator, aux, skip_nonfinite)

    return apply


def make_eval(graphdef, objective: Objective):
    """(params, batch, frozen) -> (loss sum, denominator, aux) of one evaluation micro-batch."""
    loss_fn = make_loss_fn(graphdef, objective)

    def evaluate(params, batch, frozen=()):
        total, (denominator, aux) = loss_fn(params, batch, frozen)
        return total, denominator, aux

    return evaluate


def make_logits(graphdef):
    """(params, input_ids) -> logits [rows, length, vocab]; rows are right-padded, so causal attention suffices."""

    def logits(params, input_ids, frozen=()):
        return nnx.merge(graphdef, params, *frozen)(input_ids)

    return logits
