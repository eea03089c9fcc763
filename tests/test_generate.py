"""jaxsft.generate: greedy parity with transformers, sampling statistics, program caching, stop strings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny

PROMPTS = [
    "the quick brown fox",
    "a small cat sleeps on a warm mat and numbers like one two three four five six seven eight nine ten add up",
    "seven",
    "the lazy dog jumps over the quick brown fox while a",
    "one two",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny.load_tokenizer(tiny.tokenizer_dir(str(tmp_path_factory.mktemp("tok"))))


_MODELS: dict = {}


def models(family):
    """(torch model, jaxsft model) per family, built once per test session."""
    import jaxsft

    if family not in _MODELS:
        torch_model = tiny.tiny_torch_model(family)
        _MODELS[family] = (torch_model, jaxsft.from_pretrained(torch_model))
    return _MODELS[family]


def hf_greedy(torch_model, tok, prompts, max_new_tokens, eos_token_id=None):
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    kwargs = {} if eos_token_id is None else {"eos_token_id": eos_token_id}
    with torch.no_grad():
        out = torch_model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id, **kwargs
        )
    return out[:, enc["input_ids"].shape[1]:].numpy()


def assert_same_as_hf(result, hf_tokens, pad_id):
    for r, ours in enumerate(result.tokens):
        ref = hf_tokens[r]
        np.testing.assert_array_equal(ours, ref[: len(ours)], err_msg=f"row {r}")
        assert (ref[len(ours):] == pad_id).all(), f"row {r}: HF continued past our end"


# ---------------------------------------------------------------------------- greedy parity
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.slow
def test_greedy_matches_transformers(family, tok):
    from jaxsft.generation import generate

    torch_model, model = models(family)
    # Our result with the default EOS (1) ...
    ours = generate(model, tok, PROMPTS, max_new_tokens=12, return_tokens=True)
    assert_same_as_hf(ours, hf_greedy(torch_model, tok, PROMPTS, 12), tok.pad_token_id)
    # ... and with a second EOS id the model actually emits, so rows finish at different steps (EOS may be a list).
    extra = int(ours.tokens[0][3])
    ours2 = generate(model, tok, PROMPTS, max_new_tokens=12, return_tokens=True, eos_token_ids=[1, extra])
    ref2 = hf_greedy(torch_model, tok, PROMPTS, 12, eos_token_id=[1, extra])
    assert_same_as_hf(ours2, ref2, tok.pad_token_id)
    assert ours2.finish_reasons[0] == "eos" and len(ours2.tokens[0]) <= 4
    assert any(r == "length" for r in ours2.finish_reasons) or all(r == "eos" for r in ours2.finish_reasons)


@pytest.mark.slow
def test_chunking_order_and_return_sequences(tok):
    """batch_size chunks (sorted by length) and num_return_sequences keep prompt-major order and greedy results."""
    from jaxsft.generation import generate

    _, model = models("llama")
    full = generate(model, tok, PROMPTS, max_new_tokens=10)
    assert generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=2) == full
    res = generate(model, tok, PROMPTS, max_new_tokens=10, num_return_sequences=3, return_tokens=True)
    assert res.grouped() == [[t] * 3 for t in full]
    assert len(res.tokens) == 3 * len(PROMPTS) and res.num_return_sequences == 3


@pytest.mark.slow
def test_package_generate_and_chat_prompts(tok):
    import jaxsft
    import jaxsft.generation

    _, model = models("llama")
    # The package-level name is the function itself (the module is jaxsft.generation).
    assert jaxsft.generate is jaxsft.generation.generate
    assert jaxsft.generate(model, tok, PROMPTS[:2], max_new_tokens=4) == jaxsft.generation.generate(
        model, tok, PROMPTS[:2], max_new_tokens=4
    )
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}assistant:"
    chat = [[{"role": "user", "content": "the quick brown fox"}]]
    as_text = tok.apply_chat_template(chat[0], add_generation_prompt=True, tokenize=False)
    out = jaxsft.generate(model, tok, chat, max_new_tokens=6, return_tokens=True)
    assert out.prompt_tokens[0].tolist() == tok(as_text, add_special_tokens=False)["input_ids"]
    assert jaxsft.generate(model, tok, ["the quick brown fox"], max_new_tokens=6, chat=True) == out.texts


# ---------------------------------------------------------------------------- sampling
@pytest.mark.slow
def test_sampling_reproducible_and_seeded(tok):
    from jaxsft.generation import generate

    _, model = models("llama")
    kw = dict(max_new_tokens=10, temperature=1.0, num_return_sequences=4)
    a = generate(model, tok, PROMPTS, seed=3, **kw)
    assert a == generate(model, tok, PROMPTS, seed=3, **kw)
    assert a != generate(model, tok, PROMPTS, seed=4, **kw)
    # Each row's key depends on its global row index only, so chunking does not change the samples.
    assert a == generate(model, tok, PROMPTS, seed=3, batch_size=4, **kw)
    assert len(set(a)) > len(PROMPTS)  # samples of one prompt differ


@pytest.fixture(scope="module")
def peaky():
    """A tiny llama whose lm_head is scaled up, so next-token distributions are far from uniform."""
    import jaxsft

    torch_model = tiny.tiny_torch_model("llama", seed=1)
    with torch.no_grad():
        torch_model.lm_head.weight.mul_(40.0)
    return torch_model, jaxsft.from_pretrained(torch_model)


def first_token_probs(torch_model, tok, prompt, temperature=1.0):
    enc = tok([prompt], return_tensors="pt")
    with torch.no_grad():
        logits = torch_model(**enc).logits[0, -1].double()
    return torch.softmax(logits / temperature, -1).numpy()


def first_tokens(model, tok, prompt, n, **kw):
    from jaxsft.generation import generate

    res = generate(model, tok, [prompt], max_new_tokens=1, num_return_sequences=n, return_tokens=True,
                   eos_token_ids=[], **kw)
    return np.array([int(t[0]) for t in res.tokens])


def chi_square_pvalue(samples, probs):
    """Pearson chi-square goodness of fit, categories with expected count < 5 pooled into one."""
    n = len(samples)
    counts = np.bincount(samples, minlength=len(probs))
    expected = probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] < 5:  # fold a small pooled cell into the smallest big one
        obs, exp = obs[:-1], exp[:-1]
        obs[np.argmin(exp)] += counts[~big].sum()
        exp[np.argmin(exp)] += expected[~big].sum()
    statistic = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    # chi-square survival function = regularized upper incomplete gamma Q(dof/2, x/2)
    half = lambda x: torch.tensor(x / 2, dtype=torch.float64)  # noqa: E731
    return float(torch.special.gammaincc(half(dof), half(statistic)))


N_SAMPLES = 4096


@pytest.mark.slow
def test_temperature_one_matches_softmax(peaky, tok):
    """Empirical first-token frequencies at temperature 1 against softmax(logits).

    With N = 4096 draws the total-variation distance is below 0.06 and a Pearson
    chi-square test does not reject at p = 1e-3 (fixed seed, so deterministic).
    """
    torch_model, model = peaky
    prompt = PROMPTS[0]
    p = first_token_probs(torch_model, tok, prompt)
    assert p.max() < 0.9 and (p > 0.01).sum() >= 4  # a non-trivial distribution
    samples = first_tokens(model, tok, prompt, N_SAMPLES, temperature=1.0, seed=0)
    emp = np.bincount(samples, minlength=len(p)) / N_SAMPLES
    assert 0.5 * np.abs(emp - p).sum() < 0.06
    assert chi_square_pvalue(samples, p) > 1e-3


@pytest.mark.slow
def test_top_k(peaky, tok):
    from jaxsft.generation import generate

    torch_model, model = peaky
    prompt = PROMPTS[0]
    p = first_token_probs(torch_model, tok, prompt)
    k = 3
    top = np.argsort(-p)[:k]
    samples = first_tokens(model, tok, prompt, N_SAMPLES, temperature=1.0, top_k=k, seed=1)
    assert set(samples.tolist()) <= set(top.tolist())
    assert len(set(samples.tolist())) == k
    renorm = np.zeros_like(p)
    renorm[top] = p[top] / p[top].sum()
    assert chi_square_pvalue(samples, renorm) > 1e-3
    # top_k=1 is greedy, for whole generations.
    greedy = generate(model, tok, PROMPTS, max_new_tokens=8)
    assert generate(model, tok, PROMPTS, max_new_tokens=8, temperature=1.0, top_k=1, seed=5) == greedy


def test_top_p_keeps_the_nucleus(peaky, tok):
    torch_model, model = peaky
    prompt = PROMPTS[0]
    p = first_token_probs(torch_model, tok, prompt)
    for top_p in (0.3, 0.6):
        # HF's rule: sort ascending, drop tokens whose cumulative probability <= 1 - top_p, keep the top one.
        order = np.argsort(p)
        cum = np.cumsum(p[order])
        keep = order[~(cum <= 1 - top_p)]
        keep = set(keep.tolist()) | {int(order[-1])}
        samples = first_tokens(model, tok, prompt, N_SAMPLES, temperature=1.0, top_p=top_p, seed=2)
        assert set(samples.tolist()) <= keep
        nucleus = np.zeros_like(p)
        idx = np.array(sorted(keep))
        nucleus[idx] = p[idx] / p[idx].sum()
        if len(keep) > 1:
            assert chi_square_pvalue(samples, nucleus) > 1e-3


def test_temperature_order_and_low_temperature(peaky, tok):
    """Temperature is applied before top-p (HF order); temperature -> 0 concentrates on the argmax."""
    torch_model, model = peaky
    prompt = PROMPTS[0]
    p_hot = first_token_probs(torch_model, tok, prompt, temperature=2.0)
    order = np.argsort(p_hot)
    keep = set(order[~(np.cumsum(p_hot[order]) <= 1 - 0.7)].tolist()) | {int(order[-1])}
    samples = first_tokens(model, tok, prompt, N_SAMPLES, temperature=2.0, top_p=0.7, seed=3)
    assert set(samples.tolist()) <= keep
    nucleus = np.zeros_like(p_hot)
    idx = np.array(sorted(keep))
    nucleus[idx] = p_hot[idx] / p_hot[idx].sum()
    assert chi_square_pvalue(samples, nucleus) > 1e-3

    p = first_token_probs(torch_model, tok, prompt)
    cold = first_tokens(model, tok, prompt, 1024, temperature=0.02, seed=4)
    assert (cold == int(np.argmax(p))).mean() > 0.99


# ---------------------------------------------------------------------------- programs and stops
@pytest.mark.slow
def test_no_recompiles_for_similar_calls(tok):
    from jaxsft.generation import compiled_programs, generate

    _, model = models("qwen2")
    generate(model, tok, PROMPTS, max_new_tokens=20)  # 5 prompts -> 8 rows, prompt bucket 32, new bucket 32
    generate(model, tok, PROMPTS, max_new_tokens=20, temperature=0.8, top_p=0.9)
    before = compiled_programs()
    generate(model, tok, PROMPTS[:3] + PROMPTS[:4], max_new_tokens=30)  # 7 prompts, same buckets
    generate(model, tok, PROMPTS[1:] + PROMPTS[:2], max_new_tokens=17, stop=["fox"])  # 6 prompts
    generate(model, tok, PROMPTS, max_new_tokens=25, temperature=1.3, top_p=0.5, seed=9)  # other values, same mode
    assert compiled_programs() == before
    generate(model, tok, PROMPTS, max_new_tokens=40)  # a bigger new-token bucket: one init, prefill, decode each
    assert compiled_programs() == before + 3


@pytest.mark.slow
def test_stop_strings_truncate(tok):
    from jaxsft.generation import generate

    _, model = models("llama")
    full = generate(model, tok, PROMPTS, max_new_tokens=24, return_tokens=True, eos_token_ids=[])
    words = full.texts[1].split()
    stop = " " + words[len(words) // 2]
    for every in (32, 3):  # one device call, or host checks between chunks of 3 tokens
        res = generate(model, tok, PROMPTS, max_new_tokens=24, return_tokens=True, eos_token_ids=[], stop=[stop, "@@"],
                       stop_check_every=every)
        for r, text in enumerate(full.texts):
            cut = text.find(stop)
            if cut < 0:
                assert res.texts[r] == text and res.finish_reasons[r] == "length"
                continue
            assert res.texts[r] == text[:cut] and res.finish_reasons[r] == "stop"
            toks = res.tokens[r]
            np.testing.assert_array_equal(toks, full.tokens[r][: len(toks)])
            assert stop in tok.decode(toks.tolist()) and stop not in tok.decode(toks[:-1].tolist())
        assert res.finish_reasons[1] == "stop"
    assert generate(model, tok, PROMPTS[:1], max_new_tokens=5, stop="@@") == generate(model, tok, PROMPTS[:1], max_new_tokens=5)


def test_bad_arguments(tok):
    from jaxsft.generation import generate

    _, model = models("llama")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tok, PROMPTS, max_new_tokens=2, temperature=1.0, top_p=0.0)
    with pytest.raises(TypeError, match="list of prompts"):
        generate(model, tok, "a single string", max_new_tokens=2)
    assert generate(model, tok, [], max_new_tokens=2) == []


@pytest.mark.slow
@pytest.mark.parametrize("axes", [(2, 2, 2), (4, 2, 1)], ids=["tensor-split", "fsdp-joined-weights"])
def test_generate_on_an_explicit_mesh_matches_single_device(tok, axes):
    """``mesh=`` moves the params onto another mesh with identical greedy output: 2x2x2 splits the kv heads (the
    decode weights stay apart), 4x2x1 splits the weights over fsdp with q/k/v and gate/up joined."""
    import jaxsft
    from jaxsft.generation import generate

    _, model = models("llama")
    single = generate(model, tok, PROMPTS[:3], max_new_tokens=6)
    sharded = generate(model, tok, PROMPTS[:3], max_new_tokens=6, mesh=jaxsft.make_mesh(*axes))
    assert sharded == single


# ---------------------------------------------------------------------------- the Sampler object
def test_sampler_owns_its_programs_and_takes_new_weights_without_recompiling(tok):
    """A Sampler compiles its own three programs (init, prefill, decode); ``model=`` with other weights of the same model reuses them
    and generates from the new weights (equal to a fresh generate() on that model)."""
    import jax
    from flax import nnx

    import jaxsft
    from jaxsft.generation import DecodeState, Sampler

    _, model = models("llama")
    sampler = Sampler(model, tok)
    first = sampler.generate(PROMPTS[:2], max_new_tokens=5)
    assert sampler.compiled_programs == 3 and first == jaxsft.generate(model, tok, PROMPTS[:2], max_new_tokens=5)
    graphdef, state = nnx.split(model)
    other = nnx.merge(graphdef, jax.tree.map(lambda x: x * 0.5, state))  # same structure, other weights
    again = sampler.generate(PROMPTS[:2], max_new_tokens=5, model=other)
    assert sampler.compiled_programs == 3  # no new program
    assert again == jaxsft.generate(other, tok, PROMPTS[:2], max_new_tokens=5) and again != first
    assert Sampler(model, tok).compiled_programs == 0  # programs belong to a sampler, not to the module
    assert "cache" in DecodeState._fields and "finished_by_eos" in DecodeState._fields


@pytest.mark.slow
def test_trainer_generate_keeps_one_sampler_across_steps(tok):
    import jaxsft

    torch_model = tiny.tiny_torch_model("llama", seed=2)
    model = jaxsft.from_pretrained(torch_model, mesh=jaxsft.single_device_mesh())
    trainer = jaxsft.IterativeSFTTrainer(
        model, jaxsft.TrainConfig(max_length=32, length_buckets=(32,), lr_scheduler_type="constant",
                                  learning_rate=1e-2, per_device_train_batch_size=2, disable_tqdm=True), tok)
    before = trainer.generate(PROMPTS[:2], max_new_tokens=4)
    trainer.step(texts=PROMPTS[:2])
    after = trainer.generate(PROMPTS[:2], max_new_tokens=4)
    assert trainer._sampler.compiled_programs == 3  # both calls ran the same three programs
    assert after == jaxsft.generate(trainer.model, tok, PROMPTS[:2], max_new_tokens=4)  # the trained weights
    assert len(before) == len(after) == 2


def test_generate_with_kv_heads_replicated_on_tensor4_matches_single_device(tok):
    """2 KV heads on make_mesh(tensor=4): the params' and the cache's KV heads are replicated (rules),
    query heads split, and greedy output equals one device's."""
    import jaxsft

    _, model = models("llama")
    assert model.spec.num_kv_heads == 2
    single = generate_texts(model, tok)
    sharded = jaxsft.generate(model, tok, PROMPTS[:3], max_new_tokens=6, mesh=jaxsft.make_mesh(tensor=4))
    assert sharded == single


def generate_texts(model, tok):
    import jaxsft

    return jaxsft.generate(model, tok, PROMPTS[:3], max_new_tokens=6)


def test_generation_programs_compile_with_the_trainers_xla_options(tok, tmp_path):
    """TrainConfig.xla_options reach trainer.generate's programs as they reach the train step (one setting, one
    source): XLA dumps every program it compiles where ``xla_dump_to`` says, so the engine's init, prefill and
    decode programs appear there, also for a call on another mesh. A Sampler given an option XLA does not know refuses it when built, naming the
    argument; its default is the backend's measured rule (XLA's own settings on CPU)."""
    import jaxsft
    from jaxsft.generation import Sampler
    from jaxsft.infra import compile_options

    dump = tmp_path / "dump"
    torch_model = tiny.tiny_torch_model("llama", seed=2)
    model = jaxsft.from_pretrained(torch_model, mesh=jaxsft.single_device_mesh())
    trainer = jaxsft.IterativeSFTTrainer(
        model, jaxsft.TrainConfig(max_length=32, length_buckets=(32,), per_device_train_batch_size=2, disable_tqdm=True,
                                  xla_options={"xla_dump_to": str(dump)}), tok)
    trainer.generate(PROMPTS[:2], max_new_tokens=4)
    compiled = {p.name.split(".")[1] for p in dump.iterdir() if p.name.startswith("module_")}
    assert {"jit_init", "jit_prefill", "jit_decode"} <= compiled, sorted(compiled)

    def decode_modules():
        return {p.name.split(".")[0] for p in dump.iterdir() if ".jit_decode." in p.name}

    before = decode_modules()  # another layout (mesh=) is served outside the trainer's sampler, with its options too
    trainer.generate(PROMPTS[:2], max_new_tokens=4, mesh=jaxsft.single_device_mesh())
    assert decode_modules() > before
    with pytest.raises(ValueError, match=r"Sampler\(xla_options=\.\.\.\).*xla_no_such_option"):
        Sampler(model, tok, xla_options={"xla_no_such_option": 1})
    assert Sampler(model, tok).xla_options == compile_options.resolve(None, hidden_size=model.spec.hidden_size) == {}


def test_a_missing_tokenizer_is_refused_before_any_work():
    """Token-id prompts still need the tokenizer (it decodes every completion): a clear error up front, not an
    AttributeError after the whole generation ran."""
    from jaxsft import generate

    _, model = models("llama")
    with pytest.raises(ValueError, match="tokenizer is None; pass the model's tokenizer"):
        generate(model, None, [[5, 6, 7]], max_new_tokens=2)
