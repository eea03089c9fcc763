"""One process of a multi-process (multi-host style) jaxsft training run, on CPU.

Started by ``tests/test_multihost.py`` (one subprocess per process), never by
pytest itself. Each process owns ``--local-devices`` CPU devices, joins JAX's
distributed runtime through ``jaxsft.infra.distributed.initialize`` and passes its own
share of every call's examples to ``step()``. The union of a call's examples
over processes is what a single-process reference trains on (see ``CALLS``).

Outputs under ``--out``: ``proc{i}.json`` (per process: step results,
log_history, devices) and, from process 0 only, ``result.npz`` (update losses
and the final HF-named weights). Every process calls ``save_pretrained`` on
``--out/saved_{i}``; only process 0 may write.

This module imports no jax at import time, so the test can import it for the
shared data and configuration below.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from xla_settings import child_flags

VOCAB = 256
BUCKETS = (16, 64)  # few shapes: each is a compile (slow on CPU)


def _examples(rng: np.random.Generator, count: int, low: int, high: int) -> list[np.ndarray]:
    return [rng.integers(3, VOCAB, size=int(rng.integers(low, high + 1))).astype(np.int32) for _ in range(count)]


def make_calls(seed: int = 0) -> list[list[list[np.ndarray]]]:
    """Per step() call, per process (2 processes, 4 local rows each, 8 global rows): the examples.

    Every call's union fits the micro-batches a single process with 8 rows would form,
    and gradient_accumulation_steps=2 puts a call's micro-batches in one update, so the
    union trains exactly as one process would, whatever each side's shuffle.
    """
    rng = np.random.default_rng(seed)
    return [
        # both full, mixed lengths
        [_examples(rng, 4, 4, 30), _examples(rng, 4, 4, 30)],
        # different buckets per process (16 vs 64): bucket agreement; process 1 has a filler row
        [_examples(rng, 4, 3, 14), _examples(rng, 3, 35, 60)],
        # process 0 has two local micro-batches, process 1 one (a zero-weight micro-batch is added for it)
        [_examples(rng, 8, 4, 40), _examples(rng, 2, 4, 20)],
        # process 1 has no examples at all this call (it pads to process 0's bucket, 16)
        [_examples(rng, 3, 4, 14), []],
        # process 0 (the logging process) has none
        [[], _examples(rng, 4, 4, 30)],
    ]


def union(call: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [ex for per_process in call for ex in per_process]


def train_config(per_device: int, gradient_accumulation_steps: int = 2):
    import jaxsft

    return jaxsft.TrainConfig(
        learning_rate=1e-3,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=gradient_accumulation_steps,
        weight_decay=0.01,
        warmup_steps=1,
        max_steps=20,
        logging_steps=1,
        length_buckets=BUCKETS,
        disable_tqdm=True,
        seed=7,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--local-devices", type=int, required=True)
    parser.add_argument("--mesh", required=True, help="data,fsdp,tensor over all processes' devices")
    parser.add_argument("--model", required=True, help="a Hugging Face folder to load")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = child_flags(os.environ.get("XLA_FLAGS", ""), devices=args.local_devices)
    import jax

    import jaxsft
    from jaxsft.models.hf_io import hf_state_dict

    pid = args.process_id
    jaxsft.infra.distributed.initialize(
        coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=pid
    )
    assert jax.process_index() == pid and jax.process_count() == args.num_processes
    assert jax.local_device_count() == args.local_devices, jax.local_devices()

    # A mesh whose tensor axis spans the processes would give both processes the same batch rows: refused.
    from jaxsft.infra import sharding as shd

    devices = jax.devices()
    half = len(devices) // 2
    mixed = [d for pair in zip(devices[:half], devices[half:]) for d in pair]  # p0, p1, p0, p1, ...
    try:
        shd.check_batch_split_over_processes(jaxsft.make_mesh(half, 1, 2, devices=mixed))
        bad_mesh_error = None
    except ValueError as err:
        bad_mesh_error = str(err)

    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    mesh = jaxsft.make_mesh(data, fsdp, tensor)
    model = jaxsft.from_pretrained(args.model, mesh=mesh)
    q = model.layers.q_proj[...]
    q_shard_shape, q_fully_addressable = list(q.addressable_shards[0].data.shape), bool(q.is_fully_addressable)
    trainer = jaxsft.IterativeSFTTrainer(model, train_config(per_device=8 // (data * fsdp)), mesh=mesh)
    assert trainer.rows // jax.process_count() == 4, trainer.rows

    steps = []
    for call in make_calls():
        out = trainer.step(input_ids=call[pid])
        steps.append({k: out[k] for k in ("update_losses", "num_tokens", "num_microbatches", "global_step", "loss")})

    weights = hf_state_dict(trainer.model)  # gathered from both processes
    out_dir = Path(args.out)
    trainer.save_pretrained(str(out_dir / f"saved_{pid}"))
    if pid == 0:
        losses = np.asarray([l for s in steps for l in s["update_losses"]], np.float64)
        np.savez(out_dir / "result.npz", __losses__=losses, **weights)
    report = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "devices": [(d.id, d.process_index) for d in jax.devices()],
        "mesh_devices": [[d.id, d.process_index] for d in mesh.devices.reshape(-1)],
        "q_proj_shard_shape": q_shard_shape,
        "q_proj_fully_addressable": q_fully_addressable,
        "steps": steps,
        "log_history": trainer.state.log_history,
        "cpu_collectives": jax.config.jax_cpu_collectives_implementation,
        "bad_mesh_error": bad_mesh_error,
    }
    (out_dir / f"proc{pid}.json").write_text(json.dumps(report))
    print(f"process {pid}: done", flush=True)


if __name__ == "__main__":
    from xla_settings import run_torch_free

    run_torch_free()
    sys.exit(main())
