"""Rejection sampling with a reward function: keep each prompt's best sample when its reward is high enough.

    python examples/rejection_sampling.py --model ~/models/smollm2   # after `python -m jaxsft export ~/models/smollm2`
    python examples/rejection_sampling.py --tiny            # a tiny offline model, in seconds (what CI runs)

The code between the README markers is shown in the README, verbatim.
"""

from __future__ import annotations

import argparse
import json
import tempfile

# README:begin
import re

import jaxsft
from transformers import AutoTokenizer


def reward(reply: str, answer: str) -> float:
    """1 for the right final number, less 0.1 per word beyond the first: short, exact replies win."""
    numbers = re.findall(r"-?\d+", reply)
    correct = bool(numbers) and numbers[-1] == answer
    return float(correct) - 0.1 * max(0, len(reply.split()) - 1)


def rejection_sampling(model_dir, problems, *, rounds=3, samples=8, threshold=0.5, learning_rate=3e-5):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = jaxsft.TrainConfig(learning_rate=learning_rate, lr_scheduler_type="constant",
                                per_device_train_batch_size=8, max_length=128)
    trainer = jaxsft.IterativeSFTTrainer(jaxsft.from_pretrained(model_dir), config, tokenizer)
    chats = [[{"role": "user", "content": q}] for q, _ in problems]
    history = []
    for round_number in range(1, rounds + 1):
        result = trainer.generate(chats, max_new_tokens=16, temperature=1.0, num_return_sequences=samples,
                                  return_tokens=True)
        best, rewards = [], []  # each prompt's highest-reward sample, when it clears the threshold
        for chat, (_, answer), group in zip(chats, problems, result.grouped()):
            scored = [(reward(r, answer), r) for r in group]
            rewards += [score for score, _ in scored]
            score, reply = max(scored)
            if score >= threshold:
                best.append((chat, reply))
        stats = trainer.step(texts=[c for c, _ in best], texts_labels=[r for _, r in best])  # [] trains nothing
        history.append({"round": round_number, "kept": len(best), "updates": stats["num_updates"],
                        "loss": stats["loss"], "mean_reward": sum(rewards) / len(rewards)})
        print(f"round {round_number}: mean sample reward {history[-1]['mean_reward']:.2f}, "
              f"kept {len(best)}/{len(chats)} prompts' best, loss {stats['loss']:.3f}")
    return trainer, history
# README:end


def main() -> None:
    from jaxsft.testing import addition_problems, tiny_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a local Hugging Face folder (e.g. from `python -m jaxsft export DIR`)")
    parser.add_argument("--tiny", action="store_true", help="build a tiny model offline and run on it (seconds)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--summary", help="write the per-round stats here as JSON")
    args = parser.parse_args()
    if args.tiny == bool(args.model):
        parser.error("pass --model DIR or --tiny")
    with tempfile.TemporaryDirectory(prefix="jaxsft-tiny-") as scratch:  # removed at the end, also on errors
        if args.tiny:
            _, history = rejection_sampling(tiny_model(scratch), addition_problems(32, seed=1), rounds=args.rounds,
                                            learning_rate=2e-4)
        else:
            _, history = rejection_sampling(args.model, addition_problems(32, seed=1, low=10, high=99),
                                            rounds=args.rounds)
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(history, f, indent=1)


if __name__ == "__main__":
    main()
