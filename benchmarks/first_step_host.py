#!/usr/bin/env python3
"""Where the host time of a first ``step()`` call goes: planning, lowering and compiling each new program.

Why: on one H100 the first ragged call (``bench_speed.py``'s workload: 64 examples, log-normal lengths,
micro-batch 8, packing on) takes 16.6 s at the Qwen2.5-0.5B shape against 8.5 s for a one-program fixed
call. This script runs the host half of ``IterativeSFTTrainer.step()`` on the CPU without running any update (an unrolled 0.5B update
takes minutes on a CPU), through ``IterativeSFTTrainer.precompile``: the call's examples are planned exactly as
``step()`` plans them and every program the call would run and the cache lacks is lowered (Python trace +
StableHLO) and compiled (XLA). Compiled programs stay in the trainer's cache, so a later call (``--calls 2``)
counts only the programs it adds, as ``step()`` would.

Packing is forced (``TrainConfig(packing=True)``) and, by default, rows may outgrow the longest example's
bucket (``--longer-rows``, what the GPU's ragged attention kernel allows; the trainer's public
``longer_packed_rows``, which only planning reads), so the packed layouts are the GPU's. The lowered programs use the CPU's attention
(XLA, not cuDNN), so lowering times are close to, and compile times unlike, the GPU's. The first call also
copies the starting weights to the host (kept for ``reset()``), inside its total.

``--compile serial`` (default) lowers and compiles one program at a time and prints each one's seconds.
``--compile call`` compiles them side by side, as ``step()`` does (lowering here, compiles in threads, the
host copy of the starting weights taken while they compile).
Wall seconds are noisy on a shared machine: ``cpu s`` (this process's CPU time, all threads) is printed too.

``step()``'s own ``compile_seconds``, which ``bench_speed.py`` prints beside the first step, is the same
measure taken inside a training call.

    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python benchmarks/first_step_host.py --shape qwen05
    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python benchmarks/first_step_host.py --shape tiny --calls 3
    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python benchmarks/first_step_host.py --compile call --workload fixed
    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python benchmarks/first_step_host.py --scan-layers    # the first step's compiles, scanned
    JAX_PLATFORMS=cuda python benchmarks/first_step_host.py --trace /tmp/first_trace        # on a GPU: XLA's phases
    JAX_PLATFORMS=cuda python benchmarks/first_step_host.py --profile-lowering 40          # on a GPU: lowering's Python
    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python benchmarks/first_step_host.py --lower-for-gpu    # a GPU program's lowering, here

``--trace DIR`` records the calls with ``jax.profiler`` and prints XLA's own host-side phases (the compiler's
trace annotations: pass pipelines, LLVM and PTX compilation, autotuning), summed over threads and programs, so
a first step that only a GPU host can measure is broken down by what its compile spends the time on. Times are
inclusive (a phase contains its sub-phases), so rows do not add up.

``--profile-lowering N`` profiles the calls' Python with cProfile: on one H100 host lowering took 1.9-2.2 s a
program (eighteenth session), against 0.26-0.44 s on this repository's 2-core CPU for the CPU's programs, so where
a GPU host's lowering goes is measured there, not guessed.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import glob
import io
import json
import os
import pstats
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_speed  # noqa: E402  (stdlib imports only: jax is not imported yet)

bench_speed.drop_named_cache(os.environ)  # what it measures is compiling; before jax reads the variable


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen05", help="a bench_speed.SHAPES name (qwen05, qwen15, smol, tiny)")
    p.add_argument("--workload", default="ragged", choices=("ragged", "fixed"))
    p.add_argument("--calls", type=int, default=1, help="replay this many step() calls (later ones count new programs only)")
    p.add_argument("--compile", default="serial", choices=("serial", "call"))
    p.add_argument("--longer-rows", action=argparse.BooleanOptionalAction, default=True,
                   help="plan the GPU's packed layouts (rows may be longer than the longest example's bucket)")
    p.add_argument("--fp32", action="store_true", help="fp32 compute (default bf16, as bench_speed on a GPU)")
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=None,
                   help="force the layer loop scanned (one layer body to compile) or unrolled (default: the trainer's rule)")
    p.add_argument("--trace", default=None, help="record the calls with jax.profiler here and print XLA's compile phases")
    p.add_argument("--top", type=int, default=30, help="phases printed with --trace")
    p.add_argument("--json", default=None, help="append each call's summary as a JSON line to this file")
    p.add_argument("--lower-for-gpu", action="store_true",
                   help="on a CPU host: lower each program for CUDA with the GPU's choices, time it, compile nothing")
    p.add_argument("--profile-lowering", type=int, default=0, metavar="N",
                   help="profile the calls' Python (cProfile) and print the N functions with the most cumulative time")
    args = p.parse_args()

    import jax

    import jaxsft
    from jaxsft.models.families import spec_from_hf_config

    t0 = time.perf_counter()
    mesh = jaxsft.single_device_mesh()
    model = jaxsft.init_model(spec_from_hf_config(bench_speed.hf_config(args.shape)), mesh=mesh, seed=0)
    fixed = args.workload == "fixed"
    cfg = jaxsft.TrainConfig(
        learning_rate=1e-5, lr_scheduler_type="constant", per_device_train_batch_size=bench_speed.MICRO_BATCH,
        max_length=bench_speed.SEQ if fixed else bench_speed.MAX_LEN, bf16=not args.fp32, logging_steps=0,
        disable_tqdm=True, weight_decay=0.0, max_grad_norm=1.0, packing=True, scan_layers=args.scan_layers,
        compilation_cache=False,  # what it measures is compiling
        **({"length_buckets": (bench_speed.SEQ,)} if fixed else {}),
    )
    trainer = jaxsft.IterativeSFTTrainer(model, cfg, mesh=mesh)
    jax.block_until_ready(trainer.train_state)  # the random init runs asynchronously: not part of any timing below
    # The GPU's rule (cuDNN's ragged kernel): packed rows may take a longer bucket. Only planning reads it.
    trainer.longer_packed_rows = args.longer_rows
    setup_s = time.perf_counter() - t0
    print(f"# {args.shape} ({trainer.spec.num_layers} layers, scan_layers={trainer.scan_layers}), {args.workload}, "
          f"bf16={not args.fp32}, packing={trainer.packing}, longer_rows={args.longer_rows}, compile={args.compile}"
          f", backend={jax.default_backend()}, cpus={len(os.sched_getaffinity(0))}, load {os.getloadavg()[0]:.1f}; setup {setup_s:.1f} s", flush=True)

    def timed(fn):
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn()
        return value, time.perf_counter() - wall, time.process_time() - cpu

    profiler = cProfile.Profile() if args.profile_lowering else None
    summaries = []
    # The trace covers the calls only (not the model's set-up), so its phases are the first step's.
    with jax.profiler.trace(args.trace) if args.trace else contextlib.nullcontext():
        print("| call | program | lower s | compile s | wall s | cpu s |\n|---:|---|---:|---:|---:|---:|", flush=True)
        for index, call in enumerate(bench_speed.workload(args.workload, trainer.spec.vocab_size)[: args.calls]):
            serial = args.compile == "serial"
            if profiler:
                profiler.enable()
            with gpu_lowering(trainer) if args.lower_for_gpu else contextlib.nullcontext():
                report, wall, cpu = timed(lambda: trainer.precompile(input_ids=call, side_by_side=not serial))
            if profiler:
                profiler.disable()
            for layout, lower_s, compile_s in report.get("each", []):
                print(f"| {index} | {layout} | {lower_s:.2f} | {compile_s:.2f} | {lower_s + compile_s:.2f} | - |", flush=True)
            summary = {"call": index, "new_programs": report["new_programs"], "layouts": report["programs"],
                       "compile_s": round(report["compile_seconds"], 3), "host_s": round(wall, 3), "cpu_s": round(cpu, 3),
                       "load": os.getloadavg()[0]}
            print(f"| {index} | **call total**: {report['new_programs']} new of {len(report['programs'])} programs"
                  f"{'' if serial else ', side by side'}{'' if index else ' and the host copy of the starting weights'} | - | "
                  f"{report['compile_seconds']:.2f} | {wall:.2f} | {cpu:.2f} |", flush=True)
            summaries.append(summary)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"shape": args.shape, "workload": args.workload, "compile": args.compile, **summary})
                            + "\n")
    print(json.dumps(summaries))
    if profiler:
        print_python_profile(profiler, args.profile_lowering)
    if args.trace:
        print_compile_phases(args.trace, args.top)


@contextlib.contextmanager
def gpu_lowering(trainer):
    """The trainer's programs lowered for CUDA, as a GPU host lowers them, and not compiled (a CPU host has no
    CUDA compiler): the default backend reads "gpu" while they are traced, so every choice made by backend takes
    the GPU's path (cuDNN attention and its ragged form, the fused norm kernel lowered to Triton, the GPU's
    packing), and jax's cuDNN checks are answered as for an H100 (cuDNN 9.14, compute capability 9.0). Each
    program's compile seconds then read ~0. Lowering is host Python, so this measures it on any machine; a GPU
    host's own Python may be slower (eighteenth session: 1.9-2.2 s a program on an H100 host)."""
    import jax
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    saved = (jax.default_backend, cudnn.check_cudnn_version, cudnn.check_compute_capability)
    jax.default_backend = lambda: "gpu"
    cudnn.check_cudnn_version = lambda: 91400
    cudnn.check_compute_capability = lambda capability: True
    trainer.programs.lowering_platforms = ("cuda",)
    trainer.programs.built = lambda lowered: lowered  # the instance's, for this block
    try:
        yield
        for key, lowered in trainer.programs.cache.items():  # what was lowered: the GPU's kernels, not the CPU's
            text = lowered.as_text()
            print(f"# lowered for CUDA: {trainer.programs.layout(key)}: {text.count('xla.gpu.triton')} Triton kernel "
                  f"modules, {text.count('__cudnn$fmha')} cuDNN attention calls", flush=True)
    finally:
        jax.default_backend, cudnn.check_cudnn_version, cudnn.check_compute_capability = saved
        trainer.programs.lowering_platforms = None
        del trainer.programs.built
        trainer.programs.cache.clear()  # lowered, not compiled: nothing a later call could run


def print_python_profile(profiler: cProfile.Profile, top: int) -> None:
    """The functions with the most cumulative time in the profiled calls: where lowering's Python goes (the
    compile itself is one C++ call, ``stages.py:...(compile)``, so it shows as one row)."""
    for order in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(top)
        print(f"\nPython profile of the calls (cProfile, top {top} by {order} seconds; profiling slows Python ~1.5-2x):")
        print(out.getvalue())


def compile_phases(trace_dir: str) -> dict[str, tuple[int, int, int]]:
    """name -> (count, total ns, longest ns) of the trace's host events that are not Python frames, summed over
    threads: the compiler's annotations (pass pipelines, LLVM, ``PTX->CUBIN``, autotuners) and the runtime's."""
    from jax.profiler import ProfileData

    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise SystemExit(f"--trace {trace_dir}: the profiler wrote no *.xplane.pb there")
    phases: dict[str, list[int]] = {}
    for plane in ProfileData.from_file(paths[-1]).planes:
        if not plane.name.startswith("/host"):
            continue
        for line in plane.lines:
            for event in line.events:
                if event.name.startswith("$"):  # a Python frame (jax's tracing and lowering), not the compiler
                    continue
                count, total, longest = phases.setdefault(event.name, [0, 0, 0])
                phases[event.name] = [count + 1, total + event.duration_ns, max(longest, event.duration_ns)]
    return {name: tuple(v) for name, v in phases.items()}


def print_compile_phases(trace_dir: str, top: int) -> None:
    phases = sorted(compile_phases(trace_dir).items(), key=lambda kv: -kv[1][1])[:top]
    print(f"\nXLA's host phases, inclusive, summed over threads (top {top}):\n| phase | count | total s | longest s |"
          "\n|---|---:|---:|---:|")
    for name, (count, total, longest) in phases:
        print(f"| {name[:90]} | {count} | {total / 1e9:.2f} | {longest / 1e9:.2f} |")


if __name__ == "__main__":
    main()
