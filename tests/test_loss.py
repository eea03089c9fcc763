"""jaxsft.training.loss.causal_lm_loss against torch cross entropy and autograd.

Tolerances: fp32 paths rtol 1e-5 (atol 1e-6 x the largest magnitude, for
elements that are near zero); bf16 compute rtol 2e-3 on the loss and 1.5e-2 x
the largest magnitude on gradients (observed: 2e-4 and 5e-3; one bf16 ulp is
2**-8 = 0.4%).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxsft.training.loss import causal_lm_loss

B, L, H, V = 3, 11, 32, 97  # B*L = 33 tokens, so chunk 8 leaves a ragged tail
CHUNKS = [1, 8, 11, 33, 64]


def _inputs(seed=0, b=B, length=L):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(b, length, H)).astype(np.float32)
    unembedding = (rng.normal(size=(V, H)) / np.sqrt(H)).astype(np.float32)
    labels = rng.integers(0, V, size=(b, length)).astype(np.int32)
    labels[0, :4] = -100  # a prompt
    labels[1, -3:] = -100  # padding
    labels[2, 5] = -100  # a hole
    return hidden, unembedding, labels


def _torch_reference(hidden, unembedding, labels):
    h = torch.tensor(hidden, requires_grad=True)
    w = torch.tensor(unembedding, requires_grad=True)
    logits = h @ w.T
    target = torch.tensor(labels, dtype=torch.long)[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), target.reshape(-1), ignore_index=-100, reduction="sum")
    loss.backward()
    count = int((target != -100).sum())
    return float(loss.detach()), count, h.grad.numpy(), w.grad.numpy()


def _close(actual, expected, rtol):
    actual = np.asarray(actual, np.float32)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-6 * np.abs(expected).max())


def _value_and_grads(hidden, unembedding, labels, chunk_size, compute_dtype=jnp.float32, num_shards=1):
    def loss_sum(h, w):
        total, count = causal_lm_loss(
            h, w, labels, chunk_size=chunk_size, compute_dtype=compute_dtype, num_shards=num_shards
        )
        return total, count

    (total, count), (g_h, g_w) = jax.jit(jax.value_and_grad(loss_sum, argnums=(0, 1), has_aux=True))(
        hidden, unembedding
    )
    return total, count, g_h, g_w


@pytest.mark.parametrize("chunk_size", [None] + CHUNKS)
def test_value_count_and_grads_match_torch(chunk_size):
    hidden, unembedding, labels = _inputs()
    ref_loss, ref_count, ref_gh, ref_gw = _torch_reference(hidden, unembedding, labels)
    total, count, g_h, g_w = _value_and_grads(*map(jnp.asarray, (hidden, unembedding, labels)), chunk_size)
    assert total.dtype == count.dtype == jnp.float32
    np.testing.assert_allclose(float(total), ref_loss, rtol=1e-5)
    assert float(count) == ref_count == B * (L - 1) - 3 - 3 - 1  # position 0 of a row is never a target
    assert g_h.dtype == jnp.float32 and g_w.dtype == jnp.float32
    _close(g_h, ref_gh, rtol=1e-5)
    _close(g_w, ref_gw, rtol=1e-5)


@pytest.mark.parametrize("num_shards", [1, 3])
@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_chunked_matches_unchunked(chunk_size, num_shards):
    hidden, unembedding, labels = map(jnp.asarray, _inputs(seed=1))
    full = _value_and_grads(hidden, unembedding, labels, None)
    chunked = _value_and_grads(hidden, unembedding, labels, chunk_size, num_shards=num_shards)
    np.testing.assert_allclose(float(chunked[0]), float(full[0]), rtol=1e-5)
    assert float(chunked[1]) == float(full[1])
    _close(chunked[2], np.asarray(full[2]), rtol=1e-5)
    _close(chunked[3], np.asarray(full[3]), rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_loss_without_differentiation_matches_torch(chunk_size):
    """The eval path (no grad) uses the loss-only primal of the custom_vjp."""
    hidden, unembedding, labels = _inputs(seed=2)
    ref_loss, ref_count, _, _ = _torch_reference(hidden, unembedding, labels)
    fn = jax.jit(lambda h, w, y: causal_lm_loss(h, w, y, chunk_size=chunk_size))
    total, count = fn(hidden, unembedding, labels)
    np.testing.assert_allclose(float(total), ref_loss, rtol=1e-5)
    assert float(count) == ref_count


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_bf16_compute_is_close_and_gradients_keep_input_dtypes(chunk_size):
    hidden, unembedding, labels = _inputs(seed=3)
    ref_loss, _, ref_gh, ref_gw = _torch_reference(hidden, unembedding, labels)
    h16 = jnp.asarray(hidden, jnp.bfloat16)
    total, _, g_h, g_w = _value_and_grads(h16, jnp.asarray(unembedding), jnp.asarray(labels), chunk_size, jnp.bfloat16)
    assert total.dtype == jnp.float32
    assert g_h.dtype == jnp.bfloat16 and g_w.dtype == jnp.float32
    np.testing.assert_allclose(float(total), ref_loss, rtol=2e-3)
    for got, ref in ((g_h, ref_gh), (g_w, ref_gw)):
        np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=0, atol=1.5e-2 * np.abs(ref).max())


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_all_masked_labels_give_zero_loss_count_and_grads(chunk_size):
    hidden, unembedding, _ = _inputs()
    labels = jnp.full((B, L), -100, jnp.int32)
    total, count, g_h, g_w = _value_and_grads(jnp.asarray(hidden), jnp.asarray(unembedding), labels, chunk_size)
    assert float(total) == 0.0 and float(count) == 0.0
    for g in (g_h, g_w):
        assert np.all(np.isfinite(g)) and not np.any(np.asarray(g))


def test_only_the_first_label_of_a_row_is_never_learned():
    hidden, unembedding, _ = _inputs()
    labels = np.full((B, L), -100, np.int32)
    labels[:, 0] = 3  # position 0 is never a target
    total, count = causal_lm_loss(jnp.asarray(hidden), jnp.asarray(unembedding), jnp.asarray(labels), chunk_size=8)
    assert float(total) == 0.0 and float(count) == 0.0


def test_jit_of_grad_of_the_mean_scales_the_fused_gradient():
    """The backward pass scales the saved gradients by the incoming cotangent (here 1/count)."""
    hidden, unembedding, labels = _inputs(seed=4)
    _, count, ref_gh, ref_gw = _torch_reference(hidden, unembedding, labels)

    def mean_loss(h, w):
        total, n = causal_lm_loss(h, w, labels, chunk_size=8)
        return total / n

    g_h, g_w = jax.jit(jax.grad(mean_loss, argnums=(0, 1)))(hidden, unembedding)
    _close(g_h, ref_gh / count, rtol=1e-5)
    _close(g_w, ref_gw / count, rtol=1e-5)


def _inner_jaxprs(value):
    """Jaxprs nested in an equation parameter (scan body, cond branches, custom_vjp call, ...)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(getattr(value, "jaxpr", None), "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _inner_jaxprs(item)


def _count(jaxpr, name: str) -> int:
    """Occurrences of primitive ``name`` in a jaxpr, nested ones included."""
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == name
        for param in eqn.params.values():
            total += sum(_count(inner, name) for inner in _inner_jaxprs(param))
    return total


def test_chunked_gradient_is_computed_in_one_pass():
    """Gradient = one scan doing logits, d_hidden and d_W per chunk.

    Plain autodiff through the scan would show a second (transposed) scan and
    keep per-chunk logits alive between the two.
    """
    hidden, unembedding, labels = map(jnp.asarray, _inputs())
    grad_fn = jax.grad(lambda h, w: causal_lm_loss(h, w, labels, chunk_size=8)[0], argnums=(0, 1))
    jaxpr = jax.make_jaxpr(grad_fn)(hidden, unembedding).jaxpr
    assert _count(jaxpr, "scan") == 1
    assert _count(jaxpr, "dot_general") == 3
    loss_fn = lambda h, w: causal_lm_loss(h, w, labels, chunk_size=8)[0]  # noqa: E731
    loss_jaxpr = jax.make_jaxpr(loss_fn)(hidden, unembedding).jaxpr
    assert _count(loss_jaxpr, "dot_general") == 1  # evaluation does no gradient work


@pytest.mark.slow
def test_sharded_inputs_under_jit():
    if jax.device_count() < 2:
        pytest.skip("needs several (host) devices; conftest sets 8")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    n = jax.device_count()
    hidden, unembedding, labels = _inputs(seed=5, b=n, length=12)
    ref_loss, _, ref_gh, ref_gw = _torch_reference(hidden, unembedding, labels)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    h = jax.device_put(hidden, NamedSharding(mesh, P("data", None, None)))
    y = jax.device_put(labels, NamedSharding(mesh, P("data", None)))
    w = jax.device_put(unembedding, NamedSharding(mesh, P()))
    for chunk_size, shards in ((None, 1), (16, 1), (7, 1), (7, n), (5, n // 2)):
        loss_sum = lambda h, w, y: causal_lm_loss(h, w, y, chunk_size=chunk_size, num_shards=shards)[0]  # noqa: E731
        fn = jax.jit(jax.value_and_grad(loss_sum, argnums=(0, 1)))
        with jax.set_mesh(mesh):  # as the trainer runs it
            total, (g_h, g_w) = fn(h, w, y)
        np.testing.assert_allclose(float(total), ref_loss, rtol=1e-5)
        _close(g_h, ref_gh, rtol=1e-5)
        _close(g_w, ref_gw, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_bf16_compute_scores_bf16_logits_as_torch_autocast_does(chunk_size):
    """Under bf16 the lm_head's logits are rounded to bf16 and upcast for the softmax, as TRL's are
    (autocast lm_head, then transformers' ``logits.float()``): the loss equals that reference far more
    tightly than the fp32-logits reference (they differ by the rounding of every logit)."""
    hidden, unembedding, labels = _inputs(seed=4, b=4, length=64)
    h16, w16 = torch.tensor(hidden).bfloat16(), torch.tensor(unembedding).bfloat16()
    target = torch.tensor(labels, dtype=torch.long)[:, 1:].reshape(-1)

    def reference(logits):
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, V), target, ignore_index=-100, reduction="sum"))

    autocast = reference((h16 @ w16.T).float())  # bf16 matmul output, upcast
    fp32_logits = reference(h16.float() @ w16.float().T)
    total, _, _, _ = _value_and_grads(
        jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(unembedding), jnp.asarray(labels), chunk_size, jnp.bfloat16
    )
    gap = abs(autocast - fp32_logits)
    assert gap > 2e-5 * abs(autocast)  # the two references are told apart at this size
    assert abs(float(total) - autocast) < 0.05 * gap
