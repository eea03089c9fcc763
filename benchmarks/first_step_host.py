#!/usr/bin/env python3
"""Where the host time of a first ``step()`` call goes: planning, lowering and compiling each new program.

Why: on one H100 the first ragged call (``bench_speed.py``'s workload: 64 examples, log-normal lengths,
micro-batch 8, packing on) takes 16.6 s at the Qwen2.5-0.5B shape against 8.5 s for a one-program fixed
call. This script replays the host half of ``IterativeSFTTrainer.step()`` on the CPU, without running
any update (an unrolled 0.5B update takes minutes on a CPU): the call's examples are planned exactly as
``step()`` plans them, each update's programs are described by ``TrainPrograms.update_lowerings`` (the
description ``step()`` itself uses), and every program missing from the cache is lowered (Python trace +
StableHLO) and then compiled (XLA), each timed on its own. Compiled programs go into the trainer's cache,
so a later call (``--calls 2``) counts only the programs it adds, as ``step()`` would.

Packing is forced (``TrainConfig(packing=True)``) and, by default, rows may outgrow the longest example's
bucket (``--longer-rows``, what the GPU's ragged attention kernel allows), so the packed layouts are the
GPU's. The lowered programs use the CPU's attention (XLA, not cuDNN), so lowering times are close to, and
compile times unlike, the GPU's. The first call also copies the starting weights to the host (kept for
``reset()``); its time is the ``snapshot`` row.

``--compile serial`` (default) lowers and compiles one program at a time and prints each one's seconds.
``--compile call`` times the call's host path as ``step()`` runs it (``IterativeSFTTrainer._prepare_updates``:
lowering here, compiles side by side in threads, the snapshot taken while they compile); with
``--no-overlap`` the snapshot is taken after the compiles instead (the order before the overlap).
Wall seconds are noisy on a shared machine: ``cpu s`` (this process's CPU time, all threads) is printed too.

It drives the trainer's private steps on purpose (no public call plans and compiles without training), so it
is tied to this version of the trainer. The public measure of a call's compiling is ``step()``'s
``compile_seconds``, which ``bench_speed.py`` prints beside the first step.

    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python benchmarks/first_step_host.py --shape qwen05
    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python benchmarks/first_step_host.py --shape tiny --calls 3
    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python benchmarks/first_step_host.py --compile call [--no-overlap]
    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python benchmarks/first_step_host.py --compile none --workload fixed
    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python benchmarks/first_step_host.py --scan-layers    # the first step's compiles, scanned
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def layout(key: tuple) -> str:
    """'fused 3x1024 packed' from a program key (kind, ((field, shape), ...))."""
    if len(key) == 1:
        return key[0]
    fields = dict(key[1])
    rows, length = fields["input_ids"]
    return f"{key[0]} {rows}x{length}{' packed' if 'segment_ids' in fields else ''}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen05", help="a bench_speed.SHAPES name (qwen05, qwen15, smol, tiny)")
    p.add_argument("--workload", default="ragged", choices=("ragged", "fixed"))
    p.add_argument("--calls", type=int, default=1, help="replay this many step() calls (later ones count new programs only)")
    p.add_argument("--compile", default="serial", choices=("serial", "call", "none"))
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                   help="--compile call: the snapshot of the starting weights taken while the programs compile")
    p.add_argument("--longer-rows", action=argparse.BooleanOptionalAction, default=True,
                   help="plan the GPU's packed layouts (rows may be longer than the longest example's bucket)")
    p.add_argument("--fp32", action="store_true", help="fp32 compute (default bf16, as bench_speed on a GPU)")
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=None,
                   help="force the layer loop scanned (one layer body to compile) or unrolled (default: the trainer's rule)")
    p.add_argument("--json", default=None, help="append each call's summary as a JSON line to this file")
    args = p.parse_args()

    import jax

    import bench_speed
    import jaxsft
    from jaxsft.models.families import spec_from_hf_config
    from jaxsft.training import agreement, batching

    t0 = time.perf_counter()
    mesh = jaxsft.single_device_mesh()
    model = jaxsft.init_model(spec_from_hf_config(bench_speed.hf_config(args.shape)), mesh=mesh, seed=0)
    fixed = args.workload == "fixed"
    cfg = jaxsft.TrainConfig(
        learning_rate=1e-5, lr_scheduler_type="constant", per_device_train_batch_size=bench_speed.MICRO_BATCH,
        max_length=bench_speed.SEQ if fixed else bench_speed.MAX_LEN, bf16=not args.fp32, logging_steps=0,
        disable_tqdm=True, weight_decay=0.0, max_grad_norm=1.0, packing=True, scan_layers=args.scan_layers,
        **({"length_buckets": (bench_speed.SEQ,)} if fixed else {}),
    )
    trainer = jaxsft.IterativeSFTTrainer(model, cfg, mesh=mesh)
    jax.block_until_ready(trainer.train_state)  # the random init runs asynchronously: not part of any timing below
    # The GPU's rule (cuDNN's ragged kernel): packed rows may take a longer bucket. Only planning reads it.
    trainer._ragged_attention = args.longer_rows
    programs = trainer.programs
    setup_s = time.perf_counter() - t0
    print(f"# {args.shape} ({trainer.spec.num_layers} layers, scan_layers={trainer.scan_layers}), {args.workload}, "
          f"bf16={not args.fp32}, packing={trainer.packing}, longer_rows={args.longer_rows}, compile={args.compile}"
          f"{f', overlap={args.overlap}' if args.compile == 'call' else ''}, backend={jax.default_backend()}, "
          f"cpus={len(os.sched_getaffinity(0))}, load {os.getloadavg()[0]:.1f}; setup {setup_s:.1f} s", flush=True)

    def timed(fn):
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn()
        return value, time.perf_counter() - wall, time.process_time() - cpu

    def fmt(v):
        return "-" if v is None else f"{v:.2f}"

    summaries = []
    print("| call | program | micro-batches | lower s | compile s | wall s | cpu s |\n|---:|---|---:|---:|---:|---:|---:|", flush=True)
    for index, call in enumerate(bench_speed.workload(args.workload, trainer.spec.vocab_size)[: args.calls]):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        examples = trainer._examples(input_ids=call)
        microbatches = trainer._plan(examples, trainer.rows, shuffle=True, pack=trainer.packing)
        updates = batching.group_into_updates(microbatches, cfg.gradient_accumulation_steps)
        totals = agreement.global_label_counts(updates)
        plan_s = time.perf_counter() - wall0
        uses: dict[tuple, int] = {}
        for update in updates:
            for key, _ in programs.update_lowerings(trainer.train_state, update, trainer._frozen):
                uses[key] = uses.get(key, 0) + 1
        missing = [key for key in uses if key not in programs.cache]
        lower_total = compile_total = 0.0
        if args.compile == "call":
            if args.overlap:  # step()'s own host path: lowerings, compiles in threads, snapshot meanwhile
                _, wall, cpu = timed(lambda: trainer._prepare_updates(updates, totals))
            else:  # the snapshot after the compiles
                def serial_snapshot():
                    lowerings = [programs.update_lowerings(trainer.train_state, u, trainer._frozen) for u in updates]
                    programs.compile_missing(lowerings)
                    trainer._keep_initial_params()
                _, wall, cpu = timed(serial_snapshot)
            print(f"| {index} | {len(missing)} programs + snapshot ({'overlapped' if args.overlap else 'after'}) | "
                  f"{len(updates)} | - | - | {wall:.2f} | {cpu:.2f} |", flush=True)
        else:
            lowered_by_key = dict(
                kv for update in updates for kv in programs.update_lowerings(trainer.train_state, update, trainer._frozen)
            )
            for key in missing:
                lowered, lower_s, lower_cpu = timed(lowered_by_key[key])
                compile_s = compile_cpu = None
                if args.compile == "serial":
                    programs.cache[key], compile_s, compile_cpu = timed(lambda: programs.built(lowered))
                lower_total += lower_s
                compile_total += compile_s or 0.0
                print(f"| {index} | {layout(key)} | {uses[key]} | {lower_s:.2f} | {fmt(compile_s)} | "
                      f"{lower_s + (compile_s or 0):.2f} | {lower_cpu + (compile_cpu or 0):.2f} |", flush=True)
            if trainer._initial_params is None:
                _, snap_s, snap_cpu = timed(trainer._keep_initial_params)
                print(f"| {index} | snapshot of the starting weights (reset()) | - | - | - | {snap_s:.2f} | {snap_cpu:.2f} |")
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        summary = {"call": index, "new_programs": len(missing), "layouts": sorted(layout(k) for k in uses),
                   "plan_s": round(plan_s, 3), "lower_s": round(lower_total, 3), "compile_s": round(compile_total, 3),
                   "host_s": round(wall, 3), "cpu_s": round(cpu, 3), "load": os.getloadavg()[0]}
        print(f"| {index} | **call total**: {len(missing)} new of {len(uses)} programs (plan {plan_s:.2f} s) | "
              f"{len(updates)} | {fmt(lower_total)} | {fmt(compile_total)} | {wall:.2f} | {cpu:.2f} |", flush=True)
        summaries.append(summary)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"shape": args.shape, "workload": args.workload, "compile": args.compile,
                                    "overlap": args.overlap, **summary}) + "\n")
    print(json.dumps(summaries))


if __name__ == "__main__":
    main()
