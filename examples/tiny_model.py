"""A tiny stand-in for SmolLM2-Instruct, built offline in seconds: what the examples' ``--tiny`` flag runs on.

It writes a Hugging Face folder like the real one: a byte-level BPE tokenizer trained here on
the task's text, a ChatML chat template whose end of turn is the EOS token (as SmolLM2's),
and a 2-layer Llama. A random model never answers correctly, so the verifier would keep
nothing; the model is first taught the task briefly with plain torch (a few hundred updates
on half the problems), which leaves it right on some problems and wrong on others, like a
small instruct model. The examples then load this folder exactly as they load a real one.
"""

from __future__ import annotations

import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def addition_problems(n: int, seed: int, low: int = 0, high: int = 9) -> list[tuple[str, str]]:
    """``n`` (question, answer) pairs of a + b, the examples' task."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(low, high), rng.randint(low, high)
        out.append((f"What is {a} + {b}? Reply with just the number.", str(a + b)))
    return out


def build(folder: str, *, seed: int = 0, warmup_updates: int = 150) -> str:
    """Write the tiny model and tokenizer to ``folder``; returns it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = str(Path(folder))
    every = [(f"What is {a} + {b}? Reply with just the number.", str(a + b)) for a in range(10) for b in range(10)]
    system_words = "user assistant system You are a concise assistant. The answer is".split()
    corpus = [q + " " + a for q, a in every] + [" ".join(system_words)] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=384, min_frequency=1, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _teach(model, tokenizer, random.Random(seed).sample(every, len(every) // 2), warmup_updates)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _teach(model, tokenizer, problems: list[tuple[str, str]], updates: int) -> None:
    """Completion-only next-token training on ``problems`` (plain torch, so the examples' code is not its own teacher)."""
    import torch

    rows = []
    for question, answer in problems:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=False)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p + c, [-100] * len(p) + c))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    model.train()
    for _ in range(updates):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    torch.set_num_threads(threads)
