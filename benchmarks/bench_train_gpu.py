#!/usr/bin/env python3
"""GPU training throughput: jaxsft's trainer on 1 and N GPUs (data-parallel and FSDP) beside a plain
PyTorch loop on one GPU, all in one run so the ratios compare like with like.

Workload (as in shared/reference/trl_gpu_baseline.md): each ``step()`` call gets 64 random sequences
of 512 tokens per data-parallel way, trained as micro-batches of 8 x 512 per device, one AdamW update
per micro-batch, clipping at 1.0, fp32 master weights and Adam state, bf16 compute. Every
configuration runs in its own process so peak memory belongs to it alone.

    python benchmarks/bench_train_gpu.py --shape qwen05 --gpus 2 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from roof import matmul_peak  # the card's bf16 peak: one probe for every benchmark
from bench_speed import drop_named_cache  # noqa: E402  (stdlib imports only)

drop_named_cache(os.environ)  # first steps are timed cold; before jax (imported in the functions) reads it

SHAPES = {
    # name: (model_type, hidden, intermediate, layers, heads, kv_heads, vocab, tied)
    "tiny": ("qwen2", 128, 256, 2, 4, 2, 1024, True),
    "smol": ("llama", 576, 1536, 30, 9, 3, 49152, True),
    "qwen05": ("qwen2", 896, 4864, 24, 14, 2, 151936, True),
    "qwen15": ("qwen2", 1536, 8960, 28, 12, 2, 151936, True),
}
SEQ = 512
PER_DEVICE_BATCH = 8
SEQS_PER_WAY = 64


def hf_config(shape: str):
    import transformers as tf

    model_type, hidden, inter, layers, heads, kv, vocab, tied = SHAPES[shape]
    cls = tf.Qwen2Config if model_type == "qwen2" else tf.LlamaConfig
    return cls(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
        tie_word_embeddings=tied, use_cache=False,
    )


def flops_per_token(shape: str) -> float:
    from jaxsft.models.families import spec_from_hf_config

    spec = spec_from_hf_config(hf_config(shape))
    n = spec.num_parameters(include_embeddings=False) + spec.vocab_size * spec.hidden_size
    return 6 * n + 12 * spec.num_layers * spec.hidden_size * SEQ


def random_calls(vocab: int, sequences: int, calls: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, (sequences, SEQ), dtype=np.int32) for _ in range(calls)]


# ------------------------------------------------------------------------------------------ workers
def run_jax(shape: str, mesh_shape: tuple[int, int, int], warmup: int, timed: int, remat: bool, loss: str) -> dict:
    import jax
    import numpy as np

    import jaxsft
    from jaxsft.models.families import spec_from_hf_config

    data, fsdp, tensor = mesh_shape
    ndev = data * fsdp * tensor
    devices = jax.devices()[:ndev]
    mesh = jaxsft.make_mesh(data, fsdp, tensor, devices=devices)
    spec = spec_from_hf_config(hf_config(shape))
    model = jaxsft.init_model(spec, mesh=mesh, seed=0)
    cfg = jaxsft.TrainConfig(
        learning_rate=1e-5, lr_scheduler_type="constant", per_device_train_batch_size=PER_DEVICE_BATCH,
        max_length=SEQ, length_buckets=(SEQ,), bf16=True, logging_steps=0, disable_tqdm=True,
        gradient_checkpointing=remat, compilation_cache=False,  # compile times as on a fresh machine
        # JAXSFT_BENCH_SCAN=1/0 forces scanned/unrolled layers; unset = the trainer's automatic choice.
        scan_layers={"1": True, "0": False}.get(os.environ.get("JAXSFT_BENCH_SCAN", "")),
        # "full": never chunk the lm_head + loss; "auto": chunk over tokens when fp32 logits pass 1 GiB/device.
        loss_chunk_bytes=1 << 62 if loss == "full" else 1 << 30,
        # JSON dict of XLA options; unset = TrainConfig's default (overlap options on GPUs).
        xla_options=json.loads(os.environ["JAXSFT_BENCH_XLA_OPTIONS"]) if os.environ.get("JAXSFT_BENCH_XLA_OPTIONS") else None,
    )
    trainer = jaxsft.IterativeSFTTrainer(model, cfg, mesh=mesh)
    ways = data * fsdp
    calls = random_calls(spec.vocab_size, SEQS_PER_WAY * ways, warmup + timed)
    times, first, losses = [], None, []
    for i, ids in enumerate(calls):
        t = time.perf_counter()
        stats = trainer.step(input_ids=ids)
        jax.block_until_ready(trainer.params)
        dt = time.perf_counter() - t
        losses.append(stats["loss"])
        if i == 0:
            first = dt
        if i >= warmup:
            times.append(dt)
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in devices)
    median = float(np.median(times))
    tokens = SEQS_PER_WAY * ways * SEQ
    return {
        "impl": f"jaxsft ({loss} loss, chunk {trainer.objective.chunk_size}{'' if trainer.scan_layers else ', unrolled'})", "mesh": f"{data}x{fsdp}x{tensor}", "gpus": ndev, "tokens_per_s": tokens / median,
        "step_median_s": median, "first_step_s": first, "peak_gib_per_gpu": peak / 2**30,
        "losses": losses, "updates_per_call": stats["num_updates"], "compiled": stats["compiled_shapes"],
        "matmul_peak_tflops": matmul_peak() / 1e12 if (ndev == 1 and jax.default_backend() == "gpu") else None, "device": str(devices[0].device_kind),
    }


def run_torch(shape: str, warmup: int, timed: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = hf_config(shape)
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
    calls = random_calls(cfg.vocab_size, SEQS_PER_WAY, warmup + timed)
    torch.cuda.reset_peak_memory_stats()
    times, first, losses = [], None, []
    for i, ids in enumerate(calls):
        torch.cuda.synchronize()
        t = time.perf_counter()
        batch = torch.from_numpy(ids).long()
        perm = torch.randperm(batch.shape[0])
        total = 0.0
        for start in range(0, batch.shape[0], PER_DEVICE_BATCH):
            mb = batch[perm[start:start + PER_DEVICE_BATCH]].to("cuda", non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=mb, attention_mask=torch.ones_like(mb), labels=mb).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            total += loss.item()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        losses.append(total / (batch.shape[0] // PER_DEVICE_BATCH))
        if i == 0:
            first = dt
        if i >= warmup:
            times.append(dt)
    median = float(np.median(times))
    peak = matmul_peak()
    return {
        "impl": "torch loop (amp bf16, fused AdamW, sdpa)", "mesh": "-", "gpus": 1,
        "tokens_per_s": SEQS_PER_WAY * SEQ / median, "step_median_s": median, "first_step_s": first,
        "peak_gib_per_gpu": torch.cuda.max_memory_allocated() / 2**30, "losses": losses,
        "matmul_peak_tflops": peak / 1e12, "device": torch.cuda.get_device_name(0),
    }


# ------------------------------------------------------------------------------------------ driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen05", choices=sorted(SHAPES))
    parser.add_argument("--gpus", type=int, default=2, help="largest device count to scale to")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timed", type=int, default=5)
    parser.add_argument("--out", default=None, help="write all results as JSON here")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mesh", default="1,1,1", help=argparse.SUPPRESS)
    parser.add_argument("--loss", default="auto", choices=("auto", "full"), help=argparse.SUPPRESS)
    parser.add_argument("--ablate-loss", action="store_true", help="also run every mesh with full logits")
    args = parser.parse_args()

    if args.worker == "jax":
        mesh = tuple(int(x) for x in args.mesh.split(","))
        result = run_jax(args.shape, mesh, args.warmup, args.timed, args.remat, args.loss)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.worker == "torch":
        print("RESULT " + json.dumps(run_torch(args.shape, args.warmup, args.timed)), flush=True)
        return

    meshes = ["1,1,1"] + ([f"{args.gpus},1,1", f"1,{args.gpus},1"] if args.gpus > 1 else [])
    plans = [("jax", mesh, "auto") for mesh in meshes]
    if args.ablate_loss:
        plans += [("jax", mesh, "full") for mesh in meshes[:2]]
    if not args.skip_torch:
        plans.append(("torch", "-", "-"))
    results = []
    for worker, mesh, loss in plans:
        cmd = [sys.executable, __file__, "--worker", worker, "--mesh", mesh, "--shape", args.shape, "--loss",
               loss if loss != "-" else "auto", "--warmup", str(args.warmup), "--timed", str(args.timed)]
        cmd += ["--remat"] if args.remat else []
        print(f"== {worker} mesh={mesh} loss={loss}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stdout[-3000:], proc.stderr[-3000:], flush=True)
            results.append({"impl": worker, "mesh": mesh, "error": proc.stderr[-500:]})
            continue
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(results[-1]), flush=True)

    fpt = flops_per_token(args.shape)
    is_jax = lambda r: r.get("impl", "").startswith("jaxsft")  # noqa: E731
    base_jax = next((r for r in results if is_jax(r) and r.get("gpus") == 1 and "error" not in r), None)
    base_torch = next((r for r in results if r.get("impl", "").startswith("torch") and "error" not in r), None)
    peak = (base_jax or {}).get("matmul_peak_tflops") or (base_torch or {}).get("matmul_peak_tflops")
    print(f"\nshape={args.shape}  seq={SEQ}  micro-batch {PER_DEVICE_BATCH}x{SEQ} per device  "
          f"flops/token={fpt / 1e6:.1f}M  bf16 matmul peak (same run)={peak and round(peak)} TFLOP/s")
    print("| impl | mesh d×f×t | GPUs | tokens/s | per-GPU tokens/s | MFU % | vs torch 1 GPU | scaling eff. (vs best 1-GPU) | peak GiB/GPU | first call s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['impl']} | {r['mesh']} | - | error | | | | | | |")
            continue
        per_gpu = r["tokens_per_s"] / r["gpus"]
        mfu = 100 * fpt * per_gpu / (peak * 1e12) if peak else float("nan")
        vs_torch = r["tokens_per_s"] / base_torch["tokens_per_s"] if base_torch else float("nan")
        # Scaling efficiency against the fastest single-GPU jaxsft run of this call, whatever its layout.
        singles = [b["tokens_per_s"] for b in results if is_jax(b) and b.get("gpus") == 1 and "error" not in b]
        eff = per_gpu / max(singles) if (is_jax(r) and singles) else float("nan")
        print(f"| {r['impl']} | {r['mesh']} | {r['gpus']} | {r['tokens_per_s']:,.0f} | {per_gpu:,.0f} | {mfu:.1f} | "
              f"{vs_torch:.2f}× | {eff:.3f} | {r['peak_gib_per_gpu']:.1f} | {r['first_step_s']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shape": args.shape, "flops_per_token": fpt, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
