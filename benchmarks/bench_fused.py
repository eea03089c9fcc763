#!/usr/bin/env python3
"""A/B of jaxsft.kernels.add_rms_norm (Pallas Triton) against its XLA form, at a layer's shape, on one GPU.

Times the forward alone and forward + backward (the VJP with both outputs' cotangents) of one residual
add + RMSNorm over ``rows`` tokens of width ``hidden`` in bf16, each form jitted on its own, median of
``--repeats`` timed calls after warm-up. Prints one JSON line per (form, pass).

    python benchmarks/bench_fused.py --rows 4096 --hidden 896      # Qwen2.5-0.5B, micro-batch 8 x 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def timed(fn, *args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxsft.kernels import add_rms_norm as fused

    k = jax.random.split(jax.random.key(0), 5)
    shape = (args.rows, args.hidden)
    h, delta = (jax.random.normal(key, shape, jnp.bfloat16) for key in k[:2])
    scale = 1.0 + 0.1 * jax.random.normal(k[2], shape[-1:], jnp.float32)
    g_s, g_y = (jax.random.normal(key, shape, jnp.bfloat16) for key in k[3:])
    for form in ("xla", "pallas"):
        def forward(h, delta, scale, form=form):
            return fused.add_rms_norm(h, delta, scale, 1e-6, implementation=form)

        def forward_backward(h, delta, scale, form=form):
            out, vjp = jax.vjp(forward, h, delta, scale)
            return out, vjp((g_s, g_y))

        for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
            seconds = timed(jax.jit(fn), h, delta, scale, repeats=args.repeats)
            print(json.dumps({"form": form, "pass": name, "rows": args.rows, "hidden": args.hidden,
                              "us": round(1e6 * seconds, 1), "device": str(jax.devices()[0])}), flush=True)


if __name__ == "__main__":
    main()
