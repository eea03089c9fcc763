"""Tiny random T5 v1.0, T5 v1.1 (Flan-T5 layout) and BART models for tests (no downloads)."""

from __future__ import annotations

import torch

SEQ2SEQ_FAMILIES = ("t5", "t5v11", "bart")


def tiny_seq2seq_config(family: str, vocab_size: int = 120, **overrides):
    """d_model 32, 2+2 layers, 4 heads; T5 buckets small enough that short inputs reach the log-spaced ones."""
    import transformers as tf

    if family in ("t5", "t5v11"):
        v11 = family == "t5v11"
        cfg = tf.T5Config(
            vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20,
            feed_forward_proj="gated-gelu" if v11 else "relu", tie_word_embeddings=not v11,
            dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    elif family == "bart":
        cfg = tf.BartConfig(
            vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            scale_embedding=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
        )
    else:
        raise KeyError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_seq2seq_model(family: str, seed: int = 0, vocab_size: int = 120, **overrides):
    """A random-init transformers seq2seq model with non-trivial norms, biases and final_logits_bias."""
    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(tiny_seq2seq_config(family, vocab_size, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.copy_(0.1 * torch.randn_like(model.final_logits_bias))
    return model
