"""Gemma 2 and Gemma 3 (text) against transformers' eager implementation, through every path.

Tiny models from configs (``tiny.tiny_config("gemma2" | "gemma3")``): 3 layers (sliding, global, sliding)
with a window of 5 tokens, so the window binds on every batch here; norm weights get non-zero values
(``tiny_torch_model`` adds noise to every norm), so the (1 + w) rule and each of the four norms matter;
Gemma 2 soft-caps scores (0.5) and logits (4.0), Gemma 3 logits (4.0) and uses a local RoPE base of 500
against 100000. ``test_each_rule_matters`` shows that each rule moves the logits by far more than the
1e-4 tolerance, so the parity tests can fail. Tolerances: fp32 logits 1e-4 absolute (observed ~1e-6).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxsft
import jaxsft.infra.sharding as shd
from jaxsft.training.loss import causal_lm_loss
from jaxsft.models import UnsupportedModelError, layers as L
from jaxsft.models.hf_io import hf_state_dict
from jaxsft.models.options import RunOptions, with_options

import tiny

FAMILIES = tiny.GEMMA_FAMILIES
TOL = 1e-4


def _torch(family: str, **overrides):
    return tiny.tiny_torch_model(family, initializer_range=0.05, **overrides)


def _batch(length: int = 20, seed: int = 0):
    """3 rows: left-padded, right-padded, unpadded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 300, size=(3, length)).astype(np.int64)
    mask = np.ones((3, length), np.int64)
    mask[0, :4] = 0
    mask[1, -6:] = 0
    ids[mask == 0] = 0
    return ids, mask, np.clip(np.cumsum(mask, -1) - 1, 0, None)


def _hf_logits(model, ids, mask, pos):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_eager_scanned_and_unrolled(family):
    tm = _torch(family)
    assert tm.config._attn_implementation == "eager"
    model = jaxsft.from_pretrained(tm, mesh=jaxsft.single_device_mesh())
    assert model.spec.windows() == (5, None, 5)
    ids, mask, pos = _batch()
    ref = _hf_logits(tm, ids, mask, pos)
    real = mask.astype(bool)
    unrolled = with_options(model, dataclasses.replace(RunOptions.of(model), scan_layers=False))
    for m in (model, unrolled):
        out = np.asarray(m(jnp.asarray(ids), jnp.asarray(mask)))
        assert np.abs(out - ref)[real].max() <= TOL
        plain = np.asarray(m(jnp.asarray(ids[2:])))  # no mask: the training path (causal + per-layer windows)
        assert np.abs(plain - ref[2:]).max() <= TOL
    # packed: two examples in one row equal each alone (windows are per example, positions restart)
    a, b = ids[2, :9], ids[2, 9:]
    row = jnp.asarray(np.concatenate([a, b])[None])
    seg = jnp.asarray(np.array([[1] * 9 + [2] * 11]))
    pos_packed = jnp.asarray(np.array([list(range(9)) + list(range(11))]))
    packed = model.hidden_states(row, positions=pos_packed, segment_ids=seg)
    alone = [model.hidden_states(jnp.asarray(x[None])) for x in (a, b)]
    np.testing.assert_allclose(np.asarray(packed), np.asarray(jnp.concatenate(alone, axis=1)), atol=1e-5)


@pytest.mark.parametrize("family,change", [
    ("gemma2", dict(final_logit_softcap=None)),
    ("gemma2", dict(attn_logit_softcap=None)),
    ("gemma2", dict(layer_windows=None)),
    ("gemma2", dict(attention_scale=None)),
    ("gemma2", dict(embed_multiplier=None)),
    ("gemma2", dict(norm="rms")),
    ("gemma3", dict(rope_local_theta=None)),
    ("gemma3", dict(layer_windows=(None, None, 5))),
])
def test_each_rule_matters(family, change):
    """Each Gemma rule, dropped or changed, moves the logits far beyond the parity tolerance."""
    tm = _torch(family)
    model = jaxsft.from_pretrained(tm, mesh=jaxsft.single_device_mesh())
    ids, mask, pos = _batch()
    ref = _hf_logits(tm, ids, mask, pos)
    model.spec = dataclasses.replace(model.spec, **change)
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(out - ref)[mask.astype(bool)].max() > 50 * TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_round_trip_is_bit_exact(family, tmp_path):
    from transformers import AutoModelForCausalLM

    tm = _torch(family)
    tm.save_pretrained(str(tmp_path / "hf"))
    model = jaxsft.from_pretrained(tmp_path / "hf", mesh=jaxsft.single_device_mesh())
    jaxsft.save_pretrained(model, tmp_path / "ours")
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"))
    assert type(back).__name__ == type(tm).__name__
    want, got = tm.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == tm.config.model_type


def test_gemma3_multimodal_folder_is_refused_naming_the_text_class(tmp_path):
    from transformers import Gemma3Config

    Gemma3Config(text_config=tiny.tiny_config("gemma3").to_dict()).save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedModelError, match="Gemma3ForCausalLM.*gemma3_text"):
        jaxsft.from_pretrained(tmp_path, mesh=jaxsft.single_device_mesh())


def test_attention_kernel_rule():
    """cuDNN only where its kernel can do the model's attention: no score soft cap, one window for all layers."""
    specs = {f: jaxsft.models.spec_from_hf_config(tiny.tiny_config(f)) for f in ("gemma2", "gemma3", "mistral")}
    gemma3_uniform = dataclasses.replace(specs["gemma3"], layer_windows=(5, 5, 5))

    def kernel(spec, requested="cudnn"):
        return L.attention_kernel(requested, softcap=spec.attn_logit_softcap, windows_vary=spec.windows_vary)

    assert kernel(specs["gemma2"]) == "xla"  # score soft cap
    assert kernel(specs["gemma3"]) == "xla"  # sliding and global layers
    assert kernel(gemma3_uniform) == "cudnn" and kernel(specs["mistral"]) == "cudnn"
    assert kernel(specs["mistral"], "xla") == "xla"


@pytest.mark.parametrize("chunk", [None, 7])
def test_fused_loss_soft_cap_matches_autodiff(chunk):
    """The fused loss with a final-logit soft cap: value and both gradients equal autodiff of the plain formula."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 11, 16)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(40, 16)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 40, size=(2, 11)))
    labels = labels.at[0, :3].set(-100)
    cap = 2.5

    def plain(h, w):
        logits = cap * jnp.tanh(jnp.einsum("bth,vh->btv", h, w) / cap)[:, :-1]
        t = labels[:, 1:]
        lse = jax.nn.logsumexp(logits, -1)
        picked = jnp.take_along_axis(logits, jnp.where(t < 0, 0, t)[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(t < 0, 0.0, lse - picked))

    def fused(h, w):
        return causal_lm_loss(h, w, labels, chunk_size=chunk, softcap=cap)[0]

    want, (wh, ww) = jax.value_and_grad(plain, argnums=(0, 1))(h, w)
    got, (gh, gw) = jax.value_and_grad(fused, argnums=(0, 1))(h, w)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(gh, wh, atol=1e-5)
    np.testing.assert_allclose(gw, ww, atol=1e-5)
    uncapped = causal_lm_loss(h, w, labels, chunk_size=chunk)[0]
    assert abs(float(uncapped) - float(want)) > 1.0  # the cap matters at this scale


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("family,ga", [("gemma2", 1), ("gemma2", 3), ("gemma3", 1), ("gemma3", 3)])
@pytest.mark.slow
def test_training_matches_a_torch_adamw_loop(family, ga):
    """3+ updates through jaxsft.IterativeSFTTrainer equal test_trainer_parity's hand-written torch AdamW loop
    (fused soft-capped loss, per-layer windows, post-norms all in the gradient)."""
    import test_trainer_parity as parity

    torch_model = _torch(family, seed=3)
    bs, counts = (4, [9, 7]) if ga == 1 else (2, [13, 9])
    calls = parity._make_calls(torch_model.config.vocab_size, counts, seed=ga)
    jax_trainer, jax_losses = parity._jaxsft_run(torch_model, calls, bs=bs, ga=ga, max_steps=14)
    ref_losses, _, _, ref_state = parity.torch_reference(torch_model, calls, bs=bs, ga=ga, max_steps=14)
    assert len(ref_losses) >= 3
    np.testing.assert_allclose(jax_losses, ref_losses, rtol=1e-4)
    got = hf_state_dict(jax_trainer.model)
    init = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    for name, _ in torch_model.named_parameters():
        want = ref_state[name]
        assert np.linalg.norm(got[name] - want) <= 5e-4 * np.linalg.norm(want), name
        assert np.abs(want - init[name]).max() > 1e-4, f"{name} did not train"


@pytest.mark.parametrize("family", FAMILIES)
def test_spec_parameter_count_matches_torch(family):
    tm = _torch(family)
    assert jaxsft.models.spec_from_hf_config(tm.config).num_parameters() == sum(p.numel() for p in tm.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_decay_mask_matches_hf_groups(family):
    """The decay mask over Gemma's parameters (four norms per layer, q/k norms) is HF Trainer's decay set."""
    import test_trainer_parity as parity

    parity.test_decay_mask_matches_hf_groups(family)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow
def test_sharded_training_equals_one_device(family):
    """Gemma on the 8-device CPU mesh (data 2, fsdp 2, tensor 2) trains as one device does."""
    torch_model = tiny.tiny_torch_model(family, vocab_size=256, seed=5)
    rng = np.random.default_rng(7)
    calls = [dict(input_ids=[rng.integers(3, 256, size=int(rng.integers(4, 24))) for _ in range(8)]) for _ in range(2)]
    results = []
    for mesh in (shd.single_device_mesh(), jaxsft.make_mesh(2, 2, 2)):
        model = jaxsft.from_pretrained(torch_model, mesh=mesh)
        cfg = jaxsft.TrainConfig(learning_rate=1e-3, per_device_train_batch_size=8 // shd.batch_rows_multiple(mesh),
                                 max_steps=10, length_buckets=(32,), max_length=32, disable_tqdm=True, seed=3,
                                 dropout=False)
        trainer = jaxsft.IterativeSFTTrainer(model, cfg, mesh=mesh)
        losses = [loss for kwargs in calls for loss in trainer.step(**kwargs)["update_losses"]]
        results.append((np.asarray(losses), hf_state_dict(trainer.model)))
    (ref_losses, ref_w), (losses, w) = results
    assert len(losses) == 2
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for key in ref_w:  # fp32 reduction order differs across the mesh: observed <= 1.1e-5 relative per tensor
        assert np.linalg.norm(w[key] - ref_w[key]) <= 5e-5 * np.linalg.norm(ref_w[key]), key


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow
def test_facade_trains_a_torch_gemma_and_hands_back_the_weights(family, tmp_path):
    """compat: a Gemma2ForCausalLM / Gemma3ForCausalLM in, TRL-style step(), the caller's torch model updated."""
    from transformers import TrainingArguments

    from compat import IterativeSFTTrainer

    model = _torch(family)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                             learning_rate=1e-3, report_to="none")
    trainer = IterativeSFTTrainer(model=model, args=args)
    rng = np.random.default_rng(0)
    ids = [torch.tensor(rng.integers(3, 300, size=int(rng.integers(6, 16)))) for _ in range(4)]
    stats = trainer.step(input_ids=ids, attention_mask=[torch.ones_like(x) for x in ids], labels=ids)
    assert np.isfinite(stats["loss"])
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(list(trainer.model.named_parameters()))
    probe = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        torch_logits = trainer.model(probe).logits.numpy()
    np.testing.assert_allclose(torch_logits, np.asarray(trainer.jax_model(probe.numpy())), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow
def test_evaluate_and_predict_use_the_soft_cap(family):
    """The final-logit soft cap reaches evaluate()'s fused loss and predict()'s logits (generation's: the
    greedy test below): both equal transformers'."""
    import torch.nn.functional as F

    tm = _torch(family)
    model = jaxsft.from_pretrained(tm, mesh=jaxsft.single_device_mesh())
    trainer = jaxsft.IterativeSFTTrainer(model, jaxsft.TrainConfig(per_device_train_batch_size=4, max_length=32, max_steps=10,
                                                                   disable_tqdm=True, dropout=False))
    rng = np.random.default_rng(4)
    ids = [rng.integers(3, 300, size=int(rng.integers(8, 20))) for _ in range(5)]
    total, count = 0.0, 0
    with torch.no_grad():
        for x in ids:
            logits = tm(torch.tensor(x)[None]).logits[0]
            total += float(F.cross_entropy(logits[:-1], torch.tensor(x[1:]), reduction="sum"))
            count += len(x) - 1
    np.testing.assert_allclose(trainer.evaluate(ids)["eval_loss"], total / count, rtol=1e-5)
    predictions, _ = trainer.predict(ids[:2])
    with torch.no_grad():
        ref = tm(torch.tensor(ids[0])[None]).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(predictions)[0, : len(ids[0])], ref, atol=TOL)



@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(family, tmp_path):
    """The engine's decode path honours every Gemma rule (per-layer windows shorter than the prompts, per-layer
    RoPE bases, query scale, score and final-logit soft caps): greedy tokens equal transformers', left-padded."""
    from jaxsft.generation import generate

    tok = tiny.load_tokenizer(tiny.tokenizer_dir(str(tmp_path)))
    tm = _torch(family)
    model = jaxsft.from_pretrained(tm, mesh=jaxsft.single_device_mesh())
    prompts = ["the quick brown fox jumps over the lazy dog again and again", "seven", "one two three four five"]
    ours = generate(model, tok, prompts, max_new_tokens=10, return_tokens=True, eos_token_ids=[])
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = tm.generate(**enc, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                          pad_token_id=tok.pad_token_id)[:, enc["input_ids"].shape[1]:].numpy()
    for r, row in enumerate(ours.tokens):
        np.testing.assert_array_equal(np.asarray(row), ref[r], err_msg=f"{family} row {r}")
