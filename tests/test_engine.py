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
    from jaxsft.generation import engine

    return engine.kv_bytes_per_group(model.spec, model.dtype, n, prompt_slots, new_slots)


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

    from jaxsft.generation import engine

    _, model = models("llama")
    spec = model.spec
    shape = engine.Shape(groups=4, n=8, prompt_slots=64, new_slots=128)
    state = jax.eval_shape(engine.make_init(spec, model.dtype, shape))
    held = sum(x.size * x.dtype.itemsize for layer in state.cache for x in layer)
    per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * np.dtype(model.dtype).itemsize
    needed = shape.groups * per_token * (shape.prompt_slots + shape.n * shape.new_slots)
    assert held <= 1.1 * needed
    assert held == engine.kv_bytes_per_group(spec, model.dtype, 8, 64, 128) * shape.groups


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
    # One prompt bucket (16) and one new-token bucket (16); slot groups in {1, 2, 4} x n in {1, 2}: at most 6 init
    # programs, 12 decode (x greedy/sample) and 2 x (1 + 2 + 3) x 2 prefill (prompts per prefill <= groups).
    assert counts[-1] <= 6 + 12 + 24
    assert counts[-1] == counts[149], "the last 50 calls compiled something new"


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_prefill_then_decode_steps_match_the_full_forward(family):
    """The engine's cache path (prefill's prefix + per-row suffix, shared by n rows) reproduces the full forward;
    for Gemma 2 (window 5) past the window: its sliding layers' prompt tails and continuation rings wrap."""
    import jax.numpy as jnp

    from jaxsft.generation import kv_cache

    _, model = models(family)
    spec = model.spec
    rng = np.random.default_rng(0)
    g, n, lp, ls = 2, 2, 8, 8
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

        def attend(q, k, v, c, *, window, scale, softcap):
            return kv_cache.shared_prefix_attention(q, k, v, c, rows, window, scale, softcap)

        h, layers = model.decode_step(jnp.asarray(cont[:, t : t + 1]), (jnp.repeat(prompt_len, n) + t)[:, None], layers,
                                      attend, params)
        np.testing.assert_allclose(np.asarray(model.logits(h))[:, 0], ref[:, lp + t], atol=2e-5, rtol=1e-5,
                                   err_msg=f"step {t}")


@pytest.mark.parametrize("v", [3 * 256 + 37, 128 * 37], ids=["padded", "blocks-of-128"])
def test_sampling_draw_is_the_categorical_distribution(v):
    """The two-level inverse-CDF draw (a vocabulary padded to whole blocks, or cut into blocks of 128 without
    padding), with -inf entries never drawn."""
    import jax
    import jax.numpy as jnp

    from jaxsft.generation.sampling import block_size, inverse_cdf_draw

    assert block_size(v) == (256 if v % 128 else 128)
    logits = np.random.default_rng(0).normal(size=v).astype(np.float32) * 1.5
    logits[::7] = -np.inf
    u = jax.random.uniform(jax.random.key(0), (20000,))
    draws = np.asarray(jax.jit(jax.vmap(lambda x: inverse_cdf_draw(jnp.asarray(logits)[None], x[None])[0]))(u))
    p = np.exp(logits - logits[np.isfinite(logits)].max())
    p /= p.sum()
    assert not np.isin(draws, np.arange(0, v, 7)).any()
    from test_generate import chi_square_pvalue

    assert chi_square_pvalue(draws, p) > 1e-3


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
