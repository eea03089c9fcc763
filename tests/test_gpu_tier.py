"""The GPU tier: the paths only a GPU takes, against the XLA reference the CPU suite checks.

Run on a GPU whenever the step, loss, layers or attention change, and report the card:

    python -m pytest -m gpu -q

(tests/conftest.py keeps its CPU defaults out of a run whose ``-m`` names ``gpu``: ``conftest.gpu_tier_selected``;
any other run is pinned to the CPU, and every test here skips). Each test skips
unless ``jax.default_backend() == "gpu"``; on CPU the module costs one collection and no compile.

Tolerances are the CPU suite's for bf16 compute (tests/test_loss.py: loss rtol 2e-3, gradients 1.5e-2 of
the largest magnitude), and a kernel must be no less accurate than XLA's own bf16 attention against an
fp32 reference of the same inputs (both round the same inputs; a kernel that mixes examples or rows is off
by O(1), far outside either bound).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsft
from jaxsft.training import batching
from jaxsft.training.loss import causal_lm_loss
from jaxsft.models import layers as L

import tiny

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        jax.default_backend() != "gpu",
        reason=f"GPU tier: the backend is {jax.default_backend()!r}; on a GPU machine run pytest -m gpu",
    ),
]

GRAD_ATOL = 1.5e-2  # x the largest reference magnitude (tests/test_loss.py's bf16 bound)
LOSS_RTOL = 2e-3  # tests/test_loss.py's bf16 loss bound


def _rel_err(got, want) -> float:
    """Largest absolute difference over the largest reference magnitude."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _qkvg(rows=2, length=256, heads=8, kv_heads=2, dim=64, seed=0):
    kq, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (rows, length, heads, dim), jnp.bfloat16)
    k = jax.random.normal(kk, (rows, length, kv_heads, dim), jnp.bfloat16)
    v = jax.random.normal(kv, (rows, length, kv_heads, dim), jnp.bfloat16)
    g = jax.random.normal(kg, q.shape, jnp.float32)
    return q, k, v, g


def _value_and_grads(attend, q, k, v, g):
    """attend(q, k, v) and the gradients of sum(out * g) with respect to q, k, v."""

    def f(q, k, v):
        out = attend(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * g), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return [out, *grads]


def _fp32(*arrays):
    """The same (bf16-valued) inputs in fp32: the reference both kernels are measured against."""
    return [x.astype(jnp.float32) for x in arrays]


def _reference(attend, q, k, v, g):
    """fp32 attention of the same inputs with full-precision matmuls (no TF32 on the GPU)."""
    with jax.default_matmul_precision("highest"):
        return _value_and_grads(attend, *_fp32(q, k, v), g)


def _assert_kernel_as_accurate_as_xla(kernel, xla_bf16, reference, names=("out", "dq", "dk", "dv")):
    for name, got, xla, ref in zip(names, kernel, xla_bf16, reference):
        err, floor = _rel_err(got, ref), _rel_err(xla, ref)
        assert err <= max(2 * floor, 1e-2), f"{name}: kernel error {err:.2e} against XLA bf16's {floor:.2e}"


@pytest.mark.parametrize("window", [None, 64])
def test_cudnn_attention_matches_masked_xla_values_and_gradients(window):
    q, k, v, g = _qkvg()

    def attend(implementation):
        return lambda q, k, v: L.attention(q, k, v, mask=None, causal=True, sliding_window=window, implementation=implementation)

    cudnn = _value_and_grads(attend("cudnn"), q, k, v, g)
    xla = _value_and_grads(attend("xla"), q, k, v, g)
    reference = _reference(attend("xla"), q, k, v, g)
    _assert_kernel_as_accurate_as_xla(cudnn, xla, reference)


def _packed_segments(rows=4, length=512, seed=0):
    """Rows of several examples (16...200 tokens) end to end, then a padding tail, as the packer lays them."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((rows, length), np.int32)
    for r in range(rows):
        start, s = 0, 1
        while True:
            n = int(rng.integers(16, 200))
            if start + n > length - 8:
                break
            ids[r, start:start + n] = s
            start, s = start + n, s + 1
    return ids, L.Segments(jnp.asarray(ids), jnp.asarray(batching.segment_table(ids, 16)))


def test_ragged_cudnn_attention_matches_segment_masked_xla_values_and_gradients():
    """The packed path on cuDNN's ragged layout (segment offsets and lengths, no [T, T] mask) against XLA
    attention under the segment mask, on the real tokens (the padding tail's rows are undefined for cuDNN)."""
    ids, segments = _packed_segments()
    q, k, v, g = _qkvg(rows=ids.shape[0], length=ids.shape[1], heads=14, kv_heads=2, seed=1)
    real = jnp.asarray(ids > 0)[:, :, None, None]
    g = g * real  # no gradient flows from the padding tail

    def attend(implementation):
        return lambda q, k, v: L.packed_attention(
            q, k, v, segments, mask=None, sliding_window=None, implementation=implementation
        ) * real.astype(q.dtype)

    assert L.ragged_kernel_applies("cudnn", None, 0.0)
    cudnn = _value_and_grads(attend("cudnn"), q, k, v, g)
    xla = _value_and_grads(attend("xla"), q, k, v, g)
    reference = _reference(attend("xla"), q, k, v, g)
    _assert_kernel_as_accurate_as_xla(cudnn, xla, reference)


def _reference_loss_and_grads(hidden, unembedding, labels):
    """Shifted, masked cross entropy and its gradients in float64 on the host."""
    h, w = np.asarray(hidden, np.float64), np.asarray(unembedding, np.float64)
    targets = np.concatenate([labels[:, 1:], np.full((labels.shape[0], 1), -100)], axis=1)
    logits = h @ w.T
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    valid = targets != -100
    safe = np.where(valid, targets, 0)
    picked = np.take_along_axis(probs, safe[..., None], -1)[..., 0]
    loss = float(-np.log(picked)[valid].sum())
    dlogits = probs.copy()
    np.put_along_axis(dlogits, safe[..., None], np.take_along_axis(dlogits, safe[..., None], -1) - 1, -1)
    dlogits *= valid[..., None]
    return loss, dlogits @ w, np.einsum("blv,blh->vh", dlogits, h)


@pytest.mark.parametrize("chunk_size", [None, 128])
def test_bf16_logits_loss_matches_the_fp32_reference(chunk_size):
    rng = np.random.default_rng(0)
    b, length, hidden_size, vocab = 4, 128, 256, 2048
    hidden = rng.normal(size=(b, length, hidden_size)).astype(np.float32)
    unembedding = (rng.normal(size=(vocab, hidden_size)) / np.sqrt(hidden_size)).astype(np.float32)
    labels = rng.integers(0, vocab, size=(b, length)).astype(np.int32)
    labels[0, :40] = -100
    labels[2, -17:] = -100
    h16 = jnp.asarray(hidden, jnp.bfloat16)
    ref_loss, ref_gh, ref_gw = _reference_loss_and_grads(np.asarray(h16, np.float32), unembedding, labels)

    def loss(h, w):
        return causal_lm_loss(h, w, jnp.asarray(labels), chunk_size=chunk_size, compute_dtype=jnp.bfloat16)

    (total, _), (g_h, g_w) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(h16, jnp.asarray(unembedding))
    np.testing.assert_allclose(float(total), ref_loss, rtol=LOSS_RTOL)
    assert _rel_err(g_h, ref_gh) <= GRAD_ATOL
    assert _rel_err(g_w, ref_gw) <= GRAD_ATOL


def _ragged_calls(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = [5, 60, 9, 33, 3, 120, 18, 2, 47, 11, 90, 25, 7, 64, 14, 30]
    return [rng.integers(3, vocab, n).astype(np.int32) for n in lengths]


def _trainer(family="qwen2", **config):
    model = jaxsft.from_pretrained(tiny.tiny_torch_model(family, **config.pop("model", {})))
    cfg = jaxsft.TrainConfig(
        learning_rate=1e-4, per_device_train_batch_size=8, max_length=128, logging_steps=0, disable_tqdm=True,
        seed=3, lr_scheduler_type="constant", bf16=True, **config,
    )
    return jaxsft.IterativeSFTTrainer(model, cfg, mesh=jaxsft.single_device_mesh())


def _train(trainer, ids):
    stats = trainer.step(input_ids=ids, labels=ids)
    return stats["update_losses"], stats["grad_norm"]


def test_default_packs_on_gpu_and_packed_updates_equal_unpacked():
    ids = _ragged_calls(300)
    packed, plain = _trainer(), _trainer(packing=False)
    assert packed.packing is True and plain.packing is False  # the default resolves to packed rows here
    (got, got_norm), (want, want_norm) = _train(packed, ids), _train(plain, ids)
    assert len(want) == 2
    np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)
    np.testing.assert_allclose(got_norm, want_norm, rtol=1e-2)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_default_keeps_one_example_per_row_where_attention_is_masked_xla(family):
    """A sliding window (Mistral) or Gemma 2's soft cap and per-layer windows leave cuDNN's ragged kernel,
    so the default does not pack them, even on a GPU in bf16."""
    assert _trainer(family).packing is False


def test_gemm_settings_change_no_result():
    """jaxsft's GPU default (cuBLAS for every matmul from 768 wide) against XLA's own settings ({}: Triton
    GEMM fusions), on a model wide enough for the default to apply."""
    wide = dict(hidden_size=768, intermediate_size=1536, num_attention_heads=12, num_key_value_heads=4)
    ids = _ragged_calls(300, seed=1)
    default, xla = _trainer(model=wide), _trainer(model=wide, xla_options={})
    if not default.xla_options:
        pytest.skip("this XLA release accepts none of jaxsft's GPU compile defaults")
    assert default.xla_options != xla.xla_options
    (got, got_norm), (want, want_norm) = _train(default, ids), _train(xla, ids)
    np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)
    np.testing.assert_allclose(got_norm, want_norm, rtol=1e-2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_add_rms_norm_kernel_equals_its_xla_form_compiled(dtype):
    """The Pallas Triton kernel compiled for this GPU, at Qwen2.5-0.5B's width (896 of 1024 lanes masked in)."""
    from jaxsft.kernels import add_rms_norm as fused

    from test_kernels import BF16_ULPS, _inputs, assert_close_to, outputs_and_grads

    assert fused.kernel_applies(896)
    args = _inputs((4, 250, 896), jnp.dtype(dtype))
    tolerance = 1e-5 if dtype == "float32" else BF16_ULPS
    assert_close_to(outputs_and_grads("pallas", *args), outputs_and_grads("xla", *args), tolerance)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_model_with_the_fused_norm_adds_no_error_beyond_bf16_rounding_compiled(family):
    """``norm_implementation="auto"`` takes the kernel on this GPU; a tiny bf16 model's logits and every gradient are
    no further from the fp32 model's than XLA's bf16 form is, within half again (Llama's norm, and Gemma's
    ``1 + w`` form). Compared with fp32, not with XLA's bf16 form: the two round at different points, and on an
    H100 Gemma 2's ``q_proj`` gradient differed between them by 1.9 % of its largest entry, where on the CPU each is
    1.6-1.8 % from fp32 (tests/test_fused_norm_model.py:bf16_errors)."""
    from test_fused_norm_model import _calls_the_kernel, _view, assert_within_bf16_rounding, bf16_errors

    model = jaxsft.from_pretrained(tiny.tiny_torch_model(family), dtype=jnp.bfloat16)
    assert _calls_the_kernel(_view(model, "auto", False)) and not _calls_the_kernel(_view(model, "xla", False))
    assert_within_bf16_rounding(bf16_errors(family, "auto"))


# ----------------------------------------------------------------------------- the decode-attention kernels
def _decode_case(rng, n: int):
    """bf16 random caches at Qwen2.5-0.5B's head layout (14 query heads over 2 KV heads of 64): 16 groups of ``n``
    rows, prompts of 128 slots left-padded to ragged lengths, continuations of 256 slots filled to ragged lengths.
    Returns (a bf16 random-array maker, the layer's cache, the rows' view, (rows, KV heads, heads per KV head, D))."""
    from jaxsft.generation import kv_cache

    groups, kv, h, d, lp, ls = 16, 2, 7, 64, 128, 256
    b = groups * n
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.bfloat16)  # noqa: E731
    real = rng.integers(1, lp + 1, size=groups)
    index = jnp.asarray(rng.integers(0, ls, size=b), jnp.int32)
    layer = kv_cache.LayerKV(f(groups, kv, lp, d), f(groups, kv, lp, d), f(b, kv, ls, d), f(b, kv, ls, d))
    rows = kv_cache.RowView(suffix_index=index,
                            prefix_mask=jnp.asarray(np.arange(lp)[None, :] >= (lp - real)[:, None]),
                            query_pos=jnp.repeat(jnp.asarray(real, jnp.int32), n) + index,
                            prefix_pos=jnp.zeros((groups, lp), jnp.int32))
    return f, layer, rows, (b, kv, h, d)


@pytest.mark.parametrize("which", ["fused", "fused_write", "pallas"])
@pytest.mark.parametrize("n", [1, 8])
def test_decode_attention_kernels_equal_the_xla_form_compiled(monkeypatch, n, which):
    """The engine's decode-attention kernels (``fused``: one pass per row and KV head; ``pallas``: jax's decode
    kernel twice, prompt once per group, merged) reading the prompt from its first real slot and the continuation
    up to its filled length, against
    the XLA form, bf16 at Qwen2.5-0.5B's head layout (14 query heads over 2 KV heads of 64), ragged prompts and
    continuations; bf16 probabilities on both sides, so the bound is a few bf16 ulps of the output scale."""
    from jaxsft.generation import kv_cache
    from jaxsft.kernels import decode_attention as kernel

    rng = np.random.default_rng(n)
    f, layer, rows, (b, kv, h, d) = _decode_case(rng, n)
    q, k, v = f(b, 1, kv * h, d), f(b, 1, kv, d), f(b, 1, kv, d)
    run = jax.jit(lambda q, k, v, layer, rows: kv_cache.shared_prefix_attention((q, k, v), layer, rows, None))
    monkeypatch.setenv(kernel.ENV, "xla")
    ref, ref_layer = run(q, k, v, layer, rows)
    ref = np.asarray(ref, np.float32)
    monkeypatch.setenv(kernel.ENV, which)
    run = jax.jit(lambda q, k, v, layer, rows: kv_cache.shared_prefix_attention((q, k, v), layer, rows, None))
    assert "triton" in run.lower(q, k, v, layer, rows).as_text()  # the kernels, not the XLA form
    out, out_layer = run(q, k, v, layer, rows)
    out = np.asarray(out, np.float32)
    np.testing.assert_allclose(out, ref, rtol=3e-2, atol=3e-2 * np.abs(ref).max())
    np.testing.assert_array_equal(np.asarray(out_layer.suffix_k), np.asarray(ref_layer.suffix_k))  # the token's K/V
    np.testing.assert_array_equal(np.asarray(out_layer.suffix_v), np.asarray(ref_layer.suffix_v))
    run = jax.jit(lambda q, k, v, layer, rows: kv_cache.shared_prefix_attention((q, k, v), layer, rows, None)[0])
    if which != "pallas":  # finished rows (every third) read nothing and give zeros; the live rows are unchanged
        live = np.arange(b) % 3 != 0
        out = np.asarray(run(q, k, v, layer, rows._replace(live=jnp.asarray(live))), np.float32)
        np.testing.assert_allclose(out[live], ref[live], rtol=3e-2, atol=3e-2 * np.abs(ref).max())
        np.testing.assert_array_equal(out[~live], 0.0)


@pytest.mark.parametrize("n, splits", [(1, 1), (8, 1), (1, 3), (8, 4)])
def test_projection_kernel_equals_the_xla_form_compiled(monkeypatch, n, splits):
    """The decode kernel that takes a layer's joined q/k/v projection (split, bias and RoPE inside) against the XLA
    form of the same layer (the model's split, bias and RoPE, then XLA attention), compiled, bf16 at Qwen2.5-0.5B's
    head layout (14 query heads over 2 KV heads of 64, q/k/v biases), real RoPE tables at ragged positions; every
    third row finished; in one program per (row, KV head) and split over ``splits`` (flash-decoding). Bounds as for
    the other decode kernels; the cached key and value within one bf16 rounding."""
    from jaxsft.generation import kv_cache
    from jaxsft.kernels import decode_attention as kernel
    from jaxsft.models.layers import JoinedQKV

    rng = np.random.default_rng(10 + n)
    f, layer, rows, (b, kv, h, d) = _decode_case(rng, n)
    rows = rows._replace(live=jnp.asarray(np.arange(b) % 3 != 0))
    query_pos = rows.query_pos
    inv = 1.0 / (1e6 ** (np.arange(0, d, 2) / d))
    angles = np.asarray(query_pos)[:, None, None] * inv[None, None, :]
    rope = tuple(jnp.asarray(np.concatenate([g(angles)] * 2, axis=-1), jnp.bfloat16) for g in (np.cos, np.sin))
    joined = JoinedQKV(f(b, 1, (kv * h + 2 * kv) * d), f((kv * h + 2 * kv) * d), rope, kv * h, kv, d)

    def run():
        return jax.jit(lambda j, layer, rows: kv_cache.shared_prefix_attention(j, layer, rows, None))

    monkeypatch.setenv(kernel.ENV, "xla")
    ref, ref_layer = run()(joined, layer, rows)
    monkeypatch.setenv(kernel.ENV, "auto")  # the default takes the projection kernel on GPU
    monkeypatch.setenv(kernel.TILING_ENV, f"64,2,3,{splits}")
    text = run().lower(joined, layer, rows).as_text()
    assert "triton" in text and "stablehlo.concatenate" not in text  # the kernel, and no XLA rotate-half around it
    out, out_layer = run()(joined, layer, rows)
    live = np.asarray(rows.live)
    ref, out = np.asarray(ref, np.float32), np.asarray(out, np.float32)
    np.testing.assert_allclose(out[live], ref[live], rtol=3e-2, atol=3e-2 * np.abs(ref).max())
    np.testing.assert_array_equal(out[~live], 0.0)
    for got, want in ((out_layer.suffix_k, ref_layer.suffix_k), (out_layer.suffix_v, ref_layer.suffix_v)):
        got, want = np.asarray(got, np.float32)[live], np.asarray(want, np.float32)[live]
        np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=2 ** -7 * np.abs(want).max())


def test_right_aligned_prefill_takes_cudnn_and_equals_the_masked_prefill():
    """Generation's prefill on GPU in bf16: the right-aligned form (no padding mask) compiles to cuDNN attention and
    gives the masked XLA prefill's last-token logits and real-slot K/V within bf16 rounding, with left padding."""
    from jaxsft.generation import engine
    from test_engine import prefill_right_and_masked, real_prompt_kv

    model = jaxsft.from_pretrained(tiny.tiny_torch_model("llama"), dtype="bfloat16")
    rng = np.random.default_rng(0)
    lengths = np.array([64, 40, 9, 1])
    mask = jnp.asarray((np.arange(64)[None, :] >= (64 - lengths)[:, None]).astype(np.int32))
    ids = jnp.asarray(np.where(mask > 0, rng.integers(3, 200, size=(4, 64)), 0).astype(np.int32))
    runs = prefill_right_and_masked(model, engine.Shape(groups=4, n=1, prompt_slots=64, new_slots=8))
    assert "cudnn" in runs["right"].lower(ids, mask).compile().as_text().lower()
    (right_cache, right_logits), (masked_cache, masked_logits) = (runs[name](ids, mask) for name in ("right", "masked"))
    want = np.asarray(masked_logits, np.float32)
    np.testing.assert_allclose(np.asarray(right_logits, np.float32), want, atol=3e-2 * np.abs(want).max())
    for got, ref in zip(real_prompt_kv(right_cache, mask), real_prompt_kv(masked_cache, mask)):
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a, b, atol=3e-2 * np.abs(b).max())
