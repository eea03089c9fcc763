"""Soak: many step() calls of random sizes on a small model, both trainers; does anything grow?

Not part of CI (it takes minutes). For each trainer (``jaxsft.IterativeSFTTrainer`` and the TRL facade
``compat.IterativeSFTTrainer``) it makes ``--calls`` step() calls, each with a random number of examples of
random lengths (so every length bucket and a varying number of micro-batches and updates occur), and
every ``--every`` calls records: compiled programs (``compiled_shapes``), host RSS (MB) and live device
arrays (``len(jax.live_arrays())``). A leak shows as growth after warm-up; the summary compares the
first record after warm-up with the last. ``--generate-calls G`` interleaves G ``trainer.generate()`` calls
with the core trainer's steps (1-8 prompts of 1-24 words, 1-32 new tokens, greedy or sampled, on the
training weights) and records the generation programs compiled (``jaxsft.generation.compiled_programs()``).

    PYTHONPATH=. python benchmarks/soak.py --calls 500          # both trainers, tiny Llama, CPU
    PYTHONPATH=. python benchmarks/soak.py --calls 20 --every 5  # smoke test
    PYTHONPATH=. python benchmarks/soak.py --trainers core --calls 500 --generate-calls 200  # issue 26
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

VOCAB = 256


def rss_mb() -> float:
    """Current resident set size (Linux /proc), falling back to the peak from getrusage."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_core():
    import tempfile

    import jaxsft
    import tiny

    mesh = jaxsft.single_device_mesh()
    model = jaxsft.from_pretrained(tiny.tiny_torch_model("llama", vocab_size=VOCAB), mesh=mesh)
    config = jaxsft.TrainConfig(learning_rate=1e-4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                logging_steps=5, max_length=64, length_buckets=(16, 32, 64), disable_tqdm=True)
    tokenizer = tiny.load_tokenizer(tiny.tokenizer_dir(tempfile.mkdtemp(), vocab_size=VOCAB))
    trainer = jaxsft.IterativeSFTTrainer(model, config, tokenizer, mesh=mesh)
    return trainer, trainer.step, lambda: trainer.compiled_shapes


def make_facade(output_dir: str):
    import torch
    from transformers import TrainingArguments

    import jaxsft
    import tiny
    from compat import IterativeSFTTrainer

    args = TrainingArguments(output_dir=output_dir, report_to=[], disable_tqdm=True, learning_rate=1e-4,
                             per_device_train_batch_size=4, gradient_accumulation_steps=2, logging_steps=5)
    trainer = IterativeSFTTrainer(tiny.tiny_torch_model("llama", vocab_size=VOCAB), args,
                                  mesh=jaxsft.single_device_mesh(), max_length=64)

    def step(input_ids):
        return trainer.step(input_ids=[torch.as_tensor(x, dtype=torch.long) for x in input_ids])

    return trainer, step, lambda: trainer.core.compiled_shapes


def random_generate(trainer, rng) -> None:
    """One generate() call of random size on the trainer's weights."""
    import tiny

    words = tiny.WORDS
    prompts = [" ".join(rng.choice(words, int(rng.integers(1, 25)))) for _ in range(int(rng.integers(1, 9)))]
    sampled = bool(rng.integers(0, 2))
    trainer.generate(prompts, max_new_tokens=int(rng.integers(1, 33)), temperature=0.8 if sampled else 0.0,
                     top_p=0.9 if sampled else None)


def soak(name: str, step, compiled, calls: int, every: int, seed: int, trainer=None, generate_calls: int = 0) -> list[dict]:
    import jax
    import numpy as np

    from jaxsft.generation import compiled_programs as generation_programs

    rng = np.random.default_rng(seed)
    # The generate() calls spread evenly over the step() calls (after call c when c * G // calls advances).
    generations_after = [(c * generate_calls) // calls - ((c - 1) * generate_calls) // calls for c in range(1, calls + 1)]
    records = []
    generated = 0
    started = time.perf_counter()
    for call in range(1, calls + 1):
        count = int(rng.integers(1, 17))
        examples = [rng.integers(3, VOCAB, int(rng.integers(2, 65))) for _ in range(count)]
        step(examples)
        for _ in range(generations_after[call - 1]):
            random_generate(trainer, rng)
            generated += 1
        if call % every == 0 or call == calls:
            records.append({
                "trainer": name, "call": call, "compiled_programs": compiled(), "rss_mb": round(rss_mb(), 1),
                "live_arrays": len(jax.live_arrays()), "seconds": round(time.perf_counter() - started, 1),
                "generate_calls": generated, "generation_programs": generation_programs(),
            })
            print(json.dumps(records[-1]), flush=True)
    return records


def summary(records: list[dict], warmup: int) -> dict:
    after = [r for r in records if r["call"] >= warmup] or records
    first, last = after[0], after[-1]
    return {
        "trainer": first["trainer"], "calls": last["call"], "from_call": first["call"],
        "compiled_programs": [first["compiled_programs"], last["compiled_programs"]],
        "rss_mb": [first["rss_mb"], last["rss_mb"]], "rss_growth_mb": round(last["rss_mb"] - first["rss_mb"], 1),
        "live_arrays": [first["live_arrays"], last["live_arrays"]], "seconds": last["seconds"],
        "generate_calls": last["generate_calls"],
        "generation_programs": [first["generation_programs"], last["generation_programs"]],
        "rss_range_after_warmup_mb": [min(r["rss_mb"] for r in after), max(r["rss_mb"] for r in after)],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=100, help="first call counted in the summary")
    parser.add_argument("--trainers", default="core,facade")
    parser.add_argument("--generate-calls", type=int, default=0, help="trainer.generate() calls (core trainer only)")
    parser.add_argument("--out", default=None, help="write every record and the summaries as JSON here")
    args = parser.parse_args(argv)

    import tempfile

    results, summaries = [], []
    for name in args.trainers.split(","):
        trainer, step, compiled = make_core() if name == "core" else make_facade(tempfile.mkdtemp())
        records = soak(name, step, compiled, args.calls, args.every, seed=0, trainer=trainer,
                       generate_calls=args.generate_calls if name == "core" else 0)
        results += records
        summaries.append(summary(records, min(args.warmup, args.calls)))
        del trainer, step
    for s in summaries:
        print("SUMMARY " + json.dumps(s), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"records": results, "summaries": summaries}, indent=1))


if __name__ == "__main__":
    main()
