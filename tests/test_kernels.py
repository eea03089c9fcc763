"""jaxsft.kernels against their XLA forms, in Pallas interpret mode (the kernel's own code, run on CPU).

Values and gradients of the fused residual add + RMSNorm: fp32 inputs within 1e-5 of the largest
magnitude (both forms compute the same formulas; only summation order differs), bf16 inputs within 2 bf16
ulps of the largest magnitude (XLA may keep an intermediate product in fp32 where the kernel rounds it,
as the stream dtype says). The kernels also lower for CUDA here (Pallas Triton lowering, no GPU needed); the
compiled kernel is checked on a GPU in tests/test_gpu_tier.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.kernels import add_rms_norm as fused

BF16_ULPS = 2 * 2.0**-8


def _inputs(shape, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    h = jax.random.normal(k[0], shape, jnp.float32).astype(dtype)
    delta = jax.random.normal(k[1], shape, jnp.float32).astype(dtype)
    scale = 1.0 + 0.1 * jax.random.normal(k[2], shape[-1:], jnp.float32)
    g_s = jax.random.normal(k[3], shape, jnp.float32)
    g_y = jax.random.normal(k[4], shape, jnp.float32)
    return h, delta, scale, g_s, g_y


def outputs_and_grads(implementation, h, delta, scale, g_s, g_y, eps=1e-6, plus_one=False):
    """(s, y, dh, d_delta, d_scale) of sum(s * g_s) + sum(y * g_y): both outputs carry a cotangent."""

    def f(h, delta, scale):
        s, y = fused.add_rms_norm(h, delta, scale, eps, implementation=implementation, plus_one=plus_one)
        return jnp.sum(s.astype(jnp.float32) * g_s) + jnp.sum(y.astype(jnp.float32) * g_y), (s, y)

    (_, (s, y)), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(h, delta, scale)
    return [s, y, *grads]


def assert_close_to(got, want, tolerance, names=("s", "y", "dh", "d_delta", "d_scale")):
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err <= tolerance, f"{name}: {err:.2e} of the largest magnitude"


@pytest.mark.parametrize("plus_one", [False, True], ids=["llama_norm", "gemma_norm"])
def test_kernel_equals_the_xla_form_in_fp32(plus_one):
    args = _inputs((3, 13, 96), jnp.float32)  # 39 rows: not a block multiple; 96 lanes of 128: a masked tail
    assert_close_to(outputs_and_grads("pallas", *args, plus_one=plus_one),
                    outputs_and_grads("xla", *args, plus_one=plus_one), 1e-5)


@pytest.mark.parametrize("plus_one", [False, True], ids=["llama_norm", "gemma_norm"])
def test_kernel_equals_the_xla_form_in_bf16(plus_one):
    args = _inputs((2, 19, 96), jnp.bfloat16, seed=1)
    assert_close_to(outputs_and_grads("pallas", *args, plus_one=plus_one),
                    outputs_and_grads("xla", *args, plus_one=plus_one), BF16_ULPS)


def test_the_gemma_form_differs_from_the_llama_form():
    """So the parametrised comparisons above could tell the two apart (scale near 1: ``1 + w`` is near 2)."""
    args = _inputs((2, 5, 96), jnp.float32)
    llama, gemma = outputs_and_grads("pallas", *args), outputs_and_grads("pallas", *args, plus_one=True)
    assert not np.allclose(np.asarray(llama[1]), np.asarray(gemma[1]), rtol=0.1)


def test_auto_takes_the_xla_form_off_gpu_and_bad_arguments_are_refused():
    assert fused.kernel_applies(896, backend="gpu") and not fused.kernel_applies(896, backend="cpu")
    assert not fused.kernel_applies(896, backend="tpu") and not fused.kernel_applies(32768, backend="gpu")
    h, delta, scale, _, _ = _inputs((4, 8), jnp.float32)
    with pytest.raises(ValueError, match="implementation"):
        fused.add_rms_norm(h, delta, scale, 1e-6, implementation="triton")
    with pytest.raises(ValueError, match="scale"):
        fused.add_rms_norm(h, delta, scale[:4], 1e-6)


@pytest.mark.parametrize("plus_one", [False, True], ids=["llama_norm", "gemma_norm"])
def test_kernels_lower_to_triton_for_a_gpu_on_any_host(plus_one):
    """Lowering for CUDA runs the Pallas Triton lowering (block shapes, masked loads, every op the kernels use)
    without a GPU, so a kernel the GPU could not take fails here, in the CPU suite, not first on a GPU."""
    rows, hidden = 6, 896  # 896 of 1024 lanes

    def forward_and_backward(h, delta, scale, g_s, g_y):
        def f(*args):
            return fused.add_rms_norm(*args, 1e-6, implementation="pallas", interpret=False, plus_one=plus_one)

        out, vjp = jax.vjp(f, h, delta, scale)
        return out, vjp((g_s, g_y))

    x = jax.ShapeDtypeStruct((rows, hidden), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((hidden,), jnp.float32)
    lowered = jax.jit(forward_and_backward).trace(x, x, w, x, x).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 2  # the forward and the backward kernel


def test_a_kernel_form_is_lowered_once_per_program_however_many_sites_call_it():
    """A layer calls the kernel at two sites of one shape, and a program's layers all share it: each form (shape,
    dtype, flags) is lowered to Triton once and called from every site. Lowering a fresh Triton module at each site
    took about half of a 0.5B training program's lowering (benchmarks/RESULTS.md, nineteenth session). Another
    shape, or Gemma's ``1 + w`` form, is another form and gets a module of its own."""
    hidden = 896

    def two_sites(h, d1, d2, scale, plus_one=False):
        def f(h, d1, d2, scale):
            s, y = fused.add_rms_norm(h, d1, scale, 1e-6, implementation="pallas", interpret=False)
            s2, y2 = fused.add_rms_norm(s, d2 + y, scale, 1e-6, implementation="pallas", interpret=False,
                                        plus_one=plus_one)
            # squares: every output's value is needed by the backward, so no site's program is pruned to a variant
            return jnp.sum(jnp.square(s2.astype(jnp.float32))) + jnp.sum(jnp.square(y2.astype(jnp.float32)))

        return jax.grad(f, argnums=(0, 1, 2, 3))(h, d1, d2, scale)

    def kernel_modules(rows: int, plus_one: bool = False) -> int:
        x = jax.ShapeDtypeStruct((rows, hidden), jnp.bfloat16)
        w = jax.ShapeDtypeStruct((hidden,), jnp.float32)
        lowered = jax.jit(lambda *a: two_sites(*a, plus_one=plus_one)).trace(x, x, x, w).lower(
            lowering_platforms=("cuda",))
        return lowered.as_text().count("xla.gpu.triton")

    assert kernel_modules(rows=40) == 2  # one forward and one backward module for both sites
    assert kernel_modules(rows=24) == 2  # a new shape: lowered anew (not a stale module of the first)
    assert kernel_modules(rows=40, plus_one=True) == 4  # the second site's Gemma form is a form of its own
