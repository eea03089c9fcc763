#!/usr/bin/env python3
"""LoRA training throughput on one GPU: jaxsft against TRL 0.23.1 + peft (eager), in one run.

Workload: a Llama-2-7B-shape model (random init, bf16 base weights), LoRA rank 16 (alpha 32, no
dropout) on every linear layer of every block (q/k/v/o/gate/up/down; the lm_head stays frozen),
each ``step()`` call gets 64 random sequences of 512 tokens, trained as micro-batches of 8 x 512
(one AdamW update per micro-batch, clipping at 1.0, constant lr 1e-4), bf16 compute, no gradient
checkpointing on either side. Each side runs in its own process, so its peak memory is its own;
a third process measures the bf16 matmul peak on random data (torch, 8192^3) for MFU.

MFU counts the work the step really has to do with a frozen base:

    flops/token = 4 * N_frozen + 6 * N_lora + 12 * L * H * S

* ``4 * N_frozen``: forward (2) and backward through the activations (2) of every frozen matmul
  (non-embedding weights + the lm_head, V * H); frozen weights need no weight gradient (the 6 N of
  full fine-tuning minus the 2 N weight-gradient matmul).
* ``6 * N_lora``: the adapters are trained: forward, activation and weight gradients.
* ``12 * L * H * S``: attention scores and values, forward + backward, no causal discount (as the
  repository's other GPU benchmarks count it).

    python benchmarks/bench_lora_gpu.py                        # on the GPU machine (TRL + peft importable)
    python benchmarks/bench_lora_gpu.py --shape tiny --seq 64 --cpu \\
        --trl-python .ref-venv/bin/python                      # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench_speed import drop_named_cache  # noqa: E402  (stdlib imports only)

drop_named_cache(os.environ)  # first steps are timed cold; before jax (imported in the functions) reads it

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "llama7b": (4096, 11008, 32, 32, 32, 32000),  # Llama-2-7B
    "tiny": (64, 128, 2, 4, 4, 512),  # CPU smoke test only
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA, LR = 16, 32, 1e-4
SEQS, MICRO = 64, 8


def log(*parts) -> None:
    print(*parts, flush=True)


def hf_config(shape: str):
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
        tie_word_embeddings=False, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def flop_counts(shape: str, seq: int) -> dict:
    """N_frozen, N_lora and flops/token by the formula in the module docstring (pure arithmetic)."""
    h, f, layers, heads, kv, vocab = SHAPES[shape]
    d = h // heads
    shapes = {  # (in, out) of each adapted linear layer
        "q_proj": (h, heads * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d), "o_proj": (heads * d, h),
        "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h),
    }
    n_linear = layers * sum(i * o for i, o in shapes.values())
    n_frozen = n_linear + vocab * h  # + lm_head
    n_lora = layers * sum(RANK * (i + o) for i, o in shapes.values())
    attention = 12 * layers * h * seq
    return {"n_frozen_matmul": n_frozen, "n_lora": n_lora, "attention_flops_per_token": attention,
            "flops_per_token": 4 * n_frozen + 6 * n_lora + attention}


def random_calls(vocab: int, seq: int, calls: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, (SEQS, seq), dtype=np.int64) for _ in range(calls)]


# ------------------------------------------------------------------------------------------ workers
def run_peak(cpu: bool) -> dict:
    """The card's bf16 matmul peak on random data (``roof.matmul_peak``); a 512-wide one on a CPU (smoke tests)."""
    from roof import device_name, matmul_peak

    if cpu:  # the worker's environment sets JAX_PLATFORMS=cpu
        return {"impl": "peak", "n": 512, "tflops": matmul_peak(512, probe="jax") / 1e12, "device": "cpu"}
    return {"impl": "peak", "n": 8192, "tflops": matmul_peak() / 1e12, "device": device_name()}


def run_jax(shape: str, seq: int, warmup: int, timed: int) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxsft
    from jaxsft.models.families import spec_from_hf_config

    spec = spec_from_hf_config(hf_config(shape))
    mesh = jaxsft.single_device_mesh()
    model = jaxsft.init_model(spec, mesh=mesh, seed=0, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    jaxsft.add_lora(model, jaxsft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS)))
    cfg = jaxsft.TrainConfig(
        learning_rate=LR, lr_scheduler_type="constant", per_device_train_batch_size=MICRO, max_length=seq,
        length_buckets=(seq,), bf16=True, max_grad_norm=1.0, weight_decay=0.0, logging_steps=0, disable_tqdm=True,
        compilation_cache=False,  # compile times as on a fresh machine
    )
    trainer = jaxsft.IterativeSFTTrainer(model, cfg, mesh=mesh)
    times, losses = [], []
    for ids in random_calls(spec.vocab_size, seq, warmup + timed):
        t = time.perf_counter()
        stats = trainer.step(input_ids=ids)
        jax.block_until_ready(trainer.params)
        times.append(time.perf_counter() - t)
        losses.append(stats["loss"])
    device = jax.devices()[0]
    peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
    trained = sum(int(x.size) for x in jax.tree.leaves(trainer.params))
    return _summary("jaxsft LoRA", times, warmup, seq, peak, losses, {
        "updates_per_call": stats["num_updates"], "compiled": stats["compiled_shapes"], "trained_params": trained,
        "base_dtype": str(jax.tree.leaves(trainer.frozen_params)[0].dtype), "device": str(device.device_kind),
        "jax": jax.__version__,
    })


def run_trl(shape: str, seq: int, warmup: int, timed: int, cpu: bool) -> dict:
    import torch
    import transformers
    import trl
    import peft
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    from trl import IterativeSFTConfig, IterativeSFTTrainer

    dev = torch.device("cpu" if cpu or not torch.cuda.is_available() else "cuda")
    cfg = hf_config(shape)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        base = LlamaForCausalLM(cfg).to(torch.bfloat16)  # bf16 base, random init, built on the device
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS),
                                            task_type="CAUSAL_LM"))
    tokenizer = _tokenizer(cfg.vocab_size)
    # TRL 0.23.1 + transformers 5 rejects a plain TrainingArguments (KeyError 'push_to_hub_token', see
    # shared/reference/trl_gpu_baseline.md); IterativeSFTConfig with its defaults pinned is the working form.
    args = IterativeSFTConfig(
        output_dir="/tmp/bench-lora-trl", per_device_train_batch_size=MICRO, learning_rate=LR,
        lr_scheduler_type="constant", max_steps=1000, weight_decay=0.0, max_grad_norm=1.0, bf16=not cpu,
        gradient_checkpointing=False, max_length=seq, logging_steps=1000, report_to=[], save_strategy="no",
        use_cpu=dev.type == "cpu",
    )
    trainer = IterativeSFTTrainer(model=model, args=args, processing_class=tokenizer)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for ids in random_calls(cfg.vocab_size, seq, warmup + timed):
        batch = [torch.from_numpy(row) for row in ids]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        trainer.step(input_ids=batch, attention_mask=[torch.ones_like(x) for x in batch], labels=batch)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return _summary("TRL 0.23.1 + peft (eager)", times, warmup, seq, peak, None, {  # no loss logged: logging_steps
        "updates_per_call": SEQS // MICRO, "trained_params": trained, "base_dtype": str(base.lm_head.weight.dtype),
        "global_step": trainer.state.global_step, "versions": {"torch": torch.__version__, "transformers":
        transformers.__version__, "trl": trl.__version__, "peft": peft.__version__},
    })


def _tokenizer(vocab: int):
    """TRL requires a tokenizer even for input_ids (its collator pads): a tiny offline BPE one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = [" ".join(f"w{i}x{j}" for j in range(50)) for i in range(200)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=min(vocab, 1000), special_tokens=["<pad>", "<bos>", "<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def _summary(impl: str, times, warmup: int, seq: int, peak_bytes, losses, extra: dict) -> dict:
    timed = times[warmup:]
    median = statistics.median(timed)
    return {"impl": impl, "tokens_per_s": SEQS * seq / median, "step_median_s": median, "first_step_s": times[0],
            "step_times_s": [round(t, 4) for t in times], "peak_gib": peak_bytes / 2**30 if peak_bytes else None,
            "losses": losses, **extra}


# ------------------------------------------------------------------------------------------ driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama7b", choices=sorted(SHAPES))
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (the smoke test uses fewer)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timed", type=int, default=5)
    parser.add_argument("--cpu", action="store_true", help="run everything on the CPU (smoke test)")
    parser.add_argument("--trl-python", default=sys.executable, help="interpreter with trl 0.23.1 + peft importable")
    parser.add_argument("--skip", default="", help="comma-separated workers to leave out: jax,trl,peak")
    parser.add_argument("--out", default=None, help="write all results as JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker == "jax":
            result = run_jax(args.shape, args.seq, args.warmup, args.timed)
        elif args.worker == "trl":
            result = run_trl(args.shape, args.seq, args.warmup, args.timed, args.cpu)
        else:
            result = run_peak(args.cpu)
        log("RESULT " + json.dumps(result))
        return

    skip = {s for s in args.skip.split(",") if s}
    results = {}
    for worker in ("peak", "jax", "trl"):
        if worker in skip:
            continue
        # the peak runs where jax is (roof.py: torch's probe on CUDA, jax's on a CPU); TRL's interpreter may lack jax
        python = args.trl_python if worker == "trl" else sys.executable
        cmd = [python, os.path.abspath(__file__), "--worker", worker, "--shape", args.shape, "--seq", str(args.seq),
               "--warmup", str(args.warmup), "--timed", str(args.timed)] + (["--cpu"] if args.cpu else [])
        env = dict(os.environ)
        if args.cpu:
            env["JAX_PLATFORMS"] = "cpu"
        if python != sys.executable:
            env.pop("PYTHONPATH", None)  # another interpreter: keep this one's packages out of it
            if os.environ.get("TRL_PYTHONPATH"):
                env["PYTHONPATH"] = os.environ["TRL_PYTHONPATH"]
        log(f"== {worker}: {' '.join(cmd[1:])}")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            log(proc.stdout[-3000:], proc.stderr[-3000:])
            results[worker] = {"impl": worker, "error": proc.stderr[-800:]}
            continue
        results[worker] = json.loads(lines[-1][len("RESULT "):])
        log(json.dumps(results[worker]))

    counts = flop_counts(args.shape, args.seq)
    fpt = counts["flops_per_token"]
    peak = results.get("peak", {}).get("tflops")
    log(f"\nshape={args.shape} seq={args.seq} {SEQS}x{args.seq} tokens per step() call, micro-batch {MICRO}, LoRA r={RANK} "
        f"alpha={ALPHA} on {','.join(TARGETS)}; N_frozen={counts['n_frozen_matmul'] / 1e9:.3f}B "
        f"N_lora={counts['n_lora'] / 1e6:.1f}M flops/token={fpt / 1e9:.2f}G (4 N_frozen + 6 N_lora + 12 L H S); "
        f"bf16 matmul peak (random data, this run) = {peak and round(peak, 1)} TFLOP/s on "
        f"{results.get('peak', {}).get('device')}")
    trl_tps = results.get("trl", {}).get("tokens_per_s")
    log("| impl | tokens/s | step median s | first call s | peak GiB | MFU % | vs TRL+peft |")
    log("|---|---:|---:|---:|---:|---:|---:|")
    for worker in ("jax", "trl"):
        r = results.get(worker)
        if r is None:
            continue
        if "error" in r:
            log(f"| {worker} | error | | | | | |")
            continue
        mfu = 100 * fpt * r["tokens_per_s"] / (peak * 1e12) if peak else float("nan")
        ratio = r["tokens_per_s"] / trl_tps if trl_tps else float("nan")
        peak_gib = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "n/a"
        log(f"| {r['impl']} | {r['tokens_per_s']:,.0f} | {r['step_median_s']:.3f} | {r['first_step_s']:.1f} | "
            f"{peak_gib} | {mfu:.1f} | {ratio:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shape": args.shape, "seq": args.seq, **counts, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
