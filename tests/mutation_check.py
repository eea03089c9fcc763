#!/usr/bin/env python3
"""Shows that the GPU tier and the kernel tests catch what they guard: each mutation breaks one path in a
throwaway copy of this checkout (under a temporary folder, never here), runs the tests that guard it there,
and must see them fail.

    python tests/mutation_check.py                  # every mutation this backend can run
    python tests/mutation_check.py ragged_mask_dropped
    JAX_PLATFORMS=cuda python tests/mutation_check.py   # on a GPU machine: the GPU tier's mutations too

Exit status 0 when every mutation run was caught (its tests failed), 1 when one was missed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]


class Mutation(NamedTuple):
    path: str
    edits: tuple[tuple[str, str], ...]  # (text that must be there, its replacement)
    tests: tuple[str, ...]  # pytest arguments, relative to the copy
    needs_gpu: bool


# Breaks of the fused norm kernel's backward, each checked on the CPU (interpret mode) and compiled on a GPU.
MEAN_TERM_DROPPED = (("mean = jnp.sum(d_normed", "mean = 0.0 * jnp.sum(d_normed"),)
RESIDUAL_COTANGENT_DROPPED = (("(dx + ds).astype(dtype)", "(dx + 0.0 * ds).astype(dtype)"),)

MUTATIONS = {
    # cuDNN's ragged call without its segment tables: plain causal attention over the whole packed row.
    "ragged_mask_dropped": Mutation(
        "jaxsft/models/layers.py",
        (("q_seqlen=seqlens, kv_seqlen=seqlens, q_offsets=offsets, kv_offsets=offsets,", ""),
         ("mask_type=MaskType.PADDING_CAUSAL", "mask_type=MaskType.CAUSAL")),
        ("tests/test_gpu_tier.py", "-m", "gpu", "-k", "ragged"),
        True,
    ),
    # The fused add + RMSNorm backward without the term that projects out the row's mean direction.
    "fused_backward_mean_dropped": Mutation(
        "jaxsft/kernels/add_rms_norm.py",
        MEAN_TERM_DROPPED,
        ("tests/test_kernels.py",),
        False,
    ),
    # The model's fused add + MLP norm given the attention norm's weight: the wiring, not the kernel, is wrong.
    "fused_norm_wrong_weight": Mutation(
        "jaxsft/models/decoder.py",
        (('_add_rms_norm(spec, h, o, p["mlp_norm_scale"]', '_add_rms_norm(spec, h, o, p["attn_norm_scale"]'),),
        ("tests/test_fused_norm_model.py",),
        False,
    ),
    # The deferred residual dropped: a layer's MLP output never reaches the next layer's fused add.
    "fused_norm_pending_dropped": Mutation(
        "jaxsft/models/decoder.py",
        (('h, x = _add_rms_norm(spec, h, pending, p["attn_norm_scale"]', 'h, x = _add_rms_norm(spec, h, 0 * pending, p["attn_norm_scale"]'),),
        ("tests/test_fused_norm_model.py",),
        False,
    ),
    # The per-device path (data/FSDP meshes) given half of each device's delta.
    "fused_norm_per_device_wrong": Mutation(
        "jaxsft/models/decoder.py",
        (("return add_rms_norm(h, delta, scale, eps, implementation=norm_impl, plus_one=plus_one)\n\n    return jax.shard_map",
          "return add_rms_norm(h, 0.5 * delta, scale, eps, implementation=norm_impl, plus_one=plus_one)\n\n    return jax.shard_map"),),
        ("tests/test_fused_norm_model.py",),
        False,
    ),
    # The kernel's backward without the residual's own cotangent, checked by the bf16 bound against fp32 (the
    # bound the GPU tier's model test uses), so that bound is shown not to be a free pass.
    "fused_backward_residual_dropped_bf16": Mutation(
        "jaxsft/kernels/add_rms_norm.py",
        RESIDUAL_COTANGENT_DROPPED,
        ("tests/test_fused_norm_model.py", "-k", "bf16"),
        False,
    ),
    # The same broken backward against the GPU tier's model test (compiled Triton kernel, the same bf16 bound).
    "fused_backward_residual_dropped_bf16_compiled": Mutation(
        "jaxsft/kernels/add_rms_norm.py",
        RESIDUAL_COTANGENT_DROPPED,
        ("tests/test_gpu_tier.py", "-m", "gpu", "-k", "fused and model"),
        True,
    ),
    "fused_backward_mean_dropped_compiled": Mutation(
        "jaxsft/kernels/add_rms_norm.py",
        MEAN_TERM_DROPPED,
        ("tests/test_gpu_tier.py", "-m", "gpu", "-k", "fused"),
        True,
    ),
}


def _copy_checkout(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True, capture_output=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source, target = REPO / name.decode(), dest / name.decode()
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())


def run(name: str, mutation: Mutation) -> bool:
    """True when the mutated copy's tests fail (caught)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
        copy = Path(tmp)
        _copy_checkout(copy)
        target = copy / mutation.path
        text = target.read_text()
        for old, new in mutation.edits:
            if old not in text:
                raise SystemExit(f"{name}: {mutation.path} no longer contains {old!r}; update this mutation")
            text = text.replace(old, new)
        target.write_text(text)
        env = dict(os.environ, PYTHONPATH=str(copy))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", *mutation.tests]
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    caught = proc.returncode == 1  # 1: tests ran and failed; 0 passed, 2-5 errors or nothing collected
    print(f"{name}: {'caught' if caught else 'MISSED'} (pytest exit {proc.returncode}: {summary})", flush=True)
    return caught


def main(names: list[str]) -> int:
    import jax

    on_gpu = jax.default_backend() == "gpu"
    unknown = sorted(set(names) - set(MUTATIONS))
    if unknown:
        raise SystemExit(f"unknown mutations {unknown}; choose from {sorted(MUTATIONS)}")
    missed = 0
    for name in names or list(MUTATIONS):
        mutation = MUTATIONS[name]
        if mutation.needs_gpu and not on_gpu:
            print(f"{name}: not run (needs a GPU; the backend is {jax.default_backend()!r})", flush=True)
            continue
        missed += not run(name, mutation)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
