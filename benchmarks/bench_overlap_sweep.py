#!/usr/bin/env python3
"""Data-parallel scaling under different XLA scheduling settings, in one run.

Why: whether gradient communication overlaps the backward pass is decided by XLA's GPU passes
(latency-hiding scheduler, collective pipelining, loop double-buffering), not by the model code.
This runs ``bench_train_gpu.py``'s jax worker on 1 GPU and on N GPUs under each setting of
``TrainConfig.xla_options`` (each in its own process, the 1-GPU baseline under the same setting), prints the scaling efficiency of each,
and, for the N-GPU runs, the collectives XLA emitted and where they sit.

    python benchmarks/bench_overlap_sweep.py --gpus 2 --out sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

VARIANTS = {
    # name: (TrainConfig.xla_options as JSON, "OVERLAP" for gpu_overlap_options(); scan layers; meshes besides 1x1x1)
    "xla-defaults": ("{}", True, ["data"]),
    "overlap": ("OVERLAP", True, ["data", "fsdp"]),
    "env-flags": ("{}", True, ["data"]),  # every overlap flag of this build, set through XLA_FLAGS
    "unrolled": ("{}", False, ["data", "fsdp"]),
}


def discover_overlap_flags() -> list[str]:
    """XLA option names in this jaxlib/plugin build that look like overlap switches.

    XLA has no flag listing, so this reads the names out of the shared libraries' strings.
    """
    import glob

    import jaxlib

    roots = [os.path.dirname(jaxlib.__file__)]
    try:
        import jax_plugins

        roots += list(jax_plugins.__path__)
    except ImportError:
        pass
    pattern = re.compile(rb"xla_gpu_[a-z_]*(?:pipelin|latency_hiding|double_buffer|overlap)[a-z_]*")
    names: set[str] = set()
    for root in roots:
        for path in glob.glob(os.path.join(root, "**", "*.so*"), recursive=True):
            with open(path, "rb") as f:
                names.update(m.decode() for m in pattern.findall(f.read()))
    import jaxsft.infra.compile_options as co

    names = {n for n in names if len(n) < 80}
    usable = sorted(n for n in names if co.accepted(n, True))
    print("== overlap-looking XLA option names:", sorted(names), "\n   accepted as compile options:", usable, flush=True)
    return sorted(names)


def flag_parses(name: str) -> bool:
    """Whether ``XLA_FLAGS=--name=true`` is accepted by this build (unknown flags abort the process)."""
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + f" --{name}=true").strip())
    return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True, env=env).returncode == 0


def run(cmd: list[str], options: str, scan: bool, timeout: int, xla_flags: str = "") -> tuple[dict | None, str]:
    env = os.environ.copy()
    env["JAXSFT_BENCH_XLA_OPTIONS"] = options
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    env["JAXSFT_BENCH_SCAN"] = "1" if scan else "0"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "timeout"
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        return None, (proc.stdout[-1500:] + proc.stderr[-1500:])
    return json.loads(lines[-1][len("RESULT "):]), proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--shape", default="qwen05")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timed", type=int, default=3)
    parser.add_argument("--collectives", action="store_true", help="also list the N-GPU data-parallel collectives")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    rows = []
    import jaxsft.infra.compile_options as co

    print("== GPU overlap preset accepted here:", co.gpu_overlap_options(), flush=True)
    discovered = discover_overlap_flags()
    skip = ("disable", "host_offloading", "unsafe", "pipeline_parallelism", "_p2p", "pipelined_p", "limit")
    env_flags = " ".join(f"--{n}=true" for n in discovered if not any(k in n for k in skip) and flag_parses(n))
    print("== env-flags variant:", env_flags, flush=True)
    for name in args.variants.split(","):
        options, scan, meshes = VARIANTS[name]
        xla_flags = env_flags if name == "env-flags" else ""
        if options == "OVERLAP":
            options = json.dumps(co.gpu_overlap_options())
        mesh_args = {"single": "1,1,1", "data": f"{args.gpus},1,1", "fsdp": f"1,{args.gpus},1"}
        base = None
        for mesh_name in ["single"] + meshes:
            cmd = [sys.executable, os.path.join(HERE, "bench_train_gpu.py"), "--worker", "jax", "--mesh",
                   mesh_args[mesh_name], "--shape", args.shape, "--warmup", str(args.warmup), "--timed", str(args.timed)]
            t = time.time()
            result, log = run(cmd, options, scan, timeout=240, xla_flags=xla_flags)
            if result is None:
                print(f"== {name} {mesh_name}: FAILED\n{log}", flush=True)
                rows.append({"variant": name, "mesh": mesh_name, "error": log[-800:]})
                continue
            if mesh_name == "single":
                base = result["tokens_per_s"]
            eff = result["tokens_per_s"] / result["gpus"] / base if base else float("nan")
            row = {"variant": name, "mesh": mesh_name, "gpus": result["gpus"], "tokens_per_s": result["tokens_per_s"],
                   "efficiency": eff, "peak_gib": result["peak_gib_per_gpu"], "first_s": result["first_step_s"],
                   "device": result["device"], "wall_s": time.time() - t, "loss_last": result["losses"][-1]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.collectives and "data" in meshes:
            cmd = [sys.executable, os.path.join(HERE, "collectives.py"), "--shape", args.shape, "--mesh",
                   f"{args.gpus},1,1", "--seq", "512", "--batch", "8"] + ([] if scan else ["--no-scan"])
            env = os.environ.copy()
            env["JAXSFT_BENCH_XLA_OPTIONS"] = options
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
            print(f"== collectives, {name}, data-parallel\n{proc.stdout[-3000:]}{proc.stderr[-800:] if proc.returncode else ''}",
                  flush=True)

    print("\n| variant | mesh | GPUs | tokens/s | scaling eff. | peak GiB/GPU | first call s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['mesh']} | | error | | | |")
        else:
            print(f"| {r['variant']} | {r['mesh']} | {r['gpus']} | {r['tokens_per_s']:,.0f} | {r['efficiency']:.3f} | "
                  f"{r['peak_gib']:.1f} | {r['first_s']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
