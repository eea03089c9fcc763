"""Shared by the generation benchmarks: model shapes (random init, built in torch), an id tokenizer,
the EOS-ragged workload and the roof of a decode step (the card's peak and bandwidth come from ``roof.py``).
"""

from __future__ import annotations

SHAPES = {
    # SmolLM2-135M(-Instruct)
    "smollm2": dict(
        family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
        tie_word_embeddings=True, rms_norm_eps=1e-5,
    ),
    # Qwen2.5-0.5B(-Instruct)
    "qwen05": dict(
        family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
        tie_word_embeddings=True, rms_norm_eps=1e-6,
    ),
    # Qwen2.5-1.5B(-Instruct)
    "qwen15": dict(
        family="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
        tie_word_embeddings=True, rms_norm_eps=1e-6,
    ),
    # a small model for smoke runs
    "tiny": dict(
        family="llama", vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
    ),
}
EOS_ID = 2  # the EOS of the ragged workload (a real vocabulary row; prompts never contain it)


class IdTokenizer:
    """A stand-in tokenizer: a prompt is its token ids written as text ("17 4 998 ..."). No vocabulary files needed."""

    eos_token_id = None
    pad_token_id = 0
    chat_template = None

    def __call__(self, texts, add_special_tokens=True, **kw):
        return {"input_ids": [[int(t) for t in text.split()] for text in texts]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(r) for r in rows]


def build_torch_model(shape: str, seed: int = 0):
    import torch
    import transformers as tf

    cfg = dict(SHAPES[shape])
    family = cfg.pop("family")
    config_cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[family]
    config = config_cls(pad_token_id=0, bos_token_id=None, eos_token_id=None, **cfg)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def make_ragged(torch_model, scale: float) -> None:
    """The EOS-ragged workload: the (tied) embedding's EOS row is multiplied by ``scale``.

    With random weights every next-token distribution is close to uniform; a larger EOS row makes
    EOS's logit ``scale`` times its random value, so at temperature 1 each row stops after a random
    number of steps whose spread the scale sets (rows whose hidden states point towards the row stop
    early, others run long). The benchmark prints the lengths it got; both sides use these weights.
    """
    import torch

    with torch.no_grad():
        torch_model.get_input_embeddings().weight[EOS_ID].mul_(scale)


def roof_tok_s(shape: str, rows: int, prompt_len: int, mean_new: float, bandwidth: float, peak: float,
               shared_prompt_n: int = 1) -> float:
    """New tokens/s if a decode step took max(bytes / bandwidth, flops / peak): bf16 weights read once plus
    every row's KV at its mean filled length (a prompt shared by ``shared_prompt_n`` samples read once)."""
    bytes_step, flops_step, _, _ = _step_costs(shape, rows, prompt_len, mean_new, shared_prompt_n)
    return rows / max(bytes_step / bandwidth, flops_step / peak)


def serial_roof_tok_s(shape: str, rows: int, prompt_len: int, mean_new: float, bandwidth: float, peak: float,
                      shared_prompt_n: int = 1) -> float:
    """New tokens/s if the matmuls ran at the peak (or read their weights at the bandwidth, where that is slower)
    and attention read its KV at the bandwidth, one after the other (as the engine runs them: the GEMMs, then the
    attention kernel), with the prefill's matmuls spread over the decode steps. Unlike :func:`roof_tok_s`, no
    overlap of the compute-bound and memory-bound parts."""
    bytes_step, flops_step, kv_bytes, prefill_flops = _step_costs(shape, rows, prompt_len, mean_new, shared_prompt_n)
    matmuls = max(flops_step / peak, (bytes_step - kv_bytes) / bandwidth)
    step = matmuls + kv_bytes / bandwidth + prefill_flops / peak / max(mean_new, 1.0)
    return rows / step


def _step_costs(shape: str, rows: int, prompt_len: int, mean_new: float, shared_prompt_n: int):
    """(bytes, matmul FLOPs, KV bytes) of one decode step and the prefill's matmul FLOPs."""
    s = SHAPES[shape]
    h, f, layers, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    heads, kv = s["num_attention_heads"], s["num_key_value_heads"]
    d = h // heads
    layer_params = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * f
    matmul_params = layers * layer_params + v * h  # the lm head is a matmul every step
    kv_token = 2 * layers * kv * d * 2
    ctx = prompt_len / shared_prompt_n + mean_new / 2
    kv_bytes = rows * ctx * kv_token
    flops_step = 2 * matmul_params * rows
    prefill_flops = 2 * layers * layer_params * prompt_len * rows / shared_prompt_n  # the lm head runs on one token
    return 2 * matmul_params + kv_bytes, flops_step, kv_bytes, prefill_flops
