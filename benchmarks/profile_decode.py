"""Where a generate call's GPU time goes: one ``jaxsft.generate`` call under ``jax.profiler.trace``,
kernels summed by name and by category, with wall time, GPU-busy time and ms per decode step.

    python benchmarks/profile_decode.py --shape qwen05 --batch 512 --new 256 [--samples 1] [--temperature 1]

Runs against whichever ``jaxsft`` is on PYTHONPATH (so the same script profiles an older checkout).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gen_common import SHAPES, IdTokenizer, build_torch_model

CATEGORIES = [  # first match wins
    ("KV slice / update copies", r"dynamic_slice|dynamic_update_slice|dynamic-update-slice|dynamic-slice"),
    ("scatter", r"scatter"),
    ("memcpy / copy", r"memcpy|memset|^copy|_copy|copy_"),
    ("sort / top-k", r"sort|topk|top_k"),
    ("GEMM (cuBLAS / cutlass / triton dot)", r"gemm|cublas|cutlass|sm\d+_xmma|nvjet|triton_gemm|dot"),
    ("reduce", r"reduce|reduction"),
    ("other fusions", r"fusion|loop|input"),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def device_kernels(trace_dir: str):
    """(name, start_ns, dur_ns) of every kernel on the GPU stream lines of the trace."""
    from jax.profiler import ProfileData

    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    data = ProfileData.from_file(paths[-1])
    out = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not re.match(r"(?i)stream", line.name):
                continue
            out.extend((ev.name, ev.start_ns, ev.duration_ns) for ev in line.events)
    return out


def busy_ns(intervals) -> int:
    total, start, end = 0, None, None
    for a, b in sorted(intervals):
        if start is None or a > end:
            if start is not None:
                total += end - start
            start, end = a, b
        else:
            end = max(end, b)
    return total + (end - start if start is not None else 0)


def explain(dump: str, kernel: str, width: int = 220) -> list[str]:
    """What a kernel computes, from the optimised HLO XLA dumped: the fusion's call line and its root (shapes and op),
    searched in the largest after-optimisations module that defines it (the decode program)."""
    fusion = kernel.split("(")[0].strip()
    # Kernel names spell the HLO instruction's "." as "_" (gemm_fusion_dot.290 runs as gemm_fusion_dot_290).
    pattern = re.sub(r"_(\d+)$", r"[._]\1", re.escape(fusion))
    files = sorted(glob.glob(os.path.join(dump, "*after_optimizations.txt")), key=os.path.getsize, reverse=True)
    for path in files:
        text = Path(path).read_text()
        call = re.search(rf"^\s*(ROOT )?%?{pattern} = .*$", text, re.M)
        if not call:
            continue
        out = [call.group(0).strip()[:width]]
        called = re.search(r"calls=%?([\w.\-]+)", call.group(0))
        if called:
            comp = re.search(rf"^%?{re.escape(called.group(1))} [^\n]*\{{\n(.*?)^\}}", text, re.M | re.S)
            if comp:
                root = [ln.strip() for ln in comp.group(1).splitlines() if ln.strip().startswith("ROOT")]
                out += [r[:width] for r in root]
        return out
    return []


def print_sequence(kernels, count: int, dump) -> None:
    """``count`` kernels in start order from the middle of the trace: what one stretch of a decode step runs,
    each kernel's time and the gap since the previous one ended (launch latency the step pays)."""
    ordered = sorted(kernels, key=lambda k: k[1])
    middle = len(ordered) // 2
    stretch = ordered[middle: middle + count]
    print(f"{count} consecutive kernels from the middle of the call (duration, idle gap before it):")
    previous_end = None
    for name, start, dur in stretch:
        gap = "" if previous_end is None else f"{(start - previous_end) / 1e3:6.2f}us"
        print(f"  {dur / 1e3:7.2f}us gap {gap:>8}  {name[:90]}")
        previous_end = start + dur
        if dump:
            for line in explain(dump, name, width=160)[1:]:
                print(f"        {line}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen05", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=512, help="output rows (prompts x samples)")
    p.add_argument("--samples", type=int, default=1, help="num_return_sequences")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--label", default="")
    p.add_argument("--explain", action="store_true",
                   help="dump the optimised HLO and print what each top kernel computes (its fusion's root and operands)")
    p.add_argument("--sequence", type=int, default=0,
                   help="also print this many consecutive kernels from the middle of the call, in launch order, with "
                        "each one's duration and the idle gap before it (one decode step's layer pattern)")
    a = p.parse_args()
    dump = tempfile.mkdtemp(prefix="decode-hlo") if a.explain else None
    if dump:  # before jax is imported: XLA reads its flags once
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump} --xla_dump_hlo_as_text"
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxsft

    bf16 = jax.default_backend() != "cpu"
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    model = jaxsft.from_pretrained(build_torch_model(a.shape), dtype=dtype, param_dtype=jnp.float32)
    rng = np.random.default_rng(0)
    prompts = [" ".join(map(str, r)) for r in rng.integers(3, 8192, size=(a.batch // a.samples, a.prompt_len))]
    kw = dict(max_new_tokens=a.new, temperature=a.temperature, eos_token_ids=[], return_tokens=True,
              num_return_sequences=a.samples)
    tok = IdTokenizer()
    jaxsft.generate(model, tok, prompts, **kw)
    t = time.perf_counter()
    jaxsft.generate(model, tok, prompts, **kw)
    plain = time.perf_counter() - t
    tdir = tempfile.mkdtemp(prefix="decode-trace")
    with jax.profiler.trace(tdir):
        jaxsft.generate(model, tok, prompts, **kw)
    kernels = device_kernels(tdir)
    busy = busy_ns([(s, s + d) for _, s, d in kernels]) / 1e9
    by_name = collections.defaultdict(lambda: [0, 0])
    by_cat = collections.defaultdict(lambda: [0, 0])
    for name, _, d in kernels:
        by_name[name][0] += d
        by_name[name][1] += 1
        by_cat[category(name)][0] += d
        by_cat[category(name)][1] += 1
    total = sum(v[0] for v in by_name.values()) / 1e9 or float("nan")
    steps = a.new
    print(f"{a.label} shape {a.shape} rows {a.batch} (samples {a.samples}) prompt {a.prompt_len} new {a.new} "
          f"T={a.temperature} on {jax.devices()[0].device_kind}: wall {plain:.3f}s untraced; GPU busy {busy:.3f}s; "
          f"{a.batch * a.new / plain:.0f} new tok/s; {plain / steps * 1e3:.2f} ms per decode step (wall); "
          f"{len(kernels) / steps:.0f} kernels per step")
    print("by category (ms per decode step, % of kernel time, kernels per step):")
    for cat, (d, n) in sorted(by_cat.items(), key=lambda kv: -kv[1][0]):
        print(f"  {d / 1e6 / steps:7.3f} ms {100 * d / 1e9 / total:5.1f}% {n / steps:7.1f}  {cat}")
    print("top kernels:")
    for name, (d, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[: a.top]:
        print(f"  {d / 1e6:9.1f} ms {100 * d / 1e9 / total:5.1f}% n={n:6d} mean={d / n / 1e3:8.1f}us  {name[:100]}")
        if dump:
            for line in explain(dump, name):
                print(f"        {line}")
    if a.sequence:
        print_sequence(kernels, a.sequence, dump)
    print("RESULT " + json.dumps(dict(label=a.label, wall=plain, busy=busy, kernels_per_step=len(kernels) / steps,
                                      ms_per_step=plain / steps * 1e3, tok_s=a.batch * a.new / plain,
                                      categories={k: v[0] / 1e6 / steps for k, v in by_cat.items()})))


if __name__ == "__main__":
    main()
