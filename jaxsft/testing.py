"""A tiny instruct model built offline in seconds, without torch: for quick starts, examples and tests.

:func:`tiny_model` writes a Hugging Face folder shaped like a small chat model (SmolLM2's ChatML
template whose end of turn is EOS, a byte-level BPE tokenizer trained here on the task's text, a
2-layer Llama) and teaches it single-digit addition briefly, on half the problems, so it answers
some right and some wrong, as a small instruct model does: a verifier then keeps some samples.
Everything that loads a real folder loads this one (``jaxsft.from_pretrained``, transformers).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Union

__all__ = ["addition_problems", "tiny_model", "CHAT_TEMPLATE"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def addition_problems(n: int, seed: int, low: int = 0, high: int = 9) -> list[tuple[str, str]]:
    """``n`` (question, answer) pairs of a + b: "What is 3 + 4? Reply with just the number." -> "7"."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(low, high), rng.randint(low, high)
        out.append((f"What is {a} + {b}? Reply with just the number.", str(a + b)))
    return out


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    every = [(f"What is {a} + {b}? Reply with just the number.", str(a + b)) for a in range(10) for b in range(10)]
    words = "user assistant system You are a concise assistant. The answer is".split()
    corpus = [q + " " + a for q, a in every] + [" ".join(words)] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=384, min_frequency=1, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer, every


def tiny_model(folder: Union[str, Path], *, seed: int = 0, teach_updates: int = 150) -> str:
    """Write the tiny model and its tokenizer to ``folder`` (created); returns the folder as a string.

    ``teach_updates``: full-batch updates on half of the 100 single-digit sums (0 leaves it random).
    A folder that already holds the tiny model of these arguments is returned as it is (the build is
    deterministic), so scripts and README snippets can call this every time.
    """
    import json

    import numpy as np
    from transformers import LlamaConfig

    import jaxsft
    from jaxsft.infra.config import IGNORE_INDEX
    from jaxsft.models import spec_from_hf_config

    folder = Path(folder)
    marker, recipe = folder / "jaxsft-tiny-model.json", {"seed": seed, "teach_updates": teach_updates, "version": 1}
    if marker.is_file() and json.loads(marker.read_text()) == recipe and (folder / "model.safetensors").is_file():
        return str(folder)
    tokenizer, every = _tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    mesh = jaxsft.single_device_mesh()
    model = jaxsft.init_model(spec_from_hf_config(config), seed=seed, mesh=mesh,
                              hf_config_json=config.to_json_string())
    if teach_updates:
        taught = random.Random(seed).sample(every, len(every) // 2)
        ids, labels = [], []
        for question, answer in taught:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                   add_generation_prompt=True, tokenize=False)
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            c = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids.append(np.asarray(p + c))
            labels.append(np.asarray([IGNORE_INDEX] * len(p) + c))
        train = jaxsft.TrainConfig(learning_rate=3e-3, lr_scheduler_type="constant",
                                   per_device_train_batch_size=len(ids), max_length=32, length_buckets=(32,),
                                   logging_steps=0, disable_tqdm=True, seed=seed, dropout=False)
        trainer = jaxsft.IterativeSFTTrainer(model, train, tokenizer, mesh=mesh)
        for _ in range(teach_updates):
            trainer.step(input_ids=ids, labels=labels)
        model = trainer.model
    jaxsft.save_pretrained(model, folder, tokenizer=tokenizer)
    marker.write_text(json.dumps(recipe))
    return str(folder)
