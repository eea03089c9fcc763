"""The hand-written backward of RMSNorm against autodiff of the same forward, and against torch.

Tolerances: fp32 1e-5 relative (the two backward formulas round differently, ~1e-7 observed);
bf16 inputs: within 2 bf16 ulps of the largest gradient (both sides round the stream-dtype product).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxsft.models import layers as L

EPS = 1e-6


def _autodiff_rms_norm(x, scale, eps):
    """HF's formula, differentiated by JAX (what layers.rms_norm did before its custom backward)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def _grads(norm, x, scale, cotangent):
    return jax.jit(jax.grad(lambda x, s: jnp.sum(norm(x, s, EPS).astype(jnp.float32) * cotangent), argnums=(0, 1)))(x, scale)


@pytest.mark.parametrize("shape", [(3, 7, 16), (2, 5, 4, 8)])  # a stream, and per-head q/k norms [B, T, heads, d]
def test_rms_norm_backward_matches_autodiff_and_torch_in_fp32(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32) * 3.0
    scale = (1.0 + 0.1 * rng.normal(size=shape[-1:])).astype(np.float32)
    cot = rng.normal(size=shape).astype(np.float32)
    got = _grads(L.rms_norm, jnp.asarray(x), jnp.asarray(scale), jnp.asarray(cot))
    ref = _grads(_autodiff_rms_norm, jnp.asarray(x), jnp.asarray(scale), jnp.asarray(cot))
    np.testing.assert_allclose(np.asarray(L.rms_norm(x, scale, EPS)), np.asarray(_autodiff_rms_norm(x, scale, EPS)), rtol=1e-6)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6 * np.abs(r).max())

    tx, ts = torch.tensor(x, requires_grad=True), torch.tensor(scale, requires_grad=True)
    y = ts * (tx * torch.rsqrt(tx.pow(2).mean(-1, keepdim=True) + EPS))
    (y * torch.tensor(cot)).sum().backward()
    np.testing.assert_allclose(np.asarray(got[0]), tx.grad.numpy(), rtol=1e-5, atol=1e-6 * np.abs(tx.grad.numpy()).max())
    np.testing.assert_allclose(np.asarray(got[1]), ts.grad.numpy(), rtol=1e-5)


def test_rms_norm_backward_in_bf16_is_no_less_accurate_than_autodiff():
    """Against the fp32 gradient of the same (bf16-valued) inputs: the custom backward sums the weight's
    gradient in fp32, autodiff in bf16, so it must be at least as close, and within 2 bf16 ulps."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 9, 32)) * 2.0, jnp.bfloat16)
    scale = jnp.asarray(1.0 + 0.1 * rng.normal(size=(32,)), jnp.bfloat16)
    cot = jnp.asarray(jnp.asarray(rng.normal(size=(4, 9, 32)), jnp.bfloat16), jnp.float32)
    got = _grads(L.rms_norm, x, scale, cot)
    auto = _grads(_autodiff_rms_norm, x, scale, cot)
    exact = _grads(_autodiff_rms_norm, x.astype(jnp.float32), scale.astype(jnp.float32), cot)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.bfloat16
    for g, a, e in zip(got, auto, exact):
        e = np.asarray(e)
        err, err_auto = (np.abs(np.asarray(v, np.float32) - e).max() for v in (g, a))
        assert err <= 2 * 2**-8 * np.abs(e).max()
        assert err <= err_auto * 1.01 + 2**-8 * np.abs(e).max() * 0.5
