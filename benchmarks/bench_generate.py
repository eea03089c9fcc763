"""Generation throughput: jaxsft.generate against transformers' generate (torch) on the same machine.

Both sides get the same randomly initialised model (built in torch, converted in
memory), the same prompts (batch x prompt-len random ids, no padding) and
produce exactly ``--new-tokens`` tokens per row (EOS disabled on both). bf16 on
GPU, fp32 on CPU (``--dtype`` overrides). Needs only torch, transformers, jax,
flax and optax (plus this repository).

    python benchmarks/bench_generate.py --shape smollm2                 # batch 64 x 128 new, prompt 128
    python benchmarks/bench_generate.py --shape qwen05
    python benchmarks/bench_generate.py --quick                         # a small CPU run

Timing: each side runs once to warm up (jit compilation; torch's first-call
overheads), then ``--repeats`` timed runs; the table shows the median, and
tokens/s counts generated tokens (batch x new tokens).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    # a small model for smoke runs
    "tiny": dict(
        family="llama", vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
    ),
}


class IdTokenizer:
    """A stand-in tokenizer: a prompt is its token ids written as text ("17 4 998 ..."). No vocabulary files needed."""

    eos_token_id = None
    pad_token_id = 0
    chat_template = None

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[int(t) for t in text.split()] for text in texts]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(r) for r in rows]


def build_torch_model(shape: str, seed: int):
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


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return warm, times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--quick", action="store_true", help="a small CPU setting: batch 8, prompt 32, 32 new tokens, 1 repeat")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-jax", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.prompt_len, args.new_tokens, args.repeats = 8, 32, 32, 1

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import jaxsft
    from jaxsft.generation import generate

    on_gpu_jax = jax.default_backend() != "cpu"
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and (on_gpu_jax or torch_device == "cuda"))
    dtype_name = "bf16" if bf16 else "fp32"

    torch_model = build_torch_model(args.shape, args.seed)
    n_params = sum(p.numel() for p in torch_model.parameters())
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(3, SHAPES[args.shape]["vocab_size"], size=(args.batch, args.prompt_len))
    rows = []
    total_new = args.batch * args.new_tokens

    if not args.skip_jax:
        jdtype = jnp.bfloat16 if bf16 else jnp.float32
        model = jaxsft.from_pretrained(torch_model, dtype=jdtype, param_dtype=jdtype)
        tok = IdTokenizer()
        prompts = [" ".join(map(str, row)) for row in ids]

        def run_jax():
            res = generate(model, tok, prompts, max_new_tokens=args.new_tokens, eos_token_ids=[], return_tokens=True)
            assert all(len(t) == args.new_tokens for t in res.tokens)

        warm, times = timed(run_jax, args.repeats)
        rows.append(("jaxsft.generate", jax.devices()[0].device_kind, warm, times))
        del model

    if not args.skip_hf:
        tmodel = torch_model.to(device=torch_device, dtype=torch.bfloat16 if bf16 else torch.float32)
        input_ids = torch.as_tensor(ids, device=torch_device)
        mask = torch.ones_like(input_ids)

        def run_hf():
            with torch.inference_mode():
                out = tmodel.generate(
                    input_ids=input_ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                )
            if torch_device == "cuda":
                torch.cuda.synchronize()
            assert out.shape == (args.batch, args.prompt_len + args.new_tokens)

        warm, times = timed(run_hf, args.repeats)
        device = torch.cuda.get_device_name() if torch_device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        rows.append(("transformers.generate", device, warm, times))

    print(
        f"\nshape {args.shape} ({n_params / 1e6:.0f}M params), {dtype_name}, batch {args.batch}, "
        f"prompt {args.prompt_len}, {args.new_tokens} new tokens (EOS off), median of {args.repeats}"
    )
    print(f"| {'implementation':<22} | {'device':<26} | {'first call s':>12} | {'seconds':>8} | {'tokens/s':>9} | {'ratio':>6} |")
    print(f"|{'-' * 24}|{'-' * 28}|{'-' * 14}|{'-' * 10}|{'-' * 11}|{'-' * 8}|")
    hf_tps = None
    for name, device, _, times in rows:
        if name.startswith("transformers"):
            hf_tps = total_new / statistics.median(times)
    for name, device, warm, times in rows:
        med = statistics.median(times)
        tps = total_new / med
        ratio = f"{tps / hf_tps:.2f}x" if hf_tps else "-"
        print(f"| {name:<22} | {device[:26]:<26} | {warm:>12.1f} | {med:>8.2f} | {tps:>9.0f} | {ratio:>6} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
