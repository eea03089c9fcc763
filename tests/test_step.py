"""The train step's functions (jaxsft.training.step) on a tiny model: what the compiled update differentiates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsft
from jaxsft.training import step as step_fns
from jaxsft.models.families import spec_from_hf_config
from jaxsft.training.objectives import CausalSFT

import tiny

pytestmark = pytest.mark.slow  # each builds and differentiates a model: 2-3 s on the 2-core machine


def test_layer_gradients_in_the_compute_dtype_equal_the_stored_dtype_path():
    """bf16 compute: differentiating compute-dtype copies of the layer stacks (what the train step does)
    gives bf16 gradients whose values equal, bit for bit, the fp32 gradients of the stored weights
    (the cast's transpose is an exact upcast); the embedding's gradient stays fp32 and equal too."""
    model = jaxsft.init_model(spec_from_hf_config(tiny.tiny_config("qwen2")), mesh=jaxsft.single_device_mesh(), seed=0,
                              dtype=jnp.bfloat16)
    graphdef, params = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 300, (2, 16)), jnp.int32)
    batch = {"input_ids": ids, "labels": ids}
    grad_fn = jax.jit(jax.grad(lambda p: step_fns.make_loss_fn(graphdef, CausalSFT())(p, batch)[0]))
    stored = grad_fn(params)
    view = step_fns.compute_view(graphdef, params)
    viewed = grad_fn(view)
    assert view["layers"]["q_proj"][...].dtype == jnp.bfloat16 and view["embed"][...].dtype == jnp.float32
    flat_stored, flat_viewed = jax.tree.leaves(stored), jax.tree.leaves(viewed)
    cast = 0
    for a, b in zip(flat_stored, flat_viewed):
        cast += b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(b, np.float32), np.asarray(a))
    assert cast == len(jax.tree.leaves(params["layers"]))


def test_an_update_from_compute_dtype_gradients_equals_the_stored_dtype_update(monkeypatch):
    """The whole fused update (scaling by the token count, clipping, AdamW) gives bit-identical weights
    whether the layer gradients arrive in bf16 (the step's view) or fp32 (differentiating the stored
    weights): they are upcast before scaling, never rounded after."""
    import optax

    model = jaxsft.init_model(spec_from_hf_config(tiny.tiny_config("llama")), mesh=jaxsft.single_device_mesh(),
                              seed=1, dtype=jnp.bfloat16)
    graphdef, params = nnx.split(model)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.01))
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 300, (2, 16)), jnp.int32)
    batch = {"input_ids": ids, "labels": ids}

    def run():
        update = jax.jit(step_fns.make_fused_update(graphdef, tx, CausalSFT()))
        new_params, _, metrics = update(params, tx.init(params), batch)
        return jax.tree.map(np.asarray, new_params), float(metrics["grad_norm"])

    viewed, norm_viewed = run()
    monkeypatch.setattr(step_fns, "compute_view", lambda graphdef, params, frozen=(): params)
    stored, norm_stored = run()
    assert norm_viewed == norm_stored
    for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(viewed)):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(b, a)


def test_accumulated_updates_from_compute_dtype_gradients_equal_the_stored_dtype_ones(monkeypatch):
    """Gradient accumulation: bf16 micro-batch gradients are added into the fp32 sums exactly as their fp32
    casts would be, so two accumulated micro-batches and the update give bit-identical weights."""
    import optax

    model = jaxsft.init_model(spec_from_hf_config(tiny.tiny_config("qwen2")), mesh=jaxsft.single_device_mesh(),
                              seed=2, dtype=jnp.bfloat16)
    graphdef, params = nnx.split(model)
    tx = optax.adamw(1e-3)
    rng = np.random.default_rng(2)
    batches = [{"input_ids": ids, "labels": ids} for ids in (jnp.asarray(rng.integers(3, 300, (2, 16)), jnp.int32)
                                                              for _ in range(2))]

    def run():
        accumulate = jax.jit(step_fns.make_accumulate(graphdef, CausalSFT()))
        acc = step_fns.make_zero_accumulator(CausalSFT())(params)
        for batch in batches:
            acc = accumulate(params, acc, batch)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(acc[0]))
        new_params, _, _ = jax.jit(step_fns.make_apply(tx))(params, tx.init(params), acc)
        return jax.tree.map(np.asarray, new_params)

    viewed = run()
    monkeypatch.setattr(step_fns, "compute_view", lambda graphdef, params, frozen=(): params)
    stored = run()
    for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(viewed)):
        np.testing.assert_array_equal(b, a)
