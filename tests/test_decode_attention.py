"""The decode-attention kernels (jaxsft.kernels.decode_attention) against the engine's XLA form, in Pallas interpret
mode on CPU: values (ragged prompts, continuations filled to different lengths), continuations read only as far as
they are filled,
and the rule that picks them (compiled on a GPU in tests/test_gpu_tier.py)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.generation import kv_cache
from jaxsft.kernels import decode_attention as kernel


def _case(groups, n, kv, h, d, lp, ls, dtype, seed=0):
    """Random caches with ragged prompts (left-padded) and continuations filled to different lengths."""
    rng = np.random.default_rng(seed)
    b = groups * n
    f = lambda *s: jnp.asarray(rng.normal(size=s), dtype)  # noqa: E731
    real = rng.integers(1, lp + 1, size=groups)
    real[0] = lp  # one prompt fills its bucket
    prefix_mask = jnp.asarray(np.arange(lp)[None, :] >= (lp - real)[:, None])
    index = jnp.asarray(rng.integers(0, ls, size=b), jnp.int32)  # this token's continuation index
    layer = kv_cache.LayerKV(f(groups, kv, lp, d), f(groups, kv, lp, d), f(b, kv, ls, d), f(b, kv, ls, d))
    query_pos = jnp.repeat(jnp.asarray(real, jnp.int32), n) + index
    rows = kv_cache.RowView(suffix_index=index, prefix_mask=prefix_mask, query_pos=query_pos,
                            prefix_pos=jnp.zeros((groups, lp), jnp.int32))
    return f(b, 1, kv * h, d), f(b, 1, kv, d), f(b, 1, kv, d), layer, rows


@pytest.mark.parametrize("which", ["fused", "fused_write", "pallas"])
@pytest.mark.parametrize("n, h", [(1, 7), (4, 2), (3, 4)])
def test_kernel_equals_the_xla_form(monkeypatch, n, h, which):
    """Groups of n samples over 2 KV heads with h query heads each: the one-pass kernel, and the two passes merged, equal the XLA
    softmax over prompt + own continuation, and the cache comes back with this token's K/V in its slot, as XLA writes it
    (``fused_write`` writes it inside the kernel, into the aliased buffers, and reads the new K/V from registers). fp32 here
    (XLA:CPU has no bf16 x bf16 -> f32 dot); bf16 is compared compiled in the GPU tier."""
    q, k, v, layer, rows = _case(groups=3, n=n, kv=2, h=h, d=16, lp=32, ls=64, dtype=jnp.float32)
    monkeypatch.setenv(kernel.ENV, "xla")
    ref, ref_layer = kv_cache.shared_prefix_attention((q, k, v), layer, rows, None, scale=0.3)
    monkeypatch.setenv(kernel.ENV, which)
    out, out_layer = kv_cache.shared_prefix_attention((q, k, v), layer, rows, None, scale=0.3)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(out_layer.suffix_k), np.asarray(ref_layer.suffix_k))
    np.testing.assert_array_equal(np.asarray(out_layer.suffix_v), np.asarray(ref_layer.suffix_v))


@pytest.mark.parametrize("which", ["fused", "fused_write", "pallas"])
def test_continuation_blocks_past_the_filled_length_are_never_read(monkeypatch, which):
    """NaN in every continuation slot from the second 64-slot block on, rows filled to under 64 slots: the kernel
    pass stops at the filled block, so its output equals the clean reference; the XLA form, which reads every
    slot (masked, but 0 * NaN is NaN), turns NaN: the test tells the two reading patterns apart."""
    q, k, v, layer, rows = _case(groups=2, n=2, kv=2, h=2, d=16, lp=32, ls=256, dtype=jnp.float32, seed=1)
    rows = rows._replace(suffix_index=rows.suffix_index % 60)
    monkeypatch.setenv(kernel.ENV, "xla")
    ref, _ = kv_cache.shared_prefix_attention((q, k, v), layer, rows, None)
    late = np.arange(256)[None, None, :, None] >= 64
    poisoned = layer._replace(suffix_k=jnp.where(late, jnp.nan, layer.suffix_k),
                              suffix_v=jnp.where(late, jnp.nan, layer.suffix_v))
    assert np.isnan(np.asarray(kv_cache.shared_prefix_attention((q, k, v), poisoned, rows, None)[0])).any()
    monkeypatch.setenv(kernel.ENV, which)
    out, _ = kv_cache.shared_prefix_attention((q, k, v), poisoned, rows, None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("which", ["fused", "fused_write"])
def test_finished_rows_read_nothing_and_live_rows_are_unchanged(monkeypatch, which):
    """The drain tail: rows marked finished (``live`` False) read none of their K/V. Their continuation slots, and
    the prompt of a group whose rows have all finished, are NaN here; the live rows still equal the clean XLA
    reference and the finished rows come out as zeros, not NaN (nothing read, nothing divided by zero)."""
    groups, n = 3, 2
    q, k, v, layer, rows = _case(groups=groups, n=n, kv=2, h=4, d=16, lp=32, ls=64, dtype=jnp.float32, seed=2)
    live = np.array([True, False, False, False, True, True])  # group 1: both finished; group 0: one of two
    monkeypatch.setenv(kernel.ENV, "xla")
    ref, _ = kv_cache.shared_prefix_attention((q, k, v), layer, rows, None)
    dead_row = ~live[:, None, None, None]
    dead_group = ~live.reshape(groups, n).any(axis=1)[:, None, None, None]
    poisoned = layer._replace(suffix_k=jnp.where(dead_row, jnp.nan, layer.suffix_k),
                              suffix_v=jnp.where(dead_row, jnp.nan, layer.suffix_v),
                              prefix_k=jnp.where(dead_group, jnp.nan, layer.prefix_k),
                              prefix_v=jnp.where(dead_group, jnp.nan, layer.prefix_v))
    monkeypatch.setenv(kernel.ENV, which)
    out, _ = kv_cache.shared_prefix_attention((q, k, v), poisoned, rows._replace(live=jnp.asarray(live)), None)
    out = np.asarray(out)
    np.testing.assert_allclose(out[live], np.asarray(ref)[live], rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(out[~live], 0.0)
    # Without ``live`` the same poisoned cache is read, and the finished rows turn NaN: the skip is what the test sees.
    assert np.isnan(np.asarray(kv_cache.shared_prefix_attention((q, k, v), poisoned, rows, None)[0])[~live]).any()


def _joined_case(n, h, d, biased, rotate, seed=3):
    """A layer's joined projection (query heads, key heads, value heads), its bias and RoPE tables, beside the
    random caches of :func:`_case`."""
    from jaxsft.models.layers import JoinedQKV

    _, _, _, layer, rows = _case(groups=3, n=n, kv=2, h=h, d=d, lp=32, ls=64, dtype=jnp.float32, seed=seed)
    rng = np.random.default_rng(seed + 10)
    b, width = 3 * n, (2 * h + 4) * d
    angles = rng.uniform(0, 6.3, size=(b, 1, d // 2))
    rope = tuple(jnp.asarray(np.concatenate([f(angles)] * 2, axis=-1), jnp.float32) for f in (np.cos, np.sin))
    joined = JoinedQKV(jnp.asarray(rng.normal(size=(b, 1, width)), jnp.float32),
                       jnp.asarray(rng.normal(size=width), jnp.float32) if biased else None,
                       rope if rotate else None, 2 * h, 2, d)
    return joined, layer, rows


@pytest.mark.parametrize("biased, rotate, splits", [(True, True, 1), (False, True, 1), (True, False, 1), (True, True, 3)])
@pytest.mark.parametrize("n, h, d", [(1, 7, 64), (4, 2, 32)])
def test_projection_kernel_equals_the_xla_form(monkeypatch, n, h, d, biased, rotate, splits):
    """The kernel that takes the joined q/k/v projection (splitting it, adding the bias and rotating q and k inside)
    against the XLA form of the same layer (``JoinedQKV.split``: the model's own split, bias and RoPE, then the XLA
    attention): the output, and the cache with this token's rotated key and biased value in its slot, for rows with
    and without finished ones; in one program per (row, KV head) and, with ``splits``, in several, each over its
    share of the slots (blocks of 16, so a share starts and ends inside a block), merged after. fp32 (interpret
    mode)."""
    joined, layer, rows = _joined_case(n, h, d, biased, rotate)
    monkeypatch.setenv(kernel.ENV, "xla")
    ref, ref_layer = kv_cache.shared_prefix_attention(joined, layer, rows, None, scale=0.3)
    monkeypatch.setenv(kernel.ENV, "fused_projection")
    if splits > 1:
        monkeypatch.setenv(kernel.TILING_ENV, f"16,2,3,{splits}")
    out, out_layer = kv_cache.shared_prefix_attention(joined, layer, rows, None, scale=0.3)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(out_layer.suffix_k), np.asarray(ref_layer.suffix_k), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out_layer.suffix_v), np.asarray(ref_layer.suffix_v), rtol=1e-6, atol=1e-6)
    live = np.arange(3 * n) % 3 != 0
    out, _ = kv_cache.shared_prefix_attention(joined, layer, rows._replace(live=jnp.asarray(live)), None, scale=0.3)
    np.testing.assert_allclose(np.asarray(out)[live], np.asarray(ref)[live], rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(out)[~live], 0.0)


@pytest.mark.parametrize("splits", [1, 3])
def test_projection_kernel_reads_only_filled_slots_of_live_rows(monkeypatch, splits):
    """NaN in every 16-slot continuation block past the one holding each row's last filled slot, and in all of a
    finished row's K/V: the projection kernel (blocks of 16), whole or split over programs, loads none of it, so
    live rows equal the clean XLA reference and finished rows come out as zeros, not NaN."""
    joined, layer, rows = _joined_case(2, 7, 64, True, True, seed=5)
    live = np.array([True, False, True, True, False, True])
    monkeypatch.setenv(kernel.ENV, "xla")
    ref, _ = kv_cache.shared_prefix_attention(joined, layer, rows, None, scale=0.3)
    first_unread = -(-np.asarray(rows.suffix_index) // 16) * 16  # the filled slots' blocks, rounded up
    slots = np.arange(layer.suffix_k.shape[2])[None, None, :, None]
    unread = (slots >= first_unread[:, None, None, None]) | ~live[:, None, None, None]
    poisoned = layer._replace(suffix_k=jnp.where(unread, jnp.nan, layer.suffix_k),
                              suffix_v=jnp.where(unread, jnp.nan, layer.suffix_v))
    monkeypatch.setenv(kernel.ENV, "fused_projection")
    monkeypatch.setenv(kernel.TILING_ENV, f"16,2,3,{splits}")
    out, _ = kv_cache.shared_prefix_attention(joined, poisoned, rows._replace(live=jnp.asarray(live)), None, scale=0.3)
    out = np.asarray(out)
    np.testing.assert_allclose(out[live], np.asarray(ref)[live], rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(out[~live], 0.0)


def test_projection_kernel_rotates_and_biases_what_it_reads():
    """The same joined projection read without its bias, or without RoPE, gives other outputs and another cached
    key: the kernel's bias and rotation are not no-ops that the equality above could miss."""
    joined, layer, rows = _joined_case(2, 2, 32, True, True)

    def run(j):
        return kernel.projection_attention_with_write(
            j.out, j.bias, j.rope, layer.prefix_k, layer.prefix_v, jnp.zeros(3, jnp.int32), layer.suffix_k,
            layer.suffix_v, rows.suffix_index, 0.3, heads=j.heads)

    out, sk, _ = run(joined)
    for other in (dataclasses.replace(joined, bias=None), dataclasses.replace(joined, rope=None)):
        out2, sk2, _ = run(other)
        assert np.abs(np.asarray(out2) - np.asarray(out)).max() > 1e-3
        assert np.abs(np.asarray(sk2) - np.asarray(sk)).max() > 1e-3


@pytest.mark.parametrize("splits", [1, 4])
def test_projection_kernel_is_the_only_kernel_between_the_projection_and_the_output(monkeypatch, splits):
    """Lowered for CUDA on any host: the joined projection goes into one Triton kernel, which updates both cache
    buffers in place; no split, concatenate (RoPE's rotate-half), pad or cache write runs in XLA around it (split
    over programs, only the merge's reductions follow it)."""
    monkeypatch.setenv(kernel.TILING_ENV, f"64,2,3,{splits}")
    joined, layer, rows = _joined_case(4, 7, 64, True, True)
    cast = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
    joined = dataclasses.replace(joined, out=cast(joined.out), bias=cast(joined.bias), rope=tuple(map(cast, joined.rope)))
    layer = jax.tree.map(cast, layer)

    def attend(out, bias, rope, layer, index):
        return kernel.projection_attention_with_write(out, bias, rope, layer.prefix_k, layer.prefix_v,
                                                      jnp.zeros(3, jnp.int32), layer.suffix_k, layer.suffix_v, index,
                                                      0.125, heads=14, interpret=False)

    text = jax.jit(attend).trace(joined.out, joined.bias, joined.rope, layer, rows.suffix_index).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1
    for op in ("stablehlo.concatenate", "stablehlo.slice", "stablehlo.pad", "dynamic_update_slice", "scatter"):
        assert op not in text, op
    assert "output_operand_aliases" in text


def test_the_rule_picks_the_kernel_on_gpu_for_plain_layers_only(monkeypatch):
    assert kernel.kernel_applies(64, None, None, backend="gpu", choice="auto")
    assert not kernel.kernel_applies(64, None, None, backend="cpu", choice="auto")
    assert not kernel.kernel_applies(64, None, None, backend="tpu", choice="auto")
    assert not kernel.kernel_applies(64, 4096, None, backend="gpu", choice="auto")  # sliding window: XLA
    assert not kernel.kernel_applies(256, None, 50.0, backend="gpu", choice="auto")  # soft cap: XLA
    assert not kernel.kernel_applies(80, None, None, backend="gpu", choice="auto")  # not a power of two
    assert not kernel.kernel_applies(64, None, None, backend="gpu", choice="xla")
    assert kernel.kernel_applies(64, None, None, backend="cpu", choice="fused")  # interpret mode off GPU
    assert kernel.kernel_applies(64, None, None, backend="cpu", choice="fused_write")
    assert kernel.kernel("fused_write") is kernel.one_pass_attention_with_write
    assert kernel.kernel("auto") is kernel.one_pass_attention_with_write  # split q/k/v on GPU: the one pass with write
    # A layer that hands over its joined projection: the projection kernel under auto on a GPU (the measured default;
    # XLA on CPU and TPU), when named on any backend (interpret mode off GPU), halves of >= 32 columns, global layers.
    assert kernel.projection_applies(64, None, None, backend="gpu", choice="auto")
    assert not kernel.projection_applies(64, None, None, backend="cpu", choice="auto")
    assert not kernel.projection_applies(64, None, None, backend="tpu", choice="auto")
    assert kernel.projection_applies(64, None, None, backend="gpu", choice="fused_projection")
    assert kernel.projection_applies(64, None, None, backend="cpu", choice="fused_projection")
    assert not kernel.projection_applies(64, None, None, backend="gpu", choice="xla")
    assert not kernel.projection_applies(16, None, None, backend="gpu", choice="fused_projection")
    assert not kernel.projection_applies(64, 4096, None, backend="gpu", choice="fused_projection")
    assert not kernel.projection_applies(64, None, None, backend="gpu", choice="fused_write")
    # Its tiling follows the call's program count (rows x KV heads): few programs, two warps and three stages.
    assert kernel.configured_tiling(64 * 3) == kernel.FEW_PROGRAMS_TILING != kernel.TILING
    assert kernel.configured_tiling(512 * 2) == kernel.TILING
    monkeypatch.setenv(kernel.TILING_ENV, "128,8,3")
    assert kernel.configured_tiling(64) == kernel.configured_tiling(4096) == kernel.Tiling(128, 8, 3)
    monkeypatch.setenv(kernel.TILING_ENV, "64,2,3,4")
    assert kernel.configured_tiling(64) == kernel.Tiling(64, 2, 3, 4)
    for bad in ("96,4,2", "64,4", "a,b,c", "64,0,2", "64,2,3,0", "64,2,3,4,1"):
        monkeypatch.setenv(kernel.TILING_ENV, bad)
        with pytest.raises(ValueError, match="JAXSFT_DECODE_TILING"):
            kernel.configured_tiling(64)
    monkeypatch.delenv(kernel.TILING_ENV)
    assert kernel.configured_tiling(4096) == kernel.TILING
    monkeypatch.setenv(kernel.ENV, "fast")
    with pytest.raises(ValueError, match="JAXSFT_DECODE_ATTENTION='fast'"):
        kernel.implementation()


def test_kernels_lower_to_triton_for_a_gpu_on_any_host(monkeypatch):
    """Lowering for CUDA runs the Pallas Triton lowering of both passes without a GPU (block shapes, masks)."""
    monkeypatch.setenv(kernel.ENV, "pallas")
    q, k, v, layer, rows = _case(groups=2, n=4, kv=2, h=7, d=64, lp=128, ls=256, dtype=jnp.bfloat16)

    def attend(q, k, v, layer, rows):
        return kernel.shared_prefix_attention(q, layer.prefix_k, layer.prefix_v, jnp.zeros(2, jnp.int32),
                                              layer.suffix_k, layer.suffix_v, rows.suffix_index + 1, 0.125,
                                              interpret=False)

    lowered = jax.jit(attend).trace(q, k, v, layer, rows).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 2  # the prompt pass and the continuation pass

    def attend_once(q, k, v, layer, rows):  # with finished rows, as the engine runs it
        return kernel.one_pass_attention(q, layer.prefix_k, layer.prefix_v, jnp.zeros(2, jnp.int32),
                                         layer.suffix_k, layer.suffix_v, rows.suffix_index + 1, 0.125,
                                         interpret=False, live=rows.suffix_index % 2 == 0)

    lowered = jax.jit(attend_once).trace(q, k, v, layer, rows).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 1  # prompt and continuation in one kernel


@pytest.mark.parametrize("which, writes_in_xla", [("fused", True), ("fused_write", False)])
def test_fused_write_leaves_no_xla_cache_write(which, writes_in_xla):
    """Lowered for CUDA on any host: with ``fused_write`` the layer's attention is the one Triton kernel, updating
    both cache buffers in place (aliased operands), with no XLA write of the cache, no query scaling or padding
    fusion and no slice of its output around it; ``fused`` still writes in XLA (the check can tell them apart)."""
    q, k, v, layer, rows = _case(groups=2, n=4, kv=2, h=7, d=64, lp=128, ls=256, dtype=jnp.bfloat16)

    def attend(q, k, v, layer, rows):
        return kernel.kernel(which)(q, k, v, layer.prefix_k, layer.prefix_v, jnp.zeros(2, jnp.int32), layer.suffix_k,
                                    layer.suffix_v, rows.suffix_index, 0.125, interpret=False)

    text = jax.jit(attend).trace(q, k, v, layer, rows).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1
    assert ("dynamic_update_slice" in text or "scatter" in text) == writes_in_xla
    assert ("stablehlo.pad" in text) == writes_in_xla  # the query padded to a Triton tile outside the kernel
    if not writes_in_xla:
        assert "output_operand_aliases" in text


@pytest.mark.slow
@pytest.mark.parametrize("which, family, splits", [("fused", "llama", 1), ("fused_write", "llama", 1),
                                                   ("fused_projection", "llama", 1), ("fused_projection", "qwen2", 1),
                                                   ("fused_projection", "qwen2", 3)])
def test_engine_with_the_kernels_greedy_equals_transformers(monkeypatch, which, family, splits):
    """The whole engine with the one-pass kernel (the default, and the form that writes the cache itself; interpret
    mode), the projection kernel also split over programs: 5 prompts through 2 slot groups of 2 samples each, rows
    ending at different EOS positions (finished rows skipped while others run); every row equals HF's greedy."""
    import tiny
    from test_generate import PROMPTS, hf_greedy, models

    import jaxsft
    from jaxsft.generation import Sampler, causal

    monkeypatch.setenv(kernel.ENV, which)
    if splits > 1:
        monkeypatch.setenv(kernel.TILING_ENV, f"16,2,3,{splits}")
    tok = tiny.load_tokenizer(tiny.tokenizer_dir(str(__import__("tempfile").mkdtemp())))
    if which == "fused_projection":  # heads of 32 (halves of 16 columns: Triton tiles); qwen2 has q/k/v biases
        torch_model = tiny.tiny_torch_model(family, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
        model = jaxsft.from_pretrained(torch_model)
        assert kernel.projection_applies(model.spec.head_dim, None, None)
    else:
        torch_model, model = models(family)
    budget = 2 * causal.kv_bytes_per_group(model.spec, model.dtype, 2, 64, 16)
    sampler = Sampler(model, tok, kv_cache_bytes=budget)
    free = sampler.generate(PROMPTS, max_new_tokens=10, return_tokens=True, eos_token_ids=[])
    extra = [int(free.tokens[0][2]), int(free.tokens[3][5])]
    ours = sampler.generate(PROMPTS, max_new_tokens=10, return_tokens=True, eos_token_ids=[1] + extra,
                            num_return_sequences=2)
    want = hf_greedy(torch_model, tok, PROMPTS, 10, eos_token_id=[1] + extra)
    for r, row in enumerate(ours.tokens):  # row 2i + j is sample j of prompt i; at T=0 both equal HF's row i
        ref = want[r // 2]
        np.testing.assert_array_equal(row, ref[: len(row)], err_msg=f"row {r}")
        assert (ref[len(row):] == tok.pad_token_id).all(), f"row {r}: HF continued past our end"
    assert len({len(t) for t in ours.tokens}) >= 2  # rows ended at different EOS positions
