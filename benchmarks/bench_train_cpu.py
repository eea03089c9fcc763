#!/usr/bin/env python3
"""Training throughput of jaxsft's native trainer against the same loop in eager PyTorch.

Default: CPU, fp32, a Llama of hidden 256 / 4 layers / vocab 2048, micro-batch 8 x 128, step() calls
of 64 sequences (8 AdamW updates each), 2 warm-up calls (compilation) excluded, 5 timed. Each
implementation runs in its own process; ``--repeats`` alternates them so slow phases of a shared
machine hit both, and the table takes each one's best run.

    python benchmarks/bench_train_cpu.py
    python benchmarks/bench_train_cpu.py --device gpu --dtype bf16 --shape qwen05 --seq 512
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # common.py, and jaxsft from a plain checkout

import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--shape", default="cpu-small", choices=sorted(common.SHAPES))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="micro-batch rows")
    parser.add_argument("--seqs-per-call", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timed", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per implementation")
    parser.add_argument("--impl", default="both", choices=("both", "jaxsft", "torch"))
    parser.add_argument("--cpus", default=None, help="pin workers to these cores, e.g. '0' or '0,1' (CPU runs)")
    parser.add_argument("--out", default=None, help="write all runs as JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        common.worker_main(args.worker, args.workload)
        return

    w = common.Workload(
        shape=args.shape, device=args.device, dtype=args.dtype, seq=args.seq, batch=args.batch,
        seqs_per_call=args.seqs_per_call, warmup=args.warmup, timed=args.timed,
        cpus=[int(c) for c in args.cpus.split(",")] if args.cpus else None,
    )
    impls = ["jaxsft", "torch"] if args.impl == "both" else [args.impl]
    env = {"JAX_PLATFORMS": "cpu"} if args.device == "cpu" else {}
    runs = []
    for rep in range(args.repeats):
        for impl in impls:
            result = common.run_worker_subprocess(os.path.abspath(__file__), impl, w, env)
            result["repeat"] = rep
            runs.append(result)
            if "error" in result:
                print(f"== {impl} failed:\n{result['error']}", flush=True)
            else:
                print(f"== {impl} run {rep}: {result['tokens_per_s']:,.0f} tokens/s "
                      f"(median call {result['call_median_s']:.3f}s, first {result['first_call_s']:.2f}s, "
                      f"losses {[round(x, 4) for x in result['losses']]})", flush=True)

    best = []
    for impl in impls:
        ok = [r for r in runs if r["impl"] in (impl, "torch eager" if impl == "torch" else impl) and "error" not in r]
        best.append(max(ok, key=lambda r: r["tokens_per_s"]) if ok else {"impl": impl, "error": "all runs failed"})
    spec = common.SHAPES[args.shape]
    print(f"\nshape={args.shape} (hidden {spec[1]}, layers {spec[3]}, vocab {spec[6]})  device={args.device}  "
          f"dtype={args.dtype}  cores={args.cpus or 'all'}  micro-batch {args.batch}x{args.seq}  {args.seqs_per_call} seqs/call  "
          f"{args.timed} timed calls after {args.warmup} warm-up, best of {args.repeats}")
    print(common.table(best))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"workload": dataclasses.asdict(w), "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
