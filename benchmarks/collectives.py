#!/usr/bin/env python3
"""List the cross-device collectives XLA emits for one training update, and where they sit.

Why: data-parallel scaling is decided by how many gradient bytes cross devices and whether that
traffic sits inside the layer loop (where it can overlap the backward pass) or after it (where it
cannot). This compiles the trainer's own fused update program for a mesh and prints each
all-reduce / reduce-scatter / all-gather / all-to-all / collective-permute with its bytes and the
computation it belongs to (``while`` bodies are the scanned layer loops).

    python benchmarks/collectives.py --shape tiny --mesh 2,1,1            # CPU devices are faked
    python benchmarks/collectives.py --shape qwen05 --mesh 2,1,1 --no-scan  # on a 2-GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def fused_update_hlo(
    shape: str, mesh_shape: tuple[int, int, int], scan: bool, seq: int, batch: int, layers: int | None = None,
    xla_options: dict | None = None, loss_chunk_size: int | None = None,
) -> str:
    """Compile the trainer's one-micro-batch update for ``mesh_shape`` and return its optimized HLO."""
    import jax
    import numpy as np

    import jaxsft
    from jaxsft.infra.diagnostics import update_program_text
    from jaxsft.models.families import spec_from_hf_config

    sys.path.insert(0, os.path.dirname(__file__))
    from common import hf_config

    mesh = jaxsft.make_mesh(*mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    config = hf_config(shape, seq)
    if layers:
        config.num_hidden_layers = layers
    spec = spec_from_hf_config(config)
    model = jaxsft.init_model(spec, mesh=mesh, seed=0)
    cfg = jaxsft.TrainConfig(per_device_train_batch_size=batch, max_length=seq, length_buckets=(seq,), bf16=True,
                             scan_layers=scan, logging_steps=0, disable_tqdm=True, xla_options=xla_options,
                             loss_chunk_size=loss_chunk_size)
    trainer = jaxsft.IterativeSFTTrainer(model, cfg, mesh=mesh)
    return update_program_text(trainer, trainer.rows, seq)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--mesh", default="2,1,1")
    parser.add_argument("--no-scan", action="store_true")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    parser.add_argument("--loss-chunk", type=int, default=None, help="force the token-chunked loss")
    parser.add_argument("--dump", default=None, help="also write the optimized HLO here")
    args = parser.parse_args()
    mesh_shape = tuple(int(x) for x in args.mesh.split(","))
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    options = os.environ.get("JAXSFT_BENCH_XLA_OPTIONS")
    text = fused_update_hlo(args.shape, mesh_shape, not args.no_scan, args.seq, args.batch, args.layers,
                            json.loads(options) if options else None, args.loss_chunk)
    if args.dump:
        with open(args.dump, "w") as f:
            f.write(text)
    from jaxsft.infra.diagnostics import collectives, largest, summarize

    records = collectives(text)
    print(summarize(records))
    print(largest(records))


if __name__ == "__main__":
    main()
