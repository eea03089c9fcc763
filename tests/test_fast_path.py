"""The default's per-backend choices (jaxsft.fast_path): packing where cuDNN's ragged kernel makes it faster."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsft
from jaxsft import batching
from jaxsft.fast_path import resolve_packing

import tiny

BF16, F32 = jnp.bfloat16, jnp.float32


def _resolve(packing=None, *, backend, dtype=BF16, implementation="auto", window=None, dropout=0.0, enc_dec=False):
    return resolve_packing(
        packing, attention_implementation=implementation, dtype=dtype, sliding_window=window,
        attention_dropout=dropout, encoder_decoder=enc_dec, backend=backend,
    )


def test_default_packs_only_on_gpu_where_the_ragged_kernel_applies():
    assert _resolve(backend="gpu") is True  # bf16 on GPU: cuDNN, ragged kernel
    assert _resolve(backend="gpu", implementation="cudnn") is True
    # Where attention stays masked XLA (rows x length^2 whatever the segments), one example per row.
    assert _resolve(backend="cpu") is False
    assert _resolve(backend="tpu") is False
    assert _resolve(backend="cpu", implementation="cudnn") is False  # a forced kernel name does not make a CPU a GPU
    assert _resolve(backend="gpu", dtype=F32) is False  # fp32 compute: XLA attention
    assert _resolve(backend="gpu", implementation="xla") is False
    assert _resolve(backend="gpu", window=4096) is False  # sliding window: masked XLA
    assert _resolve(backend="gpu", dropout=0.1) is False  # attention dropout in training: XLA
    assert _resolve(backend="gpu", enc_dec=True) is False  # T5 / BART have no packed layout


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_explicit_packing_is_forced_on_every_backend(backend):
    for dtype in (BF16, F32):
        assert _resolve(True, backend=backend, dtype=dtype) is True
        assert _resolve(False, backend=backend, dtype=dtype) is False


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
