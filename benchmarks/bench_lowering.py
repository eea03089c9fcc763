#!/usr/bin/env python3
"""Host time to trace and lower one train-update program (no compile), on any machine.

Why: a step() call that meets several new batch shapes (packing's layouts, new buckets) lowers each
program on the host before XLA compiles them side by side, so lowering sits on the first call's
critical path. Lowers jaxsft.training.step.make_fused_update for a Qwen2.5-0.5B-shape model (unrolled layers,
bf16 compute) at a few packed-batch shapes and prints seconds per lowering.

    python benchmarks/bench_lowering.py [--shape qwen05] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen05")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import bench_speed
    import jaxsft
    from jaxsft.training import step as step_fns
    from jaxsft.models.families import spec_from_hf_config
    from jaxsft.training.objectives import CausalSFT

    spec = spec_from_hf_config(bench_speed.hf_config(args.shape))
    model = nnx.eval_shape(lambda: jaxsft.models.CausalLM(spec, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), scan_layers=False))
    graphdef, params = nnx.split(model)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5))
    opt_state = jax.eval_shape(tx.init, params)
    update = step_fns.make_fused_update(graphdef, tx, CausalSFT())
    rows = []
    for i, (batch_rows, length) in enumerate([(3, 1024), (5, 512), (2, 512)][: args.repeats]):
        ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
        batch = {"input_ids": ints(batch_rows, length), "labels": ints(batch_rows, length), "positions": ints(batch_rows, length),
                 "segment_ids": ints(batch_rows, length)}
        t = time.perf_counter()
        jax.jit(update, donate_argnums=(0, 1)).lower(params, opt_state, batch)
        rows.append({"rows": batch_rows, "length": length, "lower_s": round(time.perf_counter() - t, 2)})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"shape": args.shape, "layers": spec.num_layers, "lowerings": rows}))


if __name__ == "__main__":
    main()
