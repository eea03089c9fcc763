"""The generation engine: slot refill, per-row seeds, shared prompt KV, bounded programs, the cache layout."""

from __future__ import annotations

import numpy as np
import pytest

import tiny
from test_generate import PROMPTS, assert_same_as_hf, hf_greedy, models


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny.load_tokenizer(tiny.tokenizer_dir(str(tmp_path_factory.mktemp("tok"))))


def _per_group_bytes(model, n, prompt_slots, new_slots):
    from jaxsft.generation import causal

    return causal.kv_bytes_per_group(model.spec, model.dtype, n, prompt_slots, new_slots)


def test_more_prompts_than_slots_refill_and_greedy_equals_transformers(tok):
    """2 slots for 5 prompts (refilled as rows finish, at different EOS positions): every row equals HF's greedy."""
    from jaxsft.generation import Sampler

    torch_model, model = models("llama")
    ref_free = Sampler(model, tok).generate(PROMPTS, max_new_tokens=10, return_tokens=True, eos_token_ids=[])
    extra = [int(ref_free.tokens[0][2]), int(ref_free.tokens[3][5])]  # ids the model emits: rows end at 3 and 6
    sampler = Sampler(model, tok, kv_cache_bytes=2 * _per_group_bytes(model, 1, 64, 16))
    ours = sampler.generate(PROMPTS, max_new_tokens=10, return_tokens=True, eos_token_ids=[1] + extra)
    assert next(k for k in sampler._programs if k[0] == "decode")[4].groups == 2  # the shape ran 2 slot groups
    assert_same_as_hf(ours, hf_greedy(torch_model, tok, PROMPTS, 10, eos_token_id=[1] + extra), tok.pad_token_id)
    lengths = {len(t) for t in ours.tokens}
    assert len(lengths) >= 2 and "eos" in ours.finish_reasons


def test_samples_depend_on_seed_prompt_and_index_only(tok):
    """The same seed gives the same samples for any batch_size / slot count, and n samples at T=0 are identical."""
    import jaxsft

    _, model = models("qwen2")
    kw = dict(max_new_tokens=8, temperature=1.0, num_return_sequences=3, seed=11, eos_token_ids=[])
    full = jaxsft.generate(model, tok, PROMPTS, **kw)
    for batch_size in (3, 6):
        assert jaxsft.generate(model, tok, PROMPTS, batch_size=batch_size, **kw) == full
    assert len(set(full)) > len(PROMPTS)
    greedy = jaxsft.generate(model, tok, PROMPTS, max_new_tokens=8, num_return_sequences=4, eos_token_ids=[])
    assert all(len(set(greedy[i : i + 4])) == 1 for i in range(0, len(greedy), 4))


def test_shared_prompt_kv_memory():
    """At n = 8 the cache holds each prompt once plus its 8 continuations (<= 1.1x that, here exactly 1x)."""
    import jax

    from jaxsft.generation import causal, engine

    _, model = models("llama")
    spec = model.spec
    shape = engine.Shape(groups=4, n=8, prompt_slots=64, new_slots=128)
    state = jax.eval_shape(engine.make_init(causal.CausalAdapter(spec, model.dtype), shape))
    held = sum(x.size * x.dtype.itemsize for layer in state.cache.layers for x in layer)
    per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * np.dtype(model.dtype).itemsize
    needed = shape.groups * per_token * (shape.prompt_slots + shape.n * shape.new_slots)
    assert held <= 1.1 * needed
    assert held == causal.kv_bytes_per_group(spec, model.dtype, 8, 64, 128) * shape.groups


@pytest.mark.slow
def test_random_calls_compile_a_bounded_number_of_programs(tok):
    """200 calls of random sizes: the programs are those of a few power-of-two shapes, and later calls add none."""
    from jaxsft.generation import Sampler

    _, model = models("llama")
    sampler = Sampler(model, tok)
    rng = np.random.default_rng(0)
    words = " ".join(PROMPTS).split()
    counts = []
    for _ in range(200):
        n_prompts = int(rng.integers(1, 5))
        prompts = [" ".join(rng.choice(words, size=int(rng.integers(1, 4)))) for _ in range(n_prompts)]
        sampler.generate(prompts, max_new_tokens=int(rng.integers(1, 17)), num_return_sequences=int(rng.integers(1, 3)),
                         temperature=float(rng.choice([0.0, 0.7, 1.0])), seed=int(rng.integers(0, 100)))
        counts.append(sampler.compiled_programs)
    # One prompt bucket (16) and one new-token bucket (16); a shape holds at least 8 rows, so 8 slot groups for
    # n = 1 and 4 for n = 2 (never 1 or 2 for a call of 1 or 2 prompts): 2 init programs, 2 x 2 decode (greedy /
    # sample) and 2 x 2 prefill (a first fill prefills every group, so one prompt count per shape).
    assert counts[-1] <= 2 + 4 + 4
    assert counts[-1] == counts[149], "the last 50 calls compiled something new"


@pytest.mark.parametrize("family", ["qwen2", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_prefill_then_decode_steps_match_the_full_forward(family):
    """The engine's cache path (prefill's prefix + per-row suffix, shared by n rows) reproduces the full forward;
    for Gemma 2 (window 5) past the window: its sliding layers' prompt tails and continuation rings wrap."""
    import jax.numpy as jnp

    from jaxsft.generation import kv_cache

    _, model = models(family)
    spec = model.spec
    rng = np.random.default_rng(0)
    g, n, lp, ls = 2, 2, 8, (8 if family == "gemma2" else 4)  # Gemma 2: 8 steps wrap its rings of 5
    prompt = rng.integers(3, 200, size=(g, lp)).astype(np.int32)
    mask = np.ones((g, lp), np.int32)
    mask[0, :3] = 0  # left padding
    cont = rng.integers(3, 200, size=(g * n, ls)).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int32)
    cache = model.init_cache(g, lp)
    _, cache = model.forward_with_cache(jnp.asarray(prompt), jnp.asarray(positions), cache, jnp.int32(0),
                                        jnp.asarray(mask))
    layers = kv_cache.empty_layers(spec.windows(), g, n, spec.num_kv_heads, lp, ls, spec.head_dim, model.dtype)
    if family == "gemma2":  # the sliding layers hold less than the buckets (the rule itself: test below)
        assert [layer.suffix_k.shape[2] for layer in layers] == [5, ls, 5]
    layers = kv_cache.write_prefix(layers, cache.k, cache.v, jnp.arange(g))
    prompt_len = jnp.asarray(mask.sum(-1), jnp.int32)
    prefix_pos = jnp.arange(lp)[None] - (lp - prompt_len)[:, None]
    params = model.decode_params()
    full_ids = np.concatenate([np.repeat(prompt, n, axis=0), cont], axis=1)
    full_mask = np.concatenate([np.repeat(mask, n, axis=0), np.ones((g * n, ls), np.int32)], axis=1)
    ref = np.asarray(model(jnp.asarray(full_ids), jnp.asarray(full_mask)))  # [g * n, lp + ls, V]
    for t in range(ls):
        rows = kv_cache.RowView(suffix_index=jnp.full((g * n,), t, jnp.int32), prefix_mask=jnp.asarray(mask, bool),
                                query_pos=jnp.repeat(prompt_len, n) + t, prefix_pos=prefix_pos)

        def attend(qkv, c, *, window, scale, softcap):
            return kv_cache.shared_prefix_attention(qkv, c, rows, window, scale, softcap)

        h, layers = model.decode_step(jnp.asarray(cont[:, t : t + 1]), (jnp.repeat(prompt_len, n) + t)[:, None], layers,
                                      attend, params)
        np.testing.assert_allclose(np.asarray(model.logits(h))[:, 0], ref[:, lp + t], atol=2e-5, rtol=1e-5,
                                   err_msg=f"step {t}")


def prefill_right_and_masked(model, shape):
    """The engine's prefill, jitted, both ways: ``right`` (the default: right-aligned, no padding mask) and
    ``masked`` (the masked path forced); each takes (ids, mask) and returns (cache, last-token logits)."""
    import jax
    import jax.numpy as jnp

    from jaxsft.generation import causal

    class Masked(causal.CausalAdapter):
        right_aligned_prefill = False

    def program(adapter):
        return jax.jit(lambda ids, mask: adapter.prefill(model, adapter.empty_cache(shape), ids, mask,
                                                         jnp.arange(ids.shape[0]), shape))

    adapters = {"right": causal.CausalAdapter(model.spec, model.dtype), "masked": Masked(model.spec, model.dtype)}
    assert adapters["right"].right_aligned_prefill and not adapters["masked"].right_aligned_prefill
    return {name: program(adapter) for name, adapter in adapters.items()}


def real_prompt_kv(cache, mask):
    """Per layer, the prefix K and V at the prompt slots holding real tokens ([tokens, K, D] each, fp32)."""
    real = np.asarray(mask, bool)
    return [[np.asarray(x, np.float32).transpose(0, 2, 1, 3)[real] for x in (layer.prefix_k, layer.prefix_v)]
            for layer in cache.layers]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_right_aligned_prefill_equals_the_masked_one(family):
    """Prefill runs left-padded prompts right-padded (no padding mask: the training attention kernel serves) and puts
    their K/V back left-padded: the last token's logits and every real prompt slot's K/V equal the masked prefill's
    (rows with 0, 3 and 7 pad slots; GPT-2 checks the learned positions)."""
    from jaxsft.generation import engine

    _, model = models(family)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 200, size=(3, 8)).astype(np.int32)
    mask = np.ones((3, 8), np.int32)
    mask[1, :3], mask[2, :7] = 0, 0
    ids[mask == 0] = 0
    runs = prefill_right_and_masked(model, engine.Shape(groups=3, n=2, prompt_slots=8, new_slots=4))
    (right_cache, right_logits), (masked_cache, masked_logits) = (runs[name](ids, mask) for name in ("right", "masked"))
    np.testing.assert_allclose(np.asarray(right_logits), np.asarray(masked_logits), atol=2e-5, rtol=1e-5)
    for got, want in zip(real_prompt_kv(right_cache, mask), real_prompt_kv(masked_cache, mask)):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, temperature", [("float32", 1.0), ("bfloat16", 0.7)])
@pytest.mark.parametrize("v", [3 * 256 + 37, 128 * 37], ids=["padded", "blocks-of-128"])
def test_sampling_draw_is_the_categorical_distribution(v, dtype, temperature):
    """The two-level inverse-CDF draw (a vocabulary padded to whole blocks, or cut into blocks of 128 without
    padding), with -inf entries never drawn; from bf16 logits (what a bf16 model's decode step hands it) with
    the temperature applied inside the draw, the distribution is softmax(bf16 logits / T) computed in fp32."""
    import jax
    import jax.numpy as jnp

    from jaxsft.generation.sampling import block_size, inverse_cdf_draw

    assert block_size(v) == (256 if v % 128 else 128)
    logits = np.random.default_rng(0).normal(size=v).astype(np.float32) * 1.5
    logits[::7] = -np.inf
    given = jnp.asarray(logits).astype(dtype)
    u = jax.random.uniform(jax.random.key(0), (20000,))
    draws = np.asarray(jax.jit(jax.vmap(lambda x: inverse_cdf_draw(given[None], x[None], temperature)[0]))(u))
    rounded = np.asarray(given.astype(jnp.float32)) / temperature
    p = np.exp(rounded - rounded[np.isfinite(rounded)].max())
    p /= p.sum()
    assert not np.isin(draws, np.arange(0, v, 7)).any()
    from test_generate import chi_square_pvalue

    assert chi_square_pvalue(draws, p) > 1e-3
    if temperature != 1.0:  # and it is not the untempered distribution
        flat = np.exp(logits - logits[np.isfinite(logits)].max())
        assert chi_square_pvalue(draws, flat / flat.sum()) < 1e-6


def test_sampling_draw_over_many_blocks_is_the_categorical_distribution():
    """A vocabulary of 300 blocks (Qwen's has 1,187): the draw locates its block in groups, so the tokens with mass
    sit in scattered blocks with whole groups of empty blocks between them; the distribution is still exact."""
    import jax
    import jax.numpy as jnp

    from jaxsft.generation.sampling import inverse_cdf_draw

    v = 128 * 300
    rng = np.random.default_rng(1)
    logits = np.full(v, -np.inf, np.float32)
    alive = rng.choice(v, 150, replace=False)
    logits[alive] = rng.normal(size=alive.size).astype(np.float32) * 0.5
    u = jax.random.uniform(jax.random.key(2), (30000,))
    draws = np.asarray(jax.jit(jax.vmap(lambda x: inverse_cdf_draw(jnp.asarray(logits)[None], x[None])[0]))(u))
    assert np.isin(draws, alive).all()
    p = np.where(np.isfinite(logits), np.exp(logits - logits[alive].max()), 0.0)
    from test_generate import chi_square_pvalue

    assert chi_square_pvalue(draws, p / p.sum()) > 1e-3


@pytest.mark.parametrize("n", [37, 1187, 5000])
def test_locate_finds_the_interval_holding_the_target(n):
    """locate (the draw's search, in groups of a short cumulative sum) against numpy's search over the float64
    cumulative sum, on rows with runs of zero weight as long as several groups; targets within rounding of a
    boundary are left out."""
    import jax

    from jaxsft.generation.sampling import locate

    rng = np.random.default_rng(n)
    w = rng.exponential(size=(8, n)).astype(np.float32)
    w[:, rng.random(n) < 0.3] = 0.0
    w[:, n // 4: n // 4 + 200] = 0.0
    cum = np.cumsum(w.astype(np.float64), axis=-1)
    target = rng.random((8, 64)) * cum[:, -1:]
    got_i, got_before = jax.jit(jax.vmap(locate, in_axes=(None, 1), out_axes=1))(w, target.astype(np.float32))
    got_i, got_before = np.asarray(got_i), np.asarray(got_before)
    for r in range(8):
        want = np.searchsorted(cum[r], target[r], side="right")
        clear = np.abs(cum[r][np.minimum(want, n - 1)] - target[r]) > 1e-5 * cum[r, -1]
        clear &= np.abs(np.where(want > 0, cum[r][np.maximum(want - 1, 0)], 0.0) - target[r]) > 1e-5 * cum[r, -1]
        assert clear.sum() > 50
        np.testing.assert_array_equal(got_i[r][clear], want[clear])
        assert (w[r][got_i[r]] > 0).all()
        np.testing.assert_allclose(got_before[r], cum[r][got_i[r]] - w[r][got_i[r]], rtol=1e-4, atol=1e-3)


def test_max_new_tokens_defaults_to_the_generation_config_as_hf(tok):
    """Without max_new_tokens: as many new tokens as the installed transformers' generate makes."""
    import jaxsft

    torch_model, model = models("llama")
    prompts = PROMPTS[:2]
    ours = jaxsft.generate(model, tok, prompts, return_tokens=True, eos_token_ids=[])
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    import torch

    with torch.no_grad():
        ref = torch_model.generate(**enc, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert all(len(t) == ref.shape[1] - enc["input_ids"].shape[1] for t in ours.tokens)


@pytest.mark.slow
def test_steady_state_compiles_nothing_and_holds_its_memory(tok):
    """A loop's steady state: calls of the same buckets compile nothing new and the process does not grow
    (before the engine, RSS grew ~5 MB per call)."""
    import os

    from jaxsft.generation import Sampler

    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    _, model = models("llama")
    sampler = Sampler(model, tok)
    rng = np.random.default_rng(1)

    def call(i):
        sampler.generate(PROMPTS[:3] * int(rng.integers(1, 3)), max_new_tokens=int(rng.integers(5, 16)),
                         temperature=1.0, num_return_sequences=2, seed=i)

    for i in range(15):  # both slot counts (3 and 6 prompts) compiled and warm
        call(i)
    programs, start = sampler.compiled_programs, rss_mb()
    for i in range(60):
        call(100 + i)
    assert sampler.compiled_programs == programs
    assert rss_mb() - start < 12, "the process grew over 60 steady-state calls"


# ---------------------------------------------------------------------------- sliding-window layers
def test_sliding_layers_hold_only_their_window():
    """Gemma 2 (window 5; layers sliding, global, sliding): a sliding layer's buffers hold the prompt's last 4
    slots and a ring of 5, the global layer both buckets whole; the KV budget counts exactly what is held."""
    import jax

    from jaxsft.generation import causal, engine, kv_cache
    from jaxsft.models import spec_from_hf_config

    spec, dtype = spec_from_hf_config(tiny.tiny_config("gemma2")), np.float32
    assert spec.windows() == (5, None, 5)
    shape = engine.Shape(groups=2, n=3, prompt_slots=32, new_slots=64)
    state = jax.eval_shape(engine.make_init(causal.CausalAdapter(spec, dtype), shape))
    kv, d = spec.num_kv_heads, spec.head_dim
    for layer, window in zip(state.cache.layers, spec.windows()):
        lp, ls = (32, 64) if window is None else (4, 5)
        assert layer.prefix_k.shape == layer.prefix_v.shape == (2, kv, lp, d)
        assert layer.suffix_k.shape == layer.suffix_v.shape == (6, kv, ls, d)
    held = sum(x.size * x.dtype.itemsize for layer in state.cache.layers for x in layer)
    assert held == causal.kv_bytes_per_group(spec, dtype, 3, 32, 64) * shape.groups
    full = 2 * spec.num_layers * kv * d * np.dtype(dtype).itemsize * (32 + 3 * 64) * shape.groups
    assert held < 0.4 * full
    # Buckets the window already covers stay whole; a window of 1 still keeps one (masked) prompt slot.
    assert kv_cache.layer_slots((5, 100, None, 1), 16, 4) == [(4, 4), (16, 4), (16, 4), (1, 1)]


def _hf_greedy_exact(torch_model, tok, prompts, new):
    """transformers' greedy continuation of exactly ``new`` tokens (no EOS stop), left-padded."""
    import torch

    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = torch_model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                   pad_token_id=tok.pad_token_id)
    return out[:, enc["input_ids"].shape[1]:].numpy()


@pytest.mark.slow
def test_window_cache_fits_more_groups_and_greedy_equals_transformers(tok):
    """Gemma 2 on a budget of 2 full-cache groups runs 4 (its sliding layers hold O(window)); prompts and 14 new
    tokens longer than the window of 5, so prompt tails are cut and rings wrap: tokens equal transformers'."""
    from jaxsft.generation import Sampler, causal, engine

    torch_model, model = models("gemma2")
    per_slot = 2 * model.spec.num_kv_heads * model.spec.head_dim * np.dtype(model.dtype).itemsize
    lp = engine.pow2_at_least(max(len(tok(p).input_ids) for p in PROMPTS), engine.MIN_PROMPT_BUCKET)
    full_group = per_slot * model.spec.num_layers * (lp + 16)  # every layer holding both buckets (new: 16)
    assert causal.kv_bytes_per_group(model.spec, model.dtype, 1, lp, 16) < full_group / 2
    sampler = Sampler(model, tok, kv_cache_bytes=2 * full_group)
    ours = sampler.generate(PROMPTS, max_new_tokens=14, return_tokens=True, eos_token_ids=[])
    shape = next(k for k in sampler._programs if k[0] == "decode")[4]
    assert shape.groups == 4 and shape.prompt_slots == lp
    ref = _hf_greedy_exact(torch_model, tok, PROMPTS, 14)
    for r, row in enumerate(ours.tokens):
        np.testing.assert_array_equal(np.asarray(row), ref[r], err_msg=f"row {r}")


@pytest.mark.slow
def test_mistral_short_window_greedy_equals_transformers(tok):
    """Mistral with one window (4) for every layer: every layer's cache is a ring; greedy equals transformers'."""
    import jaxsft
    from jaxsft.generation import generate

    torch_model = tiny.tiny_torch_model("mistral", sliding_window=4)
    model = jaxsft.from_pretrained(torch_model)
    assert model.spec.windows() == (4, 4)
    ours = generate(model, tok, PROMPTS, max_new_tokens=12, return_tokens=True, eos_token_ids=[])
    ref = _hf_greedy_exact(torch_model, tok, PROMPTS, 12)
    for r, row in enumerate(ours.tokens):
        np.testing.assert_array_equal(np.asarray(row), ref[r], err_msg=f"row {r}")


@pytest.mark.slow
def test_window_cache_samples_equal_the_full_cache(tok, monkeypatch):
    """Gemma 3, 3 samples per prompt at temperature 1, one seed: the window-sized cache draws the same tokens as
    a cache that keeps every layer's buckets whole (the rule patched to keep everything)."""
    import jax

    from jaxsft.generation import Sampler, causal, engine, kv_cache

    _, model = models("gemma3")
    kw = dict(max_new_tokens=14, temperature=1.0, num_return_sequences=3, seed=5, return_tokens=True,
              eos_token_ids=[])
    windowed = Sampler(model, tok).generate(PROMPTS, **kw)
    monkeypatch.setattr(kv_cache, "layer_slots", lambda windows, lp, ls: [(lp, ls)] * len(windows))
    full_sampler = Sampler(model, tok)
    full = full_sampler.generate(PROMPTS, **kw)
    shape = next(k for k in full_sampler._programs if k[0] == "decode")[4]
    reference = jax.eval_shape(engine.make_init(causal.CausalAdapter(model.spec, model.dtype), shape)).cache.layers
    assert reference[0].suffix_k.shape[2] == shape.new_slots == 16  # the reference kept the whole bucket
    assert len({len(t) for t in windowed.tokens}) == 1 and len(windowed.tokens[0]) == 14
    assert len(set(map(tuple, windowed.tokens))) > len(PROMPTS)  # the samples differ
    for r, (a, b) in enumerate(zip(windowed.tokens, full.tokens)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"row {r}")


@pytest.mark.slow
def test_window_cache_on_a_mesh_matches_single_device(tok):
    """Gemma 2's window-sized buffers laid out on a 2x2x2 mesh (groups over data, KV heads over tensor): greedy
    output past the window equals one device's."""
    import jaxsft

    _, model = models("gemma2")
    kw = dict(max_new_tokens=10, num_return_sequences=2, return_tokens=True, eos_token_ids=[])
    single = jaxsft.generate(model, tok, PROMPTS[:4], **kw)
    sharded = jaxsft.generate(model, tok, PROMPTS[:4], mesh=jaxsft.make_mesh(2, 2, 2), **kw)
    for r, (a, b) in enumerate(zip(single.tokens, sharded.tokens)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"row {r}")


def test_decode_joins_projection_weights_once_outside_the_loop():
    """The decode weights hold q/k/v as one matrix and gate/up as another, joined in that order (the greedy-vs-HF
    tests check the split back); with a tensor axis splitting heads they stay apart (joined columns would mix shards)."""
    import jax
    import numpy as np

    import jaxsft
    from jaxsft.models import decoder

    _, model = models("llama")
    spec, layer = model.spec, model.decode_params()[1]
    assert {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}.isdisjoint(layer)
    weights = {k: np.asarray(v[1].astype(model.dtype)) for k, v in model.layers.arrays().items()}
    flat = lambda name: weights[name].reshape(spec.hidden_size, -1)  # noqa: E731
    np.testing.assert_array_equal(layer[decoder.JOINED_QKV], np.concatenate([flat("q_proj"), flat("k_proj"), flat("v_proj")], -1))
    np.testing.assert_array_equal(layer[decoder.JOINED_GATE_UP], np.concatenate([weights["gate_proj"], weights["up_proj"]], -1))
    with jax.set_mesh(jaxsft.make_mesh(2, 2, 2)):
        assert not decoder.projections_joinable()
    with jax.set_mesh(jaxsft.make_mesh(4, 2, 1)):
        assert decoder.projections_joinable()
