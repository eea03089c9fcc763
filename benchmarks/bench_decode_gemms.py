"""The matmul floor of one decode step: each of a step's matmuls timed alone, at the engine's GEMM settings.

Why: a decode step at batch 512 is about half matmul time, and the issue's throughput goals assume those
matmuls near the card's bf16 peak. Here every matmul a decoder layer runs per step (q/k/v merged, as XLA's
dot merger does; the output projection; gate/up merged; down) and the lm head are timed alone on random bf16
data, compiled with the options the engine uses (``compile_options.resolve``: cuBLAS on GPU at width >= 768),
each in a program of several such matmuls with their own weights (so a program's dispatch is spread over
them), beside an 8192^3 matmul on random data (the peak). Their sum over the layers is the fastest a decode step's
matmuls can be with these kernels, so ``rows / floor`` bounds new tokens/s even if attention, sampling and
every elementwise pass cost nothing.

Measured limit of this method (one H100, ninth session, benchmarks/RESULTS.md): timed alone, a small matmul
carries its launch and dispatch, which the engine's decode loop hides behind XLA's command buffers. At
SmolLM2-135M, 64 rows, it printed a floor of 1.38 ms (46k tok/s) that the engine beat (54k). So at small shapes
it overstates the floor; the decode profile's GEMM kernel time (``profile_decode.py``, kernels inside the
real loop) is the figure RESULTS uses for the goals, this one only for the per-matmul share of peak.

    python benchmarks/bench_decode_gemms.py --shape qwen05 --rows 512
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gen_common import SHAPES
from roof import matmul_peak


def median_seconds(fn, x, repeats: int = 11) -> float:
    """Median wall time of the compiled ``fn(x)`` (every output waited for), after one warm-up call."""
    import time

    import jax

    jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t)
    return sorted(times)[repeats // 2]


def step_matmuls(shape: str) -> list[tuple[str, int, int, int]]:
    """(name, K, N, times per step) of a decode step's matmuls for ``shape`` (M = the rows)."""
    s = SHAPES[shape]
    h, f, layers, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    d = h // s["num_attention_heads"]
    qkv = (s["num_attention_heads"] + 2 * s["num_key_value_heads"]) * d
    return [("qkv", h, qkv, layers), ("o", s["num_attention_heads"] * d, h, layers), ("gate+up", h, 2 * f, layers),
            ("down", f, h, layers), ("lm_head", h, v, 1)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen05")
    p.add_argument("--rows", default="512", help="comma list of decode rows (M)")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from jaxsft.infra import compile_options

    options = compile_options.resolve(None, hidden_size=SHAPES[args.shape]["hidden_size"])
    peak = matmul_peak()
    kind = jax.devices()[0].device_kind
    print(f"shape {args.shape}, device {kind}, compile options {options or 'XLA defaults'}, "
          f"bf16 peak {peak / 1e12:.0f} TFLOP/s (8192^3, random data)")
    for rows in (int(r) for r in args.rows.split(",")):
        total_s, total_flops = 0.0, 0
        print(f"\n| matmul (M={rows}) | K | N | per step | us each | TFLOP/s | % peak |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, k, n, times in step_matmuls(args.shape):
            # ``copies`` matmuls with their own weights in one program, as a step runs one per layer back to back:
            # the time per matmul then excludes the host's dispatch of a program.
            copies = max(times, 8)
            a = jax.random.normal(jax.random.key(1), (rows, k), jnp.bfloat16)
            ws = [jax.random.normal(jax.random.key(2 + i), (k, n), jnp.bfloat16) for i in range(copies)]
            fn = jax.jit(lambda x, ws=ws: [x @ w for w in ws]).lower(a).compile(compiler_options=options or None)
            sec = median_seconds(fn, a) / copies
            flops = 2 * rows * k * n
            total_s += sec * times
            total_flops += flops * times
            print(f"| {name} | {k} | {n} | {times} | {sec * 1e6:.1f} | {flops / sec / 1e12:.0f} | "
                  f"{100 * flops / sec / peak:.0f} |")
        print(f"matmul floor of one step: {total_s * 1e3:.3f} ms ({total_flops / total_s / 1e12:.0f} TFLOP/s, "
              f"{100 * total_flops / total_s / peak:.0f} % of peak); at the peak: {total_flops / peak * 1e3:.3f} ms; "
              f"bound on new tokens/s from the matmuls alone: {rows / total_s:,.0f}")
        print("RESULT " + json.dumps(dict(shape=args.shape, rows=rows, floor_ms=total_s * 1e3, peak_ms=total_flops / peak * 1e3,
                                          bound_tok_s=rows / total_s, device=kind)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
