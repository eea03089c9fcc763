"""Tiny models and an offline tokenizer, built locally for tests (no downloads)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

WORDS = (
    "the quick brown fox jumps over the lazy dog while a small cat sleeps on a warm mat "
    "and numbers like one two three four five six seven eight nine ten add up to answers"
).split()


@functools.lru_cache(maxsize=None)
def tokenizer_dir(tmp_root: str, vocab_size: int = 300) -> str:
    """Train a byte-level BPE tokenizer on a fixed corpus and save it (pad=0, eos=1, bos=2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    lines = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<|pad|>", "<|eos|>", "<|bos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>", bos_token="<|bos|>")
    out = Path(tmp_root) / f"tokenizer-{vocab_size}"
    hf.save_pretrained(out)
    return str(out)


def load_tokenizer(path: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


def tiny_config(family: str, vocab_size: int = 300, **overrides):
    """A small random config of one family; heads and MLP divisible by 2 and 4 for tensor sharding."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if family == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    else:
        base = dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, **common,
        )
        if family == "llama":
            cfg = tf.LlamaConfig(tie_word_embeddings=False, **base)
        elif family == "llama3":
            cfg = tf.LlamaConfig(
                tie_word_embeddings=False,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                rope_theta=500000.0, **base,
            )
        elif family == "smollm2":
            cfg = tf.LlamaConfig(tie_word_embeddings=True, rope_theta=100000.0, **base)
        elif family == "mistral":
            cfg = tf.MistralConfig(sliding_window=4096, **base)
        elif family == "qwen2":
            cfg = tf.Qwen2Config(tie_word_embeddings=True, **base)
        elif family == "qwen3":
            cfg = tf.Qwen3Config(head_dim=32, tie_word_embeddings=False, **base)
        elif family == "gemma2":  # 3 layers: sliding, global, sliding; a window of 5 binds on any test batch
            cfg = tf.Gemma2Config(**{**base, "num_hidden_layers": 3}, head_dim=16, sliding_window=5,
                                  query_pre_attn_scalar=24, attn_logit_softcapping=0.5, final_logit_softcapping=4.0,
                                  attn_implementation="eager")
        elif family == "gemma3":  # Gemma3ForCausalLM: q/k norms, local RoPE base for the sliding layers
            cfg = tf.Gemma3TextConfig(**{**base, "num_hidden_layers": 3}, head_dim=16, sliding_window=5,
                                      query_pre_attn_scalar=24, final_logit_softcapping=4.0,
                                      layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                      rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                                                       "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}},
                                      attn_implementation="eager")
        else:
            raise KeyError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


FAMILIES = ("llama", "llama3", "smollm2", "mistral", "qwen2", "qwen3", "gpt2")
GEMMA_FAMILIES = ("gemma2", "gemma3")


def tiny_torch_model(family: str, seed: int = 0, vocab_size: int = 300, **overrides):
    """A random-init transformers model, with non-trivial norm weights and biases so mapping bugs show."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model
