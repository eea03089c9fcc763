"""Expert iteration on the JAX API: sample answers, keep the ones a verifier accepts, train on them, repeat.

    python -m jaxsft export ~/models/smollm2   # the bundled SmolLM2-135M-Instruct as a Hugging Face folder
    python examples/expert_iteration.py --model ~/models/smollm2
    python examples/expert_iteration.py --tiny   # a tiny offline model, in seconds (what CI runs)

The code between the README markers is the README's "Quick start: JAX API", verbatim
(tests/test_examples.py keeps them equal).
"""

from __future__ import annotations

import argparse
import json
import tempfile

# README:begin
import re

import jaxsft
from transformers import AutoTokenizer


def verify(reply: str, answer: str) -> bool:
    """The last number in the reply is the answer."""
    numbers = re.findall(r"-?\d+", reply)
    return bool(numbers) and numbers[-1] == answer


def expert_iteration(model_dir, problems, held_out, *, rounds=3, samples=4, learning_rate=3e-5):
    """problems, held_out: lists of (question, answer). Returns the trainer and one stats dict per round."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = jaxsft.from_pretrained(model_dir)  # a local Hugging Face folder
    # A constant rate and no warmup: HF's warmup starts at 0, so with warmup_steps=N update 1 would not move.
    config = jaxsft.TrainConfig(learning_rate=learning_rate, lr_scheduler_type="constant",
                                per_device_train_batch_size=8, max_length=128, seed=0)
    trainer = jaxsft.IterativeSFTTrainer(model, config, tokenizer)

    def chat(question):
        return [{"role": "user", "content": question}]

    def accuracy():  # greedy (temperature 0) on the held-out problems
        replies = trainer.generate([chat(q) for q, _ in held_out], max_new_tokens=16)
        return sum(verify(r, a) for r, (_, a) in zip(replies, held_out)) / len(held_out)

    history = [{"round": 0, "accuracy": accuracy()}]
    print(f"round 0: held-out accuracy {history[0]['accuracy']:.0%}")
    chats = [chat(q) for q, _ in problems]
    for round_number in range(1, rounds + 1):
        # Each call samples with a fresh seed (derived from TrainConfig.seed), so rounds differ.
        replies = trainer.generate(chats, max_new_tokens=16, temperature=0.8, num_return_sequences=samples)
        kept = [(chats[i // samples], reply) for i, reply in enumerate(replies)
                if verify(reply, problems[i // samples][1])]
        # The chats are formatted by the same chat template as in generate, each reply is learned as the
        # assistant turn and ends with EOS (TrainConfig.add_eos). A round that kept nothing trains nothing.
        stats = trainer.step(texts=[c for c, _ in kept], texts_labels=[r for _, r in kept])
        history.append({"round": round_number, "kept": len(kept), "sampled": len(replies),
                        "updates": stats["num_updates"], "loss": stats["loss"], "accuracy": accuracy()})
        print(f"round {round_number}: kept {len(kept)}/{len(replies)}, {stats['num_updates']} updates, "
              f"loss {stats['loss']:.3f}, held-out accuracy {history[-1]['accuracy']:.0%}")
    return trainer, history
# README:end


def main() -> None:
    from jaxsft.testing import addition_problems, tiny_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a local Hugging Face folder (e.g. from `python -m jaxsft export DIR`)")
    parser.add_argument("--tiny", action="store_true", help="build a tiny model offline and run on it (seconds)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-dir", help="save the trained model here (a Hugging Face folder)")
    parser.add_argument("--summary", help="write the per-round stats here as JSON")
    args = parser.parse_args()
    if args.tiny == bool(args.model):
        parser.error("pass --model DIR or --tiny")
    with tempfile.TemporaryDirectory(prefix="jaxsft-tiny-") as scratch:  # removed at the end, also on errors
        if args.tiny:
            model_dir = tiny_model(scratch)
            problems, held_out = addition_problems(32, seed=1), addition_problems(32, seed=2)
            trainer, history = expert_iteration(model_dir, problems, held_out, rounds=args.rounds, learning_rate=2e-4)
        else:
            problems = addition_problems(32, seed=1, low=10, high=99)
            held_out = addition_problems(64, seed=2, low=10, high=99)
            trainer, history = expert_iteration(args.model, problems, held_out, rounds=args.rounds)
        if args.output_dir:
            jaxsft.save_pretrained(trainer.model, args.output_dir, tokenizer=trainer.tokenizer)
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(history, f, indent=1)


if __name__ == "__main__":
    main()
