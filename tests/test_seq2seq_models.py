"""T5 v1.0, T5 v1.1 and BART: logits equal transformers', HF folders in and out."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSeq2SeqLM

from jaxsft.models import CheckpointError, Seq2SeqLM, from_pretrained, hf_io, save_pretrained
from jaxsft.models.seq2seq import relative_buckets
from tiny_seq2seq import SEQ2SEQ_FAMILIES, tiny_seq2seq_model


def _padded_batch(pad: int, vocab: int, seed: int = 0):
    """Encoder inputs of lengths 11, 7, 3 (right-padded) and decoder inputs of lengths 9, 4, 6 (right-padded)."""
    rng = np.random.default_rng(seed)
    enc_lens, dec_lens = (11, 7, 3), (9, 4, 6)
    ids = np.full((3, 11), pad, np.int64)
    mask = np.zeros((3, 11), np.int64)
    dec = np.full((3, 9), pad, np.int64)
    dec_mask = np.zeros((3, 9), np.int64)
    for r, (n, m) in enumerate(zip(enc_lens, dec_lens)):
        ids[r, :n] = rng.integers(3, vocab, n)
        mask[r, :n] = 1
        dec[r, :m] = rng.integers(3, vocab, m)
        dec_mask[r, :m] = 1
    return ids, mask, dec, dec_mask


@pytest.mark.parametrize("family", SEQ2SEQ_FAMILIES)
@pytest.mark.slow
def test_logits_match_transformers_with_padding(family):
    torch_model = tiny_seq2seq_model(family)
    model = from_pretrained(torch_model)
    assert isinstance(model, Seq2SeqLM)
    ids, mask, dec, dec_mask = _padded_batch(torch_model.config.pad_token_id, 120)
    with torch.no_grad():
        ref = torch_model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(dec), decoder_attention_mask=torch.tensor(dec_mask),
        ).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec), jnp.asarray(dec_mask)))
    real = dec_mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=1e-4)
    # Without the decoder mask the real (causal) positions are unchanged: right padding is only ever in the future.
    ours_unmasked = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec)))
    np.testing.assert_allclose(ours_unmasked[real], ref[real], atol=1e-4, rtol=1e-4)


def test_t5_switches_are_read_from_the_config():
    v10, v11 = (from_pretrained(tiny_seq2seq_model(f)).spec for f in ("t5", "t5v11"))
    assert v10.scale_decoder_outputs and v10.mlp == "plain" and v10.activation == "relu"
    assert not v11.scale_decoder_outputs and v11.mlp == "gated" and v11.activation == "gelu_new"
    bart = from_pretrained(tiny_seq2seq_model("bart")).spec
    assert bart.final_logits_bias and not bart.pre_norm and bart.embed_scale == pytest.approx(32**0.5)


def test_relative_buckets_equal_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    for bidirectional in (True, False):
        rel = torch.arange(70)[None, :] - torch.arange(70)[:, None]
        ref = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
        ours = relative_buckets(70, 70, bidirectional=bidirectional, num_buckets=32, max_distance=128)
        np.testing.assert_array_equal(ours, ref.numpy())


@pytest.mark.parametrize("family", SEQ2SEQ_FAMILIES)
def test_save_load_bit_identical_and_transformers_loads_it(family, tmp_path):
    torch_model = tiny_seq2seq_model(family)
    model = from_pretrained(torch_model)
    save_pretrained(model, tmp_path / "m")
    again = from_pretrained(tmp_path / "m")
    a, b = hf_io.hf_state_dict(model), hf_io.hf_state_dict(again)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "m").eval()
    ref_sd = torch_model.state_dict()
    for key, value in reloaded.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), ref_sd[key].numpy(), err_msg=key)
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "np") as f:
        written = set(f.keys())
    assert written == set(a)


def test_missing_and_extra_weights_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = from_pretrained(tiny_seq2seq_model("t5"))
    save_pretrained(model, tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    weights.pop("decoder.block.1.layer.1.EncDecAttention.k.weight")
    weights["encoder.block.0.layer.0.SelfAttention.extra"] = np.zeros(3, np.float32)
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing weights: decoder\.block\.1\.layer\.1\.EncDecAttention\.k\.weight.*unexpected weights: encoder\.block\.0\.layer\.0\.SelfAttention\.extra"):
        from_pretrained(tmp_path / "m")


def test_bart_missing_and_misshaped_weights_are_named_before_placing(tmp_path, monkeypatch):
    """Checked from the headers: a missing and a wrong-shaped BART tensor are both named, nothing is placed."""
    from safetensors.numpy import load_file, save_file

    import jaxsft.infra.sharding as shd

    tiny_seq2seq_model("bart").save_pretrained(str(tmp_path / "m"))
    weights = load_file(tmp_path / "m" / "model.safetensors")
    weights.pop("model.decoder.layers.1.encoder_attn.out_proj.bias")
    weights["model.encoder.layers.0.fc1.weight"] = np.zeros((64, 31), np.float32)
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(shd, "place_array", lambda *a, **k: pytest.fail("a parameter was placed before the check"))
    with pytest.raises(CheckpointError, match=r"missing weights: model\.decoder\.layers\.1\.encoder_attn\.out_proj\.bias"
                       r".*wrong weights: model\.encoder\.layers\.0\.fc1\.weight has shape \(64, 31\), expected \(64, 32\)"):
        from_pretrained(tmp_path / "m")


def test_t5_misshaped_relative_bias_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    tiny_seq2seq_model("t5v11").save_pretrained(str(tmp_path / "m"))
    weights = load_file(tmp_path / "m" / "model.safetensors")
    key = "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    weights[key] = np.zeros((9, 4), np.float32)
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"wrong weights: {key.replace('.', '[.]')} has shape \(9, 4\), expected \(8, 4\)"):
        from_pretrained(tmp_path / "m")


def test_bart_without_final_logits_bias_loads_it_as_zeros(tmp_path):
    """Some BART files lack the (untrained) final_logits_bias buffer: it loads as zeros, everything else as saved,
    and saving writes it back in HF's [1, V] layout."""
    from safetensors.numpy import load_file, save_file

    torch_model = tiny_seq2seq_model("bart")
    torch_model.save_pretrained(str(tmp_path / "m"))
    weights = load_file(tmp_path / "m" / "model.safetensors")
    assert weights.pop("final_logits_bias").shape == (1, 120)
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    model = from_pretrained(tmp_path / "m")
    np.testing.assert_array_equal(np.asarray(model.final_logits_bias[...]), np.zeros(120, np.float32))
    out = hf_io.hf_state_dict(model)
    np.testing.assert_array_equal(out["final_logits_bias"], np.zeros((1, 120), np.float32))
    for key, value in weights.items():
        if key in out:
            np.testing.assert_array_equal(out[key], value, err_msg=key)
