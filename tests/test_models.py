"""The NNX decoder against transformers' torch implementation, family by family.

Every family in ``tiny.FAMILIES`` is built as a random transformers model, converted
with ``jaxsft.models.from_pretrained(torch_model)`` and compared on the same batch.
The tiny models use ``initializer_range=0.05`` (not the default 0.02) so attention is
peaked enough for position/rope mistakes to move logits by far more than the 1e-4
tolerance (e.g. llama vs llama3 rope scaling differ by ~0.1 here, ~0.004 at 0.02).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxsft.infra.sharding as shd
from jaxsft.models import CausalLM, from_pretrained, spec_from_hf_config
from jaxsft.models.hf_io import export_params
from tiny import FAMILIES, tiny_torch_model

VOCAB = 300
INIT_RANGE = 0.05
FP32_TOL = 1e-4
# bf16 compute (fp32 params, fp32 logits) vs torch fp32: max |diff| over real tokens, relative to
# the largest |logit| of the reference. Measured on these tiny models (272 tokens, init 0.05):
# 0.6% (gpt2) to 1.2% (qwen3), i.e. max |diff| 0.010-0.023 on max |logit| 1.7-2.9; 2.5% leaves
# room for other seeds while mapping errors give O(1) diffs. fp32 compute gives ~3e-7, so a
# diff above 1e-3 also proves the bf16 path really ran in bf16.
BF16_REL_TOL = 0.025


def _batch(length: int = 272, seed: int = 0):
    """3 rows: left-padded (row 0), right-padded (row 1), unpadded (row 2)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(3, length)).astype(np.int64)
    mask = np.ones((3, length), np.int64)
    mask[0, :41] = 0
    mask[1, -57:] = 0
    ids[mask == 0] = 0  # pad id
    return ids, mask


def _positions(mask: np.ndarray) -> np.ndarray:
    # jaxsft, given an attention_mask, numbers real tokens only: positions = cumsum(mask) - 1,
    # clipped at 0 (pads before the first real token sit at 0). HF needs the same position_ids
    # passed explicitly, otherwise it uses arange and left-padded rows would differ (GPT-2).
    return np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)


@functools.lru_cache(maxsize=None)
def _torch_model(family: str, **overrides):
    return tiny_torch_model(family, vocab_size=VOCAB, initializer_range=INIT_RANGE, **dict(overrides))


@functools.lru_cache(maxsize=None)
def _hf_logits(family: str, **overrides) -> tuple[np.ndarray, np.ndarray]:
    """torch fp32 logits on the padded batch (with mask + position_ids) and on its unpadded row alone."""
    tm = _torch_model(family, **overrides)
    ids, mask = _batch()
    with torch.no_grad():
        padded = tm(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(_positions(mask)),
        ).logits.numpy()
        plain = tm(input_ids=torch.tensor(ids[2:])).logits.numpy()
    return padded, plain


def _load(family: str, overrides: tuple = (), **kwargs) -> CausalLM:
    kwargs.setdefault("mesh", shd.single_device_mesh())
    return from_pretrained(_torch_model(family, **dict(overrides)), **kwargs)


@functools.lru_cache(maxsize=None)
def _jax_fp32(family: str) -> CausalLM:
    return _load(family)


def _max_real_diff(out, ref, mask) -> float:
    return float(np.abs(np.asarray(out, np.float32) - ref)[mask.astype(bool)].max())


# --------------------------------------------------------------------------- forward parity
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow
def test_fp32_logits_match_transformers_on_padded_batch(family):
    ids, mask = _batch()
    ref, _ = _hf_logits(family)
    model = _jax_fp32(family)
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert out.shape == ref.shape and out.dtype == np.float32
    assert _max_real_diff(out, ref, mask) <= FP32_TOL
    # padded positions are garbage by definition, but must not be NaN/inf (they feed masked losses)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_no_mask_path_matches_transformers(family):
    ids, mask = _batch()
    padded_ref, plain_ref = _hf_logits(family)
    model = _jax_fp32(family)
    out = np.asarray(model(jnp.asarray(ids[1:])))  # rows: right-padded, unpadded; no mask
    assert np.abs(out[1] - plain_ref[0]).max() <= FP32_TOL
    # Without a mask, a right-padded row is still exact on its real tokens (causality alone
    # hides the trailing pads): the contract training batches rely on.
    assert _max_real_diff(out[:1], padded_ref[1:2], mask[1:2]) <= FP32_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_compute_close_to_transformers_fp32(family):
    ids, mask = _batch()
    ref, _ = _hf_logits(family)
    model = _load(family, dtype=jnp.bfloat16)
    assert model.layers.q_proj[...].dtype == jnp.float32  # params stay fp32
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert out.dtype == np.float32
    scale = float(np.abs(ref[mask == 1]).max())
    diff = _max_real_diff(out, ref, mask)
    assert diff <= BF16_REL_TOL * scale, (diff, scale)
    assert diff > 1e-3, "no bf16 rounding visible: was it computed in fp32?"
    assert model.dtype == jnp.bfloat16


def test_mistral_sliding_window_matches_transformers():
    # window 16 << 272 tokens: the window changes HF's logits by O(1), so ignoring it would fail.
    ids, mask = _batch()
    overrides = (("sliding_window", 16),)
    ref, plain_ref = _hf_logits("mistral", **dict(overrides))
    full_ref, _ = _hf_logits("mistral")
    assert _max_real_diff(ref, full_ref, mask) > 0.1
    model = _load("mistral", overrides)
    assert model.spec.sliding_window == 16
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert _max_real_diff(out, ref, mask) <= FP32_TOL
    assert np.abs(np.asarray(model(jnp.asarray(ids[2:]))) - plain_ref).max() <= FP32_TOL


def test_hidden_states_and_unembedding_compose_to_logits():
    ids, mask = _batch()
    for family in ("llama", "smollm2"):  # untied, tied
        model = _jax_fp32(family)
        tm = _torch_model(family)
        w = model.unembedding()
        expected = tm.get_output_embeddings().weight.detach().numpy()
        np.testing.assert_array_equal(np.asarray(w), expected)
        if model.spec.tie_word_embeddings:
            assert not hasattr(model, "lm_head")
            np.testing.assert_array_equal(np.asarray(w), np.asarray(model.embed[...]))
        h = model.hidden_states(jnp.asarray(ids), jnp.asarray(mask))
        assert h.shape == (*ids.shape, model.spec.hidden_size)
        logits = jnp.einsum("bth,vh->btv", h, w)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_spec_parameter_count_matches_torch(family):
    tm = _torch_model(family)
    spec = spec_from_hf_config(tm.config)
    assert spec.num_parameters() == sum(p.numel() for p in tm.parameters())


# --------------------------------------------------------------------------- gradients and remat
def _weights_for(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _scalar_fn(weights, mask):
    m = jnp.asarray(mask, jnp.float32)[..., None]

    def f(model, ids, attn):
        return jnp.sum(model(ids, attn) * weights * m)

    return f


def _jaxpr_text(model: CausalLM, ids) -> str:
    graphdef, state = nnx.split(model)
    return str(jax.make_jaxpr(lambda st: nnx.merge(graphdef, st)(ids))(state))


def _flat_grads(grads) -> dict:
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(grads)}


# smollm2: RMSNorm, rope, GQA, tied embeddings (both uses sum into one grad); gpt2: LayerNorm,
# learned positions, biases, fused c_attn split three ways. (Each costs ~3 grad compiles.)
@pytest.mark.parametrize("family", ["smollm2", "gpt2"])
@pytest.mark.slow
def test_gradient_matches_torch_and_remat_changes_nothing(family):
    """d(sum(logits * W * mask))/d(params): remat=True equals remat=False, and both, mapped back
    to HF names through the key tables, equal torch autograd on the same padded batch."""
    ids, mask = _batch(length=64)
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    weights = _weights_for((*ids.shape, VOCAB))
    f = _scalar_fn(weights, mask)
    plain, remat = _jax_fp32(family), _load(family, remat=True)
    assert remat.remat and not plain.remat
    # remat really wraps the layer body in jax.checkpoint (else the comparisons below prove nothing)
    assert "remat" in _jaxpr_text(remat, ids_j[:, :8]) and "remat" not in _jaxpr_text(plain, ids_j[:, :8])

    # remat: same logits, same gradient
    np.testing.assert_array_equal(np.asarray(remat(ids_j, mask_j)), np.asarray(plain(ids_j, mask_j)))
    grads = nnx.jit(nnx.grad(f))(plain, ids_j, mask_j)
    g_plain = _flat_grads(grads)
    g_remat = _flat_grads(nnx.jit(nnx.grad(f))(remat, ids_j, mask_j))
    assert g_plain.keys() == g_remat.keys() and len(g_plain) > 0
    largest = max(float(np.abs(a).max()) for a in g_plain.values())
    for path, a in g_plain.items():
        assert np.isfinite(a).all(), path  # left padding must not leak NaN into gradients
        # A key bias's gradient is zero in exact arithmetic (softmax is shift-invariant): its values are
        # rounding noise, so they are held to the largest gradient's scale, not to their own.
        scale = largest if "k_bias" in str(path) else np.abs(a).max()
        np.testing.assert_allclose(g_remat[path], a, rtol=1e-5, atol=1e-6 * scale, err_msg=str(path))

    # torch autograd
    tm = _torch_model(family)
    tm.zero_grad(set_to_none=True)
    logits = tm(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(_positions(mask))
    ).logits
    (logits * torch.tensor(np.asarray(weights)) * torch.tensor(mask, dtype=torch.float32)[..., None]).sum().backward()
    theirs = {name: p.grad.numpy().copy() for name, p in tm.named_parameters()}
    tm.zero_grad(set_to_none=True)
    ours = export_params(plain.spec, jax.tree.map(np.asarray, nnx.to_pure_dict(grads)))
    assert set(ours) == set(theirs)
    for name, g in theirs.items():
        scale = np.abs(g).max()
        assert scale > 0, name
        np.testing.assert_allclose(ours[name], g, rtol=0, atol=2e-4 * scale + 1e-6, err_msg=name)


# --------------------------------------------------------------------------- KV cache
# gpt2: learned positions must follow the cache positions; mistral: llama path plus a window (8)
# smaller than the sequence, applied over cache slots.
@pytest.mark.parametrize("family,overrides", [("gpt2", ()), ("mistral", (("sliding_window", 8),))])
@pytest.mark.slow
def test_prefill_and_decode_with_cache_match_full_forward(family, overrides):
    rng = np.random.default_rng(3)
    prompt, new = 12, 10
    model = _load(family, overrides)
    prompt_mask = np.ones((2, prompt), np.int32)
    prompt_mask[0, :4] = 0  # left-padded prompt, as generation uses
    ids = rng.integers(3, VOCAB, size=(2, prompt + new)).astype(np.int32)
    ids[0, :4] = 0
    full_mask = np.concatenate([prompt_mask, np.ones((2, new), np.int32)], axis=1)
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(full_mask)))

    cache = model.init_cache(2, prompt + new)
    assert cache.k.shape == (model.spec.num_layers, 2, prompt + new, model.spec.num_kv_heads, model.spec.head_dim)
    kv_mask = np.zeros((2, prompt + new), np.int32)
    kv_mask[:, :prompt] = prompt_mask
    positions = _positions(prompt_mask)
    step = nnx.jit(lambda m, *args: m.forward_with_cache(*args))  # one compile for all decode steps
    h, cache = step(model, jnp.asarray(ids[:, :prompt]), jnp.asarray(positions), cache, jnp.int32(0), jnp.asarray(kv_mask))
    steps = [np.asarray(jnp.einsum("bth,vh->btv", h, model.unembedding()))]
    prompt_only = np.asarray(model(jnp.asarray(ids[:, :prompt]), jnp.asarray(prompt_mask)))
    assert _max_real_diff(steps[0], prompt_only, prompt_mask) <= 1e-5
    for t in range(new):
        kv_mask[:, prompt + t] = 1
        pos = positions[:, -1:] + 1 + t
        h, cache = step(
            model, jnp.asarray(ids[:, prompt + t : prompt + t + 1]), jnp.asarray(pos), cache, jnp.int32(prompt + t),
            jnp.asarray(kv_mask),
        )
        steps.append(np.asarray(jnp.einsum("bth,vh->btv", h, model.unembedding())))
    incremental = np.concatenate(steps, axis=1)
    assert _max_real_diff(incremental, full, full_mask) <= 1e-5


# --------------------------------------------------------------------------- sharding
@pytest.mark.slow
def test_sharded_load_matches_single_device_and_follows_rules():
    assert len(jax.devices()) == 8, "conftest sets 8 CPU devices"
    ids, mask = _batch(length=64)
    ids, mask = np.concatenate([ids, ids[:1]]), np.concatenate([mask, mask[:1]])  # 4 rows: data*fsdp = 4
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = _load("llama", mesh=mesh)
    single = _jax_fp32("llama")
    # the rules table: fsdp on "embed", tensor on heads / mlp / vocab, nothing on layers or head_dim
    assert shd.LOGICAL_AXIS_RULES["embed"] == "fsdp" and shd.LOGICAL_AXIS_RULES["q_heads"] == "tensor"
    expected = {
        "q_proj": P(None, "fsdp", "tensor", None),
        "k_proj": P(None, "fsdp", "tensor", None),
        "v_proj": P(None, "fsdp", "tensor", None),
        "o_proj": P(None, "tensor", None, "fsdp"),
        "gate_proj": P(None, "fsdp", "tensor"),
        "up_proj": P(None, "fsdp", "tensor"),
        "down_proj": P(None, "tensor", "fsdp"),
        "attn_norm_scale": P(None, None),
    }
    for name, spec in expected.items():
        array = getattr(sharded.layers, name)[...]
        assert array.sharding.mesh.shape == mesh.shape
        assert array.sharding.spec == spec, name
        # really split: each device holds 1/(fsdp*tensor) of a matrix
        if name.endswith("proj"):
            assert array.addressable_shards[0].data.size == array.size // 4
    assert sharded.embed[...].sharding.spec == P("tensor", "fsdp")
    assert sharded.lm_head[...].sharding.spec == P("tensor", "fsdp")
    assert sharded.final_norm_scale[...].sharding.spec == P(None)

    ref = np.asarray(single(jnp.asarray(ids), jnp.asarray(mask)))
    with jax.set_mesh(mesh):
        rows = shd.place_batch(ids, mesh), shd.place_batch(mask, mesh)
        out = nnx.jit(lambda m, i, a: m(i, a))(sharded, *rows)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-5)
    # gathering for save gives back exactly the single-device weights
    from jaxsft.models import hf_state_dict

    a, b = hf_state_dict(sharded), hf_state_dict(single)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_mesh_that_does_not_divide_is_refused_with_names():
    # 4 heads, 2 kv heads: tensor=4 cannot split kv_heads of size 2. Rules that do not replicate
    # KV heads refuse it, naming the parameter; the default rules replicate them instead.
    mesh = shd.make_mesh(data=2, fsdp=1, tensor=4)
    strict = shd.ShardingRules(replicate_if_indivisible=())
    with pytest.raises(ValueError, match=r"[kv]_proj.*'kv_heads' dimension of size 2.*'tensor' mesh axis of size 4"):
        _load("llama", mesh=mesh, sharding_rules=strict)
    model = _load("llama", mesh=mesh)
    assert model.layers.k_proj[...].sharding.spec == shd.P(None, None, None, None)
    assert model.layers.q_proj[...].sharding.spec == shd.P(None, None, "tensor", None)


def test_both_model_kinds_offer_one_interface():
    """CausalLM and Seq2SeqLM answer the training side by the same names: hidden_states(..., dropout_key=),
    lm_head_operands(hidden) -> LMHead whose operands compose to the model's own logits."""
    import inspect

    from jaxsft.models import LanguageModel, LMHead
    from tiny_seq2seq import tiny_seq2seq_model

    ids, mask = _batch(length=16)
    decoder = _jax_fp32("llama")
    seq2seq = from_pretrained(tiny_seq2seq_model("bart"))  # final_logits_bias rides as an extra column
    for model in (decoder, seq2seq):
        assert isinstance(model, LanguageModel)
        assert inspect.signature(model.hidden_states).parameters["dropout_key"].kind is inspect.Parameter.KEYWORD_ONLY
    h = decoder.hidden_states(jnp.asarray(ids), jnp.asarray(mask))
    head = decoder.lm_head_operands(h)
    assert isinstance(head, LMHead) and head.softcap is None
    np.testing.assert_allclose(np.asarray(jnp.einsum("bth,vh->btv", head.hidden, head.weight)),
                               np.asarray(decoder.logits(h)), atol=1e-5)
    dec = jnp.asarray(ids[:, :5] % 100)
    h2 = seq2seq.hidden_states(jnp.asarray(ids % 100), jnp.asarray(mask), dec)
    head2 = seq2seq.lm_head_operands(h2)
    assert head2.hidden.shape[-1] == h2.shape[-1] + 1
    np.testing.assert_allclose(np.asarray(jnp.einsum("bth,vh->btv", head2.hidden, head2.weight)),
                               np.asarray(seq2seq.logits(h2)), atol=1e-5)
