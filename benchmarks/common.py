"""Shared pieces of the training benchmarks: model shapes, workloads, one timed worker per implementation.

The workload is the same for every implementation: each ``step()`` call gets ``seqs_per_call`` random
sequences of ``seq`` tokens (no padding), shuffled and cut into micro-batches of ``batch`` rows, one
AdamW update per micro-batch (lr constant 1e-5, no weight decay, clipping at 1.0), fp32 master
weights. ``dtype`` is the compute precision (bf16: jaxsft ``bf16=True``, torch autocast). Both start
from the same weights (jaxsft converts the seeded torch model), so their first losses agree.

Workers run in their own process (``python -m`` style via :func:`run_worker_subprocess`) so each
one owns the device, its thread pools and its peak-memory counters.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any, Optional

SHAPES = {
    # name: (model_type, hidden, intermediate, layers, heads, kv_heads, vocab, tied)
    "cpu-small": ("llama", 256, 688, 4, 4, 2, 2048, False),
    "tiny": ("qwen2", 128, 256, 2, 4, 2, 1024, True),
    "smol": ("llama", 576, 1536, 30, 9, 3, 49152, True),
    "qwen05": ("qwen2", 896, 4864, 24, 14, 2, 151936, True),
    "qwen15": ("qwen2", 1536, 8960, 28, 12, 2, 151936, True),
}


@dataclasses.dataclass
class Workload:
    shape: str = "cpu-small"
    device: str = "cpu"  # "cpu" or "gpu" (torch: cuda)
    dtype: str = "fp32"  # compute precision: "fp32" or "bf16"
    seq: int = 128
    batch: int = 8  # micro-batch rows (per device)
    seqs_per_call: int = 64
    warmup: int = 2  # step() calls excluded from timing (the first compiles)
    timed: int = 5
    lr: float = 1e-5
    seed: int = 0
    cpus: Optional[list[int]] = None  # pin the worker to these CPU cores (both thread pools size to them)

    @property
    def tokens_per_call(self) -> int:
        return self.seqs_per_call * self.seq


def hf_config(shape: str, seq: int):
    import transformers as tf

    model_type, hidden, inter, layers, heads, kv, vocab, tied = SHAPES[shape]
    cls = tf.Qwen2Config if model_type == "qwen2" else tf.LlamaConfig
    return cls(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max(seq, 512),
        tie_word_embeddings=tied, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def torch_model(w: Workload):
    """The seeded random-init HF model both implementations start from (fp32 weights, on the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(w.seed)
    cfg = hf_config(w.shape, w.seq)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()


def random_calls(w: Workload, vocab: int):
    import numpy as np

    rng = np.random.default_rng(w.seed)
    return [rng.integers(3, vocab, (w.seqs_per_call, w.seq), dtype=np.int32) for _ in range(w.warmup + w.timed)]


def summarise(w: Workload, impl: str, times: list[float], first: float, losses: list[float], **extra) -> dict:
    import numpy as np

    timed = times[w.warmup:]
    median = float(np.median(timed))
    return {
        "impl": impl, "shape": w.shape, "device": w.device, "dtype": w.dtype,
        "tokens_per_s": w.tokens_per_call / median, "call_median_s": median, "call_min_s": float(min(timed)),
        "first_call_s": first, "losses": losses, **extra,
    }


# ------------------------------------------------------------------------------------------ workers
def run_jaxsft(w: Workload) -> dict:
    """jaxsft.IterativeSFTTrainer.step() on one device, one bucket (seq), GA 1."""
    if w.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    import jaxsft

    device = jax.devices()[0]
    mesh = jaxsft.single_device_mesh(device)
    model = jaxsft.from_pretrained(torch_model(w), mesh=mesh)
    cfg = jaxsft.TrainConfig(
        learning_rate=w.lr, lr_scheduler_type="constant", per_device_train_batch_size=w.batch, max_length=w.seq,
        length_buckets=(w.seq,), bf16=w.dtype == "bf16", logging_steps=0, disable_tqdm=True, seed=w.seed,
        max_grad_norm=1.0, weight_decay=0.0, compilation_cache=False,  # first steps compile, as on a fresh machine
    )
    trainer = jaxsft.IterativeSFTTrainer(model, cfg, mesh=mesh)
    times, losses, stats = [], [], {}
    for ids in random_calls(w, model.spec.vocab_size):
        t = time.perf_counter()
        stats = trainer.step(input_ids=ids)
        jax.block_until_ready(trainer.params)
        times.append(time.perf_counter() - t)
        losses.append(stats["loss"])
    return summarise(
        w, "jaxsft", times, times[0], losses, updates_per_call=stats["num_updates"],
        compiled=stats["compiled_shapes"], device_kind=str(device.device_kind), backend=jax.default_backend(),
        cpus=len(os.sched_getaffinity(0)),
    )


def run_torch(w: Workload) -> dict:
    """The same loop in plain eager PyTorch (HF model, sdpa attention, AdamW, clip_grad_norm_)."""
    import contextlib

    import numpy as np
    import torch

    dev = torch.device("cuda" if w.device == "gpu" else "cpu")
    model = torch_model(w).to(dev).train()
    model.config.use_cache = False
    fused = {"fused": True} if dev.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=w.lr, weight_decay=0.0, **fused)
    autocast = (
        (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if w.dtype == "bf16" else contextlib.nullcontext
    )
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(w.seed)
    times, losses = [], []
    for ids in random_calls(w, model.config.vocab_size):
        sync()
        t = time.perf_counter()
        batch = torch.from_numpy(ids).long()
        order = torch.from_numpy(rng.permutation(batch.shape[0]))
        total, updates = torch.zeros((), device=dev), 0
        for start in range(0, batch.shape[0], w.batch):
            mb = batch[order[start : start + w.batch]].to(dev, non_blocking=True)
            with autocast():
                loss = model(input_ids=mb, labels=mb).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            total += loss.detach()
            updates += 1
        losses.append(float(total) / updates)  # the host sync, once per call (as jaxsft's)
        sync()
        times.append(time.perf_counter() - t)
    extra = {"threads": torch.get_num_threads(), "cpus": len(os.sched_getaffinity(0)), "device_kind": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"}
    if dev.type == "cuda":
        extra["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return summarise(w, "torch eager", times, times[0], losses, **extra)


WORKERS = {"jaxsft": run_jaxsft, "torch": run_torch}


def run_worker_subprocess(script: str, impl: str, w: Workload, env: Optional[dict] = None) -> dict:
    """Run ``script --worker impl --workload JSON`` and parse its RESULT line (errors come back as a dict)."""
    cmd = [sys.executable, script, "--worker", impl, "--workload", json.dumps(dataclasses.asdict(w))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"impl": impl, "error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(lines[-1][len("RESULT "):])


def worker_main(impl: str, workload_json: str) -> None:
    w = Workload(**json.loads(workload_json))
    if w.cpus:
        # Before torch/jax start their thread pools: OpenMP and XLA's Eigen pool both size to the affinity mask.
        os.sched_setaffinity(0, set(w.cpus))
        os.environ["OMP_NUM_THREADS"] = str(len(w.cpus))
    print("RESULT " + json.dumps(WORKERS[impl](w)), flush=True)


def table(rows: list[dict[str, Any]], baseline: str = "torch eager") -> str:
    """One markdown table: per implementation its tokens/s and the ratio to the baseline."""
    base = next((r for r in rows if r.get("impl") == baseline and "error" not in r), None)
    out = [
        "| impl | device | dtype | CPU cores | tokens/s | call median s | first call s | first loss | vs " + baseline + " |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['impl']} | error | | | | | | | |")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        out.append(
            f"| {r['impl']} | {r.get('device_kind', r['device'])} | {r['dtype']} | {r.get('cpus', '-')} | {r['tokens_per_s']:,.0f} | "
            f"{r['call_median_s']:.3f} | {r['first_call_s']:.2f} | {r['losses'][0]:.4f} | {ratio:.2f}x |"
        )
    return "\n".join(out)
