#!/usr/bin/env python3
"""Training speed on one GPU: TRL 0.23.1 (eager and torch_compile) beside jaxsft (native and the compat facade).

Every configuration runs in its own process, in one call of this script, so the ratios compare runs of the
same machine. Two workloads, both as ``step()`` calls of 64 examples, micro-batch 8, one AdamW update per
micro-batch, bf16 compute with fp32 master weights and Adam state, clipping at 1.0:

* fixed: 64 random sequences of 512 tokens per call (the TRL baseline workload);
* ragged: 64 examples per call with seeded log-normal lengths (median 180, sigma 0.9, clipped to
  16...1024; call i uses numpy's default_rng(100 + i)), as a generate-filter loop produces them.

Speed is real (non-padding) tokens per second over the timed calls. MFU = (6 N + 12 L H S) x tokens/s /
the bf16 matmul peak measured in the same run on random data (torch, 8192^3). N counts non-embedding
parameters plus the lm_head matmul; S is 512 for fixed and each example's own length for ragged (the
attention term is averaged per real token). TRL runs from carried wheels (trl 0.23.1, datasets, dill,
multiprocess; see ../shared/reference/trl_gpu_baseline.md); TRL needs a tokenizer even for token inputs,
so a tiny byte-level BPE is trained offline.

    python benchmarks/bench_speed.py --shapes qwen05 --impls trl,jaxsft --workloads fixed,ragged
    python benchmarks/bench_speed.py --shapes tiny --impls jaxsft,compat,trl --cpu   # smoke test
    python benchmarks/bench_speed.py --worker jaxsft --shape qwen05 --workload fixed --options '{"scan_layers": false}'
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

SHAPES = {
    # name: (model_type, hidden, intermediate, layers, heads, kv_heads, vocab)  all tied
    "tiny": ("qwen2", 64, 128, 2, 4, 2, 1024),
    "smol": ("llama", 576, 1536, 30, 9, 3, 49152),
    "qwen05": ("qwen2", 896, 4864, 24, 14, 2, 151936),
    "qwen15": ("qwen2", 1536, 8960, 28, 12, 2, 151936),
    "gemma2_tiny": ("gemma2", 64, 128, 2, 4, 2, 1024),
    "gemma2_2b": ("gemma2", 2304, 9216, 26, 8, 4, 256000),  # Gemma-2-2B's shape (head_dim 256, soft caps, windows)
}
DEFAULT_SHAPES = "smol,qwen05,qwen15"  # --shapes
HEAD_DIM = {"gemma2_tiny": 16, "gemma2_2b": 256}  # where it is not hidden // heads
CALLS = {"fixed": (2, 5), "ragged": (6, 5)}  # (warm-up, timed) step() calls: ragged warms up longer (more shapes)
EXAMPLES, MICRO_BATCH, SEQ, MAX_LEN = 64, 8, 512, 1024


# ------------------------------------------------------------------------------------------- workload
def workload(name: str, vocab: int) -> list[list]:
    """The calls: lists of 1-D int arrays (ids >= 3, so none is a pad, bos or eos id)."""
    import numpy as np

    warm, timed = CALLS[name]
    calls = []
    for i in range(warm + timed):
        rng = np.random.default_rng(100 + i)
        if name == "fixed":
            lengths = np.full(EXAMPLES, SEQ)
        else:
            lengths = np.clip(np.round(np.exp(rng.normal(np.log(180), 0.9, EXAMPLES))), 16, MAX_LEN).astype(int)
        calls.append([rng.integers(3, min(vocab, 8192), int(n)).astype(np.int64) for n in lengths])
    return calls


def hf_config(shape: str):
    import transformers as tf

    model_type, hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    if model_type == "gemma2":  # Gemma 2's own rules at their defaults: soft caps 50 / 30, window 4096 on every other layer
        head_dim = HEAD_DIM[shape]
        return tf.Gemma2Config(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, query_pre_attn_scalar=head_dim,
            max_position_embeddings=8192, tie_word_embeddings=True, use_cache=False, pad_token_id=0,
            bos_token_id=1, eos_token_id=2,
        )
    cls = tf.Qwen2Config if model_type == "qwen2" else tf.LlamaConfig
    return cls(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096, tie_word_embeddings=True,
        use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def flops_per_token(shape: str, attended: float) -> float:
    """6 N + 12 L H S with N = non-embedding parameters + the lm_head matmul (tied: the table once)."""
    model_type, hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    head_dim = HEAD_DIM.get(shape, hidden // heads)
    attn = hidden * head_dim * (2 * heads + 2 * kv) + (head_dim * (heads + 2 * kv) if model_type == "qwen2" else 0)
    mlp = 3 * hidden * inter
    norms = (4 if model_type == "gemma2" else 2) * hidden
    n = layers * (attn + mlp + norms) + hidden + vocab * hidden
    return 6 * n + 12 * layers * heads * head_dim * attended


def attended_length(calls: list[list]) -> float:
    """Mean attention span per real token: each example's own length, weighted by its tokens."""
    lengths = [len(x) for call in calls for x in call]
    return sum(n * n for n in lengths) / sum(lengths)


def tokenizer():
    """A tiny byte-level BPE trained offline (TRL's collator insists on a tokenizer with a pad token)."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(500)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [" ".join(rng.choice(words) for _ in range(50)) for _ in range(200)],
        trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<bos>", "<eos>"], show_progress=False),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


# ------------------------------------------------------------------------------------------- workers
def _timed(step, calls, sync, after=None) -> tuple[list[float], list[float], list[int], list[Optional[float]]]:
    """Per call: seconds, loss, and jaxsft's compiled-program count after it (-1 for TRL, whose step() returns None).

    ``after()``, when given, supplies the call's stats once the clock has stopped (TRL's loss)."""
    times, losses, compiled, compile_s = [], [], [], []
    for call in calls:
        sync()
        t = time.perf_counter()
        stats = step(call)
        sync()
        times.append(time.perf_counter() - t)
        if after is not None:
            stats = after()
        losses.append(float(stats["loss"]) if isinstance(stats, dict) else float("nan"))
        compiled.append(int(stats.get("compiled_shapes", -1)) if isinstance(stats, dict) else -1)
        compile_s.append(float(stats["compile_seconds"]) if isinstance(stats, dict) and "compile_seconds" in stats
                         else None)  # jaxsft's share of the call spent compiling (TRL reports none)
    return times, losses, compiled, compile_s


def _torch_model(shape: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = hf_config(shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager" if cfg.model_type == "gemma2" else "sdpa")
    return model


def _trl_args(cls, w: str, cpu: bool, **extra):
    return cls(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=MICRO_BATCH, learning_rate=1e-5,
        logging_steps=1000, report_to=[], save_strategy="no", bf16=not cpu, use_cpu=cpu, max_steps=1000,
        gradient_checkpointing=False, max_length=SEQ if w == "fixed" else MAX_LEN, disable_tqdm=True, **extra,
    )


def _trl_loss_reader(trainer):
    """A function giving each TRL call's loss. TRL 0.23.1's step() returns None; it sums each update's loss into
    ``tr_loss`` (zeroed only when it logs, never here: logging_steps=1000). A call's loss is then the mean of its
    updates' losses (jaxsft's is the token-weighted mean: the same on the fixed workload), read after the clock
    stopped."""
    seen = {"total": 0.0, "updates": 0}

    def read() -> dict:
        total, updates = float(trainer.tr_loss), trainer.state.global_step
        loss = (total - seen["total"]) / max(updates - seen["updates"], 1)
        seen.update(total=total, updates=updates)
        return {"loss": loss}

    return read


def run_trl(shape: str, w: str, cpu: bool, compile_: bool, facade: bool) -> dict:
    """TRL 0.23.1's IterativeSFTTrainer, or the same script with one import changed to jaxsft's compat."""
    import torch

    if facade:
        from compat import IterativeSFTConfig, IterativeSFTTrainer
    else:
        from trl import IterativeSFTConfig, IterativeSFTTrainer
    device = "cpu" if cpu else "cuda"
    model = _torch_model(shape, device)
    extra = {"torch_compile": True} if compile_ else {}
    trainer = IterativeSFTTrainer(model=model, args=_trl_args(IterativeSFTConfig, w, cpu, **extra), processing_class=tokenizer())
    calls = workload(w, model.config.vocab_size)
    tensors = [[torch.from_numpy(x) for x in call] for call in calls]
    if not cpu:
        torch.cuda.reset_peak_memory_stats()
    if facade:
        import jax

        def sync():
            jax.block_until_ready(jax.tree.leaves(trainer.core.params))
    else:
        sync = torch.cuda.synchronize if not cpu else (lambda: None)
    step = lambda b: trainer.step(input_ids=b, attention_mask=[torch.ones_like(x) for x in b], labels=b)  # noqa: E731
    times, losses, compiled, _ = _timed(step, tensors, sync, after=None if facade else _trl_loss_reader(trainer))
    if facade:
        compiled = [int(trainer.core.compiled_shapes)] * len(times)  # the facade's step() returns TRL's None
    peak = 0.0
    if facade:
        import jax

        peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30
    if not cpu:
        peak += torch.cuda.max_memory_allocated() / 2**30
    return _summary(w, calls, times, losses, peak, compiled)


def run_jaxsft(shape: str, w: str, cpu: bool, options: dict, model_options: dict) -> dict:
    import jax

    import jaxsft
    from jaxsft.models.families import spec_from_hf_config

    mesh = jaxsft.single_device_mesh()
    model = jaxsft.init_model(spec_from_hf_config(hf_config(shape)), mesh=mesh, seed=0, **model_options)
    cfg = jaxsft.TrainConfig(**{
        "learning_rate": 1e-5, "lr_scheduler_type": "constant", "per_device_train_batch_size": MICRO_BATCH,
        "max_length": SEQ if w == "fixed" else MAX_LEN, "bf16": not cpu, "logging_steps": 0, "disable_tqdm": True,
        "weight_decay": 0.0, "max_grad_norm": 1.0, "compilation_cache": False, **({"length_buckets": (SEQ,)} if w == "fixed" else {}), **options,
    })
    trainer = jaxsft.IterativeSFTTrainer(model, cfg, mesh=mesh)
    calls = workload(w, model.spec.vocab_size)
    times, losses, compiled, compile_s = _timed(lambda b: trainer.step(input_ids=b), calls,
                                                lambda: jax.block_until_ready(trainer.params))
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30
    summary = _summary(w, calls, times, losses, peak, compiled)
    summary["first_step_compile_s"] = compile_s[0]  # of first_step_s: lowering and compiling its programs
    return summary


def _summary(w: str, calls, times, losses, peak_gib, compiled) -> dict:
    """Real tokens/s over the timed calls; ``compiles_in_timed_calls`` says whether a timed call met a new shape."""
    warm, _ = CALLS[w]
    real = sum(len(x) for call in calls[warm:] for x in call)
    return {
        "tokens_per_s": real / sum(times[warm:]), "first_step_s": times[0], "call_s": times, "losses": losses,
        "peak_gib": peak_gib, "attended": attended_length(calls[warm:]), "compiled_shapes": compiled[-1],
        "compiles_in_timed_calls": compiled[-1] - compiled[warm - 1] if compiled[-1] >= 0 else None,
    }


def run_peak(cpu: bool) -> dict:
    """The card's bf16 matmul peak on random data (``roof.matmul_peak``: torch's cuBLAS, warmed, in bursts)."""
    if cpu:
        return {"tflops": float("nan")}
    from roof import device_name, matmul_peak

    return {"tflops": matmul_peak() / 1e12, "device": device_name()}


def worker(args) -> dict:
    if args.worker == "peak":
        return run_peak(args.cpu)
    if args.worker in ("trl", "trl_compile", "compat"):
        return run_trl(args.shape, args.workload, args.cpu, args.worker == "trl_compile", args.worker == "compat")
    return run_jaxsft(args.shape, args.workload, args.cpu, json.loads(args.options), json.loads(args.model_options))


# ------------------------------------------------------------------------------------------- driver
IMPLS = ("trl", "trl_compile", "jaxsft", "compat")


def plan_problems(shapes: list[str], variants: dict) -> list[str]:
    """What in ``--shapes`` or ``--variants`` names nothing that runs, found before any run starts (each worker would
    otherwise fail on it after the peak probe, on a device lease). A variant is ``[TrainConfig overrides, model
    options]``: the first must build a ``jaxsft.TrainConfig``, the second's keys must be the model's constructor's."""
    import jaxsft

    problems = [f"--shapes: unknown {shape!r}; choose from {sorted(SHAPES)}" for shape in shapes if shape not in SHAPES]
    for label, entry in variants.items():
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, dict) for e in entry)):
            problems.append(f"--variants {label!r}: give [TrainConfig overrides, model options], two JSON objects")
            continue
        options, model_options = entry
        try:
            jaxsft.TrainConfig(**options)
        except (TypeError, ValueError) as e:
            problems.append(f"--variants {label!r}: its TrainConfig overrides (the first object) fail: {e}")
        known = model_option_names()
        stray = sorted(set(model_options) - known)
        if stray:
            problems.append(f"--variants {label!r}: model options (the second object) {stray} are not the model's; "
                            f"choose from {sorted(known)}")
    return problems


def model_option_names() -> set[str]:
    """The keywords a variant's model options may use: ``jaxsft.init_model``'s and the model constructor's it passes
    on, less what :func:`run_jaxsft` passes itself (``mesh``, ``seed``) and what the constructor is given."""
    import inspect

    import jaxsft
    from jaxsft.models.decoder import CausalLM

    init = inspect.signature(jaxsft.init_model).parameters
    own = {name for name, param in init.items() if param.kind is param.KEYWORD_ONLY}
    passed_on = set(inspect.signature(CausalLM.__init__).parameters) - {"self", "spec", "rngs"}
    return (own | passed_on) - {"mesh", "seed"}


def drop_named_cache(env) -> None:
    """Remove from ``env`` (``os.environ`` or a copy) a compilation cache it names. First steps are timed cold, and
    ``TrainConfig.compilation_cache=False`` leaves a process's own cache on: such a cache would turn compiles into
    loads (the test suite names one)."""
    env.pop("JAX_COMPILATION_CACHE_DIR", None)


def spawn(args, impl: str, shape: str, w: str, options: str = "{}", model_options: str = "{}", timeout: float = 900) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--shape", shape, "--workload", w,
           "--options", options, "--model-options", model_options] + (["--cpu"] if args.cpu else [])
    env = dict(os.environ)
    drop_named_cache(env)
    if args.cpu:
        env.setdefault("JAX_PLATFORMS", "cpu")
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr or proc.stdout)[-1500:]}
    result = json.loads(lines[-1][len("RESULT "):])
    result["process_s"] = time.perf_counter() - t
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES)
    p.add_argument("--impls", default="trl,trl_compile,jaxsft,compat")
    p.add_argument("--workloads", default="fixed,ragged")
    p.add_argument("--variants", default="{}", help='JSON {"label": [TrainConfig overrides, model options], ...} of extra jaxsft runs')
    p.add_argument("--skip", default="", help="comma list of runs not to make: label:workload, label:shape or label:shape:workload, e.g. trl_compile:ragged")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--out", default=None, help="JSON lines, one per run, appended as each run ends")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting runs (and cap each) so the whole ends within this")
    p.add_argument("--run-timeout-s", type=float, default=900)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", default="tiny", help=argparse.SUPPRESS)
    p.add_argument("--workload", default="fixed", help=argparse.SUPPRESS)
    p.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--model-options", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    started = time.perf_counter()
    impls = [i for i in args.impls.split(",") if i]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        p.error(f"--impls: unknown {unknown}; choose from {list(IMPLS)} (extra jaxsft settings go in --variants)")
    variants = json.loads(args.variants)
    problems = plan_problems([s for s in args.shapes.split(",") if s], variants)
    if problems:
        p.error("; ".join(problems))
    skip = set(filter(None, args.skip.split(",")))
    labels = set(impls) | set(variants)
    stray = sorted(entry for entry in skip if entry.split(":")[0] not in labels)
    if stray:  # a misspelt entry would otherwise skip nothing, silently
        p.error(f"--skip: {stray} do not start with a run label ({sorted(labels)}); write label:workload, "
                "label:shape or label:shape:workload")
    peak = spawn(args, "peak", "tiny", "fixed")
    print(f"bf16 matmul peak (torch, random data): {peak}", flush=True)
    _record(args.out, {"peak": peak})
    rows = []
    for shape in args.shapes.split(","):
        for w in args.workloads.split(","):
            plans = [(impl, impl, "{}", "{}") for impl in impls]
            plans += [(label, "jaxsft", json.dumps(o), json.dumps(m)) for label, (o, m) in variants.items()]
            for label, impl, options, model_options in plans:
                if f"{label}:{w}" in skip or f"{label}:{shape}" in skip or f"{label}:{shape}:{w}" in skip:
                    continue
                left = args.budget_s - (time.perf_counter() - started)
                if left < 30:
                    r = {"error": "not run: the --budget-s ran out"}
                else:
                    r = spawn(args, impl, shape, w, options, model_options, timeout=min(args.run_timeout_s, left - 10))
                r.update(label=label, shape=shape, workload=w)
                rows.append(r)
                _record(args.out, r)
                print(json.dumps({k: v for k, v in r.items() if k not in ("call_s",)})[:1500], flush=True)
    print_table(rows, peak.get("tflops"))


def _record(path, entry: dict) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def print_table(rows: list[dict], peak_tflops) -> None:
    print(f"\n| shape | workload | impl | real tokens/s | vs TRL eager | MFU % | first step s | peak GiB | first loss | last loss | programs (new in timed calls) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['workload']} | {r['label']} | error: {r['error'][-120:]!r} | | | | | | | |")
            continue
        base = next((b for b in rows if b["shape"] == r["shape"] and b["workload"] == r["workload"]
                     and b["label"] == "trl" and "error" not in b), None)
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}×" if base else "-"
        mfu = 100 * flops_per_token(r["shape"], r["attended"]) * r["tokens_per_s"] / (peak_tflops * 1e12) if peak_tflops == peak_tflops and peak_tflops else float("nan")
        print(f"| {r['shape']} | {r['workload']} | {r['label']} | {r['tokens_per_s']:,.0f} | {ratio} | {mfu:.1f} | "
              f"{_first_step(r)} | {r['peak_gib']:.1f} | {_loss(r['losses'][0])} | {_loss(r['losses'][-1])} | "
              f"{_programs(r)} |")


def _first_step(r: dict) -> str:
    """The first call's seconds, with jaxsft's compiling share where the trainer reported it."""
    compile_s = r.get("first_step_compile_s")
    return f"{r['first_step_s']:.1f}" + (f" (compile {compile_s:.1f})" if compile_s is not None else "")


def _loss(value: float) -> str:
    """A row without a loss (NaN in the JSON: the facade's step() returns None, as TRL's does) says so."""
    return "not reported" if value != value else f"{value:.4f}"


def _programs(r: dict) -> str:
    if r.get("compiles_in_timed_calls") is None:
        return "-"
    return f"{r['compiled_shapes']} ({r['compiles_in_timed_calls']})"


if __name__ == "__main__":
    main()
