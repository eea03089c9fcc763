"""Generation throughput: jaxsft.generate against transformers' generate (torch) on the same machine.

Both sides get the same randomly initialised model (built in torch, converted in memory), the
same prompts (batch x prompt-len random ids, no padding), bf16 on GPU (fp32 on CPU), greedy
(``--temperature`` for sampling). Two workloads:

* fixed (default): exactly ``--new-tokens`` per row (EOS off on both sides);
* ``--ragged SCALE``: EOS on, with the EOS row of the tied embedding scaled (``gen_common.make_ragged``),
  sampled at temperature 1, up to ``--new-tokens``; tokens/s counts the useful tokens (up to EOS)
  and the row lengths are printed.

Each row also prints the roof: new tokens/s if a decode step cost only max(weights + KV bytes at
the bandwidth measured in the same run (a 2 GiB read and write), matmul FLOPs at the measured bf16 peak), and the
serial roof: the matmuls at the peak plus the KV reads at the bandwidth, one after the other, with the prefill's
matmuls spread over the steps (what a step of GEMMs then attention can reach; ``gen_common.serial_roof_tok_s``).

    python benchmarks/bench_generate.py --shape qwen05 --batches 64,512,1024 --new-tokens 256
    python benchmarks/bench_generate.py --quick                         # a small CPU run
    python benchmarks/bench_generate.py --shape qwen05 --batches 4096 --samples 8 --new-tokens 1024 \
        --temperature 1 --repeats 0 --skip-hf                            # the 80 GB memory run

``--batches`` counts prompts; with ``--samples N`` each prompt gets N rows (num_return_sequences), so
a row of the table holds batch x N outputs. ``--repeats 0`` times the first call alone (compiles
included). The jaxsft rows print the device's peak memory in use (XLA's allocator statistics).

Timing: one warm-up call per (side, batch) (compiles), then ``--repeats`` timed calls; median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gen_common import EOS_ID, SHAPES, IdTokenizer, build_torch_model, make_ragged, roof_tok_s, serial_roof_tok_s
from roof import bandwidth as measured_bandwidth, matmul_peak


def timed(fn, repeats: int):
    t0 = time.perf_counter()
    out = fn()
    warm = time.perf_counter() - t0
    times = [warm] if repeats == 0 else []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return warm, times, out


def peak_gib(device) -> float | None:
    """The device's peak bytes in use so far (XLA's allocator), in GiB; None where it keeps no statistics (CPU)."""
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--batches", default="64")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ragged", type=float, default=None, help="EOS-row scale of the ragged workload (T=1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--quick", action="store_true", help="a small CPU setting: tiny, batch 8, prompt 32, 32 new, 1 repeat")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-jax", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=1,
                   help="num_return_sequences: each of --batches prompts gets this many rows (T > 0)")
    p.add_argument("--norm-implementation", choices=["auto", "pallas", "xla"], default=None,
                   help="the model's residual add + RMSNorm (from_pretrained's norm_implementation); default: jaxsft's")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.batches, args.prompt_len, args.new_tokens, args.repeats = "tiny", "8", 32, 32, 1

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import jaxsft
    from jaxsft.generation import generate

    on_gpu_jax = jax.default_backend() != "cpu"
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and (on_gpu_jax or torch_device == "cuda"))
    ragged = args.ragged is not None
    if args.samples < 1 or (args.samples > 1 and args.temperature <= 0 and not ragged):
        p.error("--samples N > 1 needs --temperature > 0 (n greedy samples are one sample)")
    temperature = 1.0 if ragged else args.temperature
    torch_model = build_torch_model(args.shape, args.seed)
    if ragged:
        make_ragged(torch_model, args.ragged)
    n_params = sum(q.numel() for q in torch_model.parameters())
    batches = [int(b) for b in args.batches.split(",")]
    kind = jax.devices()[0].device_kind
    bw = measured_bandwidth() if on_gpu_jax else float("nan")
    peak = matmul_peak() if on_gpu_jax else float("nan")
    eos = [EOS_ID] if ragged else []
    rows = []
    peaks: dict[int, float] = {}
    jdtype = jnp.bfloat16 if bf16 else jnp.float32
    options = {} if args.norm_implementation is None else {"norm_implementation": args.norm_implementation}
    model = None if args.skip_jax else jaxsft.from_pretrained(torch_model, dtype=jdtype, param_dtype=jdtype, **options)
    tmodel = None
    for batch in batches:
        rng = np.random.default_rng(args.seed + batch)
        ids = rng.integers(3, SHAPES[args.shape]["vocab_size"], size=(batch, args.prompt_len))
        if model is not None:
            prompts = [" ".join(map(str, row)) for row in ids]

            def run_jax():
                res = generate(model, IdTokenizer(), prompts, max_new_tokens=args.new_tokens, eos_token_ids=eos,
                               temperature=temperature, num_return_sequences=args.samples, return_tokens=True)
                return [len(t) for t in res.tokens]  # one entry per output row (prompt-major)

            warm, times, lengths = timed(run_jax, args.repeats)
            rows.append(("jaxsft", batch, warm, times, lengths))
            peaks[batch] = peak_gib(jax.devices()[0])
        if not args.skip_hf:
            if tmodel is None:
                tmodel = torch_model.to(device=torch_device, dtype=torch.bfloat16 if bf16 else torch.float32)
            input_ids = torch.as_tensor(ids, device=torch_device)

            def run_hf():
                kw = dict(do_sample=True, temperature=1.0, top_k=0, eos_token_id=EOS_ID) if ragged else dict(
                    min_new_tokens=args.new_tokens, do_sample=temperature > 0, eos_token_id=None)
                if temperature > 0 and not ragged:
                    kw.update(temperature=temperature, top_k=0)
                with torch.inference_mode():
                    out = tmodel.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                          max_new_tokens=args.new_tokens, pad_token_id=0,
                                          num_return_sequences=args.samples, **kw)
                if torch_device == "cuda":
                    torch.cuda.synchronize()
                new = out[:, args.prompt_len:].cpu().numpy()
                if not ragged:
                    return [new.shape[1]] * (batch * args.samples)
                hit = new == EOS_ID
                return [int(np.argmax(r)) + 1 if r.any() else new.shape[1] for r in hit]

            warm, times, lengths = timed(run_hf, args.repeats)
            rows.append(("transformers", batch, warm, times, lengths))

    dev = torch.cuda.get_device_name() if torch_device == "cuda" else kind
    print(f"\nshape {args.shape} ({n_params / 1e6:.0f}M params), {'bf16' if bf16 else 'fp32'}, prompt {args.prompt_len}, "
          f"{'EOS-ragged (scale %g, T=1) up to ' % args.ragged if ragged else ''}{args.new_tokens} new, T={temperature}, "
          f"{args.samples} sample(s) per prompt, median of {max(args.repeats, 1)}; device {dev}; bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
    print("| side | prompts | rows | first call s | seconds | useful new tok/s | mean len | median len | p90 len | roof tok/s | % roof | serial roof | % serial | peak GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, batch, warm, times, lengths in rows:
        med = statistics.median(times)
        useful = sum(lengths)
        mean = useful / len(lengths)
        n_rows = batch * args.samples
        roof = roof_tok_s(args.shape, n_rows, args.prompt_len, mean, bw, peak, shared_prompt_n=args.samples)
        serial = serial_roof_tok_s(args.shape, n_rows, args.prompt_len, mean, bw, peak, shared_prompt_n=args.samples)
        tps = useful / med
        mem = peaks.get(batch) if name == "jaxsft" else None
        print(f"| {name} | {batch} | {n_rows} | {warm:.1f} | {med:.3f} | {tps:.0f} | {mean:.1f} | {np.median(lengths):.0f} | "
              f"{np.percentile(lengths, 90):.0f} | {roof:.0f} | {100 * tps / roof:.0f} | {serial:.0f} | {100 * tps / serial:.0f} | "
              f"{'-' if mem is None else f'{mem:.1f}'} |")
        print("RESULT " + json.dumps(dict(side=name, shape=args.shape, batch=batch, samples=args.samples, seconds=med,
                                          tok_s=tps, mean_len=mean, ragged=args.ragged, temperature=temperature,
                                          roof=roof, serial_roof=serial, peak_gib=mem, device=dev)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
