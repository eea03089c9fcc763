"""The same expert-iteration loop as a TRL script, with one import changed to run on jaxsft.

    python examples/trl_switch.py --model ~/models/smollm2 --output-dir trained  # after `python -m jaxsft export ~/models/smollm2`
    python examples/trl_switch.py --tiny            # a tiny offline model, in seconds (what CI runs)

Everything else is TRL's API: a transformers model and TrainingArguments, the model's own
``generate`` for sampling, ``trainer.step(texts=..., texts_labels=...)``, ``trainer.save_model``.
The code between the README markers is the README's "Quick start: the TRL facade", verbatim.
"""

from __future__ import annotations

import argparse
import json
import tempfile

# README:begin
import re

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from compat import IterativeSFTTrainer  # was: from trl import IterativeSFTTrainer


def verify(reply: str, answer: str) -> bool:
    numbers = re.findall(r"-?\d+", reply)
    return bool(numbers) and numbers[-1] == answer


def expert_iteration_trl(model_dir, problems, output_dir, *, rounds=3, samples=4, learning_rate=3e-5):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # for batched generate
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = TrainingArguments(output_dir=output_dir, learning_rate=learning_rate, lr_scheduler_type="constant",
                             per_device_train_batch_size=8, logging_steps=1, report_to=[])
    trainer = IterativeSFTTrainer(model=model, args=args, processing_class=tokenizer)

    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=False) for q, _ in problems]
    history = []
    for round_number in range(1, rounds + 1):
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():  # the user's own torch model: it holds the trained weights
            out = model.generate(**inputs, do_sample=True, temperature=0.8, max_new_tokens=16,
                                 num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id)
        replies = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        kept = [(prompts[i // samples], r) for i, r in enumerate(replies) if verify(r, problems[i // samples][1])]
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        stats = {"num_updates": 0, "loss": 0.0}
        if kept:  # TRL's step() raises on no examples; the facade keeps that
            stats = trainer.step(texts=[p for p, _ in kept], texts_labels=[r for _, r in kept])
        changed = sum(not torch.equal(p, before[name]) for name, p in model.named_parameters())
        history.append({"round": round_number, "kept": len(kept), "sampled": len(replies),
                        "updates": stats["num_updates"], "loss": stats["loss"], "changed_parameters": changed})
        print(f"round {round_number}: kept {len(kept)}/{len(replies)}, loss {stats['loss']:.3f}, "
              f"{changed} of {len(before)} parameter tensors changed")
    trainer.save_model(output_dir)  # a Hugging Face folder, as TRL writes it
    return history
# README:end


def main() -> None:
    from jaxsft.testing import addition_problems, tiny_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a local Hugging Face folder (e.g. from `python -m jaxsft export DIR`)")
    parser.add_argument("--tiny", action="store_true", help="build a tiny model offline and run on it (seconds)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-dir", help="where trainer.save_model writes (default with --tiny: a temporary "
                                             "folder, removed at the end)")
    parser.add_argument("--summary", help="write the per-round stats here as JSON")
    args = parser.parse_args()
    if args.tiny == bool(args.model):
        parser.error("pass --model DIR or --tiny")
    if args.model and not args.output_dir:
        parser.error("pass --output-dir DIR: where the trained model goes")
    with tempfile.TemporaryDirectory(prefix="jaxsft-tiny-") as scratch:  # removed at the end, also on errors
        output_dir = args.output_dir or f"{scratch}/trained"
        if args.tiny:
            history = expert_iteration_trl(tiny_model(f"{scratch}/model"), addition_problems(16, seed=1), output_dir,
                                           rounds=args.rounds, learning_rate=2e-4)
        else:
            history = expert_iteration_trl(args.model, addition_problems(16, seed=1, low=10, high=99), output_dir,
                                           rounds=args.rounds)
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(history, f, indent=1)


if __name__ == "__main__":
    main()
