#!/usr/bin/env python3
"""A/B of jaxsft.kernels.add_rms_norm (Pallas Triton) against its XLA form, at a layer's shape, on one GPU.

Times the forward alone and forward + backward (the VJP with both outputs' cotangents) of one residual
add + RMSNorm over ``rows`` tokens of width ``hidden`` in bf16, each form jitted on its own: ``--inner``
chained applications in one compiled loop per timed call, median of ``--repeats`` calls after warm-up,
printed per application with the bandwidth its least traffic implies. One JSON line per (form, pass).

    python benchmarks/bench_fused.py --rows 4096 --hidden 896      # Qwen2.5-0.5B, micro-batch 8 x 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of one call of ``fn`` over ``repeats`` timed calls, after two warm-up calls."""
    import jax

    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def chained(body, inner: int):
    """``inner`` applications of ``body`` (a pair of arrays to a pair of the same shapes) in one compiled loop.

    Why: one add + RMSNorm over a micro-batch moves a few megabytes, a few microseconds of work, which a
    host-timed call of its own would bury under its dispatch; in a loop each application waits on the one
    before, as the layers of a model do."""
    import jax

    return jax.jit(lambda pair: jax.lax.fori_loop(0, inner, lambda _, p: body(*p), pair))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--inner", type=int, default=100, help="applications per timed call, in one compiled loop")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxsft.kernels import add_rms_norm as fused

    k = jax.random.split(jax.random.key(0), 5)
    shape = (args.rows, args.hidden)
    h, delta = (jax.random.normal(key, shape, jnp.bfloat16) for key in k[:2])
    scale = 1.0 + 0.1 * jax.random.normal(k[2], shape[-1:], jnp.float32)
    g_s, g_y = (jax.random.normal(key, shape, jnp.bfloat16) for key in k[3:])
    inner = args.inner
    for form in ("xla", "pallas"):
        def forward(h, delta, scale=scale, form=form):
            return fused.add_rms_norm(h, delta, scale, 1e-6, implementation=form)

        def forward_body(h, delta):  # the next application adds this one's normalised output to its sum
            s, y = forward(h, delta)
            return y, s

        def backward_body(h, delta):  # forward, then both cotangents back; the input cotangents feed the next
            _, vjp = jax.vjp(forward, h, delta)
            return vjp((g_s, g_y))

        for name, body, moved in (("forward", forward_body, 4), ("forward+backward", backward_body, 4 + 4)):
            seconds = timed(chained(body, inner), (h, delta), repeats=args.repeats) / inner
            # rows x hidden bf16 tensors each application must read or write at least: forward h, delta in,
            # s, y out; the backward s, both cotangents in and the input cotangent out (the scale's gradient is
            # not asked for here)
            floor_bytes = moved * args.rows * args.hidden * 2
            print(json.dumps({"form": form, "pass": name, "rows": args.rows, "hidden": args.hidden,
                              "us": round(1e6 * seconds, 2), "GB_per_s_at_floor": round(floor_bytes / seconds / 1e9, 1),
                              "device": str(jax.devices()[0])}), flush=True)


if __name__ == "__main__":
    main()
