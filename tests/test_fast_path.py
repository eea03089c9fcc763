"""The default's per-backend choices (jaxsft.training.fast_path): packing where cuDNN's ragged kernel makes it faster."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsft
from jaxsft.training import batching
from jaxsft.training.fast_path import ragged_attention_applies, resolve_packing

import tiny

BF16, F32 = jnp.bfloat16, jnp.float32


def _ragged(*, backend, dtype=BF16, implementation="auto", windows=(None, None), softcap=None, dropout=0.0):
    return ragged_attention_applies(
        attention_implementation=implementation, dtype=dtype, windows=windows, softcap=softcap,
        attention_dropout=dropout, backend=backend,
    )


def test_packed_rows_run_on_the_ragged_kernel_only_on_gpu_where_cudnn_applies():
    assert _ragged(backend="gpu") is True  # bf16 on GPU: cuDNN, ragged kernel
    assert _ragged(backend="gpu", implementation="cudnn") is True
    # Where attention stays masked XLA (rows x length^2 whatever the segments):
    assert _ragged(backend="cpu") is False
    assert _ragged(backend="tpu") is False
    assert _ragged(backend="cpu", implementation="cudnn") is False  # a forced kernel name does not make a CPU a GPU
    assert _ragged(backend="gpu", dtype=F32) is False  # fp32 compute: XLA attention
    assert _ragged(backend="gpu", implementation="xla") is False
    assert _ragged(backend="gpu", windows=(4096, 4096)) is False  # one sliding window (Mistral): masked XLA
    assert _ragged(backend="gpu", windows=(4096, None)) is False  # windows by layer (Gemma 2/3): XLA
    assert _ragged(backend="gpu", softcap=50.0) is False  # score soft cap (Gemma 2): XLA
    assert _ragged(backend="gpu", dropout=0.1) is False  # attention dropout in training: XLA


@pytest.mark.parametrize("family, ragged", [("qwen2", True), ("llama", True), ("mistral", False),
                                            ("gemma2", False), ("gemma3", False)])
def test_on_gpu_the_families_that_keep_cudnn_pack_by_default(family, ragged):
    """The rule read off real specs, as the trainer reads it: Mistral's window, Gemma's per-layer windows and
    score soft cap send attention to masked XLA, so those stay one example per row."""
    spec = jaxsft.models.spec_from_hf_config(tiny.tiny_config(family))
    got = ragged_attention_applies(attention_implementation="auto", dtype=BF16, windows=spec.windows(),
                                   softcap=spec.attn_logit_softcap, backend="gpu")
    assert got is ragged
    assert resolve_packing(None, ragged_attention=got) is ragged


def test_default_packs_exactly_where_the_ragged_kernel_applies_and_explicit_values_win():
    assert resolve_packing(None, ragged_attention=True) is True
    assert resolve_packing(None, ragged_attention=False) is False
    assert resolve_packing(None, ragged_attention=True, encoder_decoder=True) is False  # T5 / BART: no packed layout
    for ragged in (True, False):
        assert resolve_packing(True, ragged_attention=ragged) is True
        assert resolve_packing(False, ragged_attention=ragged) is False


def test_packing_accepts_only_bools_or_none():
    assert jaxsft.TrainConfig().packing is None
    with pytest.raises(ValueError, match=r"packing.*None or True or False"):
        jaxsft.TrainConfig(packing="auto")


def _trainer(packing, **kw):
    model = jaxsft.from_pretrained(tiny.tiny_torch_model("qwen2"))
    cfg = jaxsft.TrainConfig(
        learning_rate=1e-4, per_device_train_batch_size=4, max_length=32, length_buckets=(32,), logging_steps=0,
        disable_tqdm=True, seed=3, lr_scheduler_type="constant", **({} if packing == "default" else {"packing": packing}), **kw,
    )
    return jaxsft.IterativeSFTTrainer(model, cfg, mesh=jaxsft.single_device_mesh())


def test_trainer_resolves_the_default_for_its_backend():
    # bf16 compute: packed rows on a GPU (cuDNN's ragged kernel); on CPU attention is masked XLA, so no packing.
    assert _trainer("default", bf16=True).packing is (jax.default_backend() == "gpu")


@pytest.mark.slow
def test_forcing_packed_or_unpacked_gives_the_same_losses():
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, 300, n).astype(np.int32) for n in (5, 16, 9, 13, 3, 12, 8, 2)]
    plain, packed = _trainer(False), _trainer(True)
    # The planned layouts differ (so the comparison below is between two layouts) ...
    examples = batching.examples_from_tokens(ids, None, ids, max_length=32, truncation_mode="keep_end")
    plan = lambda t: batching.plan_microbatches(  # noqa: E731
        examples, rows=t.rows, buckets=t.buckets, rng=np.random.default_rng(0), pack=t.packing
    )
    assert plain.packing is False and packed.packing is True
    assert not any(mb.packed for mb in plan(plain)) and all(mb.packed for mb in plan(packed))
    # ... and train to the same per-update losses.
    want = plain.step(input_ids=ids, labels=ids)["update_losses"]
    got = packed.step(input_ids=ids, labels=ids)["update_losses"]
    assert len(want) == 2
    np.testing.assert_allclose(got, want, rtol=1e-5)
