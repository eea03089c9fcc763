"""The decode-attention kernel alone, at a model's head layout, across its tilings: which one to make the default.

    python benchmarks/bench_decode_kernel.py --shape qwen05 --batch 512 [--samples 1] [--prompt-len 128] [--filled 128]

Times ``projection_attention_with_write`` (the GPU default: split, bias, RoPE, the K/V write and attention over
prompt + filled continuation) run ``--layers`` times inside one compiled loop (as a decode step runs it once per
layer, so launch overhead is what the engine's command buffers leave, not a host round trip), for every
(block, warps, stages, splits) in the sweep (each call's output summed, as the next matmul reads all of it), and prints microseconds per call beside the bytes of K/V it must read at
the bandwidth measured in the same run (the kernel's roof). Random bf16 data; the rows' continuations are
filled to ``--filled`` on average (uniform 0 .. 2 x filled).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gen_common import SHAPES
from roof import bandwidth as measured_bandwidth


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen05")
    p.add_argument("--batch", type=int, default=512, help="rows (prompts x samples)")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--filled", type=int, default=128, help="mean continuation slots already filled")
    p.add_argument("--layers", type=int, default=24, help="kernel calls per timed program")
    p.add_argument("--blocks", default="32,64,128")
    p.add_argument("--warps", default="2,4,8")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--splits", default="1", help="programs per (row, KV head), merged after (flash-decoding)")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxsft.kernels import decode_attention as kernel

    cfg = SHAPES[a.shape]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim", cfg["hidden_size"] // heads)
    b, n = a.batch, a.samples
    g, lp, ls = b // n, a.prompt_len, 2 * a.filled
    interpret = jax.default_backend() != "gpu"
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.bfloat16)  # noqa: E731
    pk, pv, sk, sv = f(g, kv, lp, d), f(g, kv, lp, d), f(b, kv, ls, d), f(b, kv, ls, d)
    qkv, bias = f(b, 1, (heads + 2 * kv) * d), f((heads + 2 * kv) * d)
    rope = f(b, 1, d), f(b, 1, d)
    index = jnp.asarray(rng.integers(0, ls - 1, size=b), jnp.int32)
    start = jnp.zeros((g,), jnp.int32)
    kv_bytes = 2 * 2 * d * kv * (g * lp + int(np.asarray(index).sum()))  # K and V, bf16, as each group reads them once
    bandwidth = measured_bandwidth()
    print(f"{a.shape}: {b} rows ({n} samples each), {heads} heads over {kv} KV heads of {d}, prompt {lp}, "
          f"continuations filled {a.filled} on average; {kv_bytes / 1e6:.1f} MB of K/V per call; "
          f"measured bandwidth {bandwidth / 1e12:.2f} TB/s on {jax.devices()[0].device_kind}: roof "
          f"{kv_bytes / bandwidth * 1e6:.1f} us per call")

    def program(tiling):
        def run(sk, sv):
            def layer(_, carry):
                sk, sv, acc = carry
                out, sk, sv = kernel.projection_attention_with_write(
                    qkv, bias, rope, pk, pv, start, sk, sv, index, 0.125, heads=heads, tiling=tiling,
                    interpret=interpret)
                return sk, sv, acc + jnp.sum(out.astype(jnp.float32))  # every output read, as o_proj reads it
            return jax.lax.fori_loop(0, a.layers, layer, (sk, sv, jnp.float32(0)))
        return jax.jit(run, donate_argnums=(0, 1))

    rows = []
    sweep = (a.blocks, a.warps, a.stages, a.splits)
    for block, warps, stages, splits in itertools.product(*(map(int, x.split(",")) for x in sweep)):
        tiling = kernel.Tiling(block, warps, stages, splits)
        try:
            run = program(tiling)
            sk, sv, _ = run(sk, sv)
            jax.block_until_ready(sk)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                sk, sv, _ = run(sk, sv)
                jax.block_until_ready(sk)
                times.append(time.perf_counter() - t)
            us = sorted(times)[2] / a.layers * 1e6
        except Exception as e:  # a tiling Triton refuses (shared memory, registers): say so and go on
            print(f"  {tiling}: failed ({type(e).__name__}: {str(e)[:120]})")
            continue
        rows.append((us, tiling))
        print(f"  block {block:4d} warps {warps} stages {stages} splits {splits}: {us:7.2f} us per call, "
              f"{kv_bytes / (us * 1e-6) / bandwidth * 100:5.1f} % of the bandwidth"
              f"{'  (the default for this call)' if tiling == kernel.tiling_for(b * kv) else ''}")
    if rows:
        us, best = min(rows)
        print(f"fastest: {best} at {us:.2f} us per call")


if __name__ == "__main__":
    main()
