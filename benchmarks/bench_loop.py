"""One generate -> filter -> train round, timed end to end: jaxsft against TRL 0.23.1 + transformers.generate.

A round: P prompts (random ids, PROMPT tokens) x N samples at temperature 1; a fixed filter keeps
every K-th sample; one ``trainer.step()`` on the kept prompt+completion sequences (completion-only
labels, micro-batch 8). Both sides start from the same random-initialised model (torch, seed 0).

* ``--impl jaxsft``: ``jaxsft.IterativeSFTTrainer``, ``trainer.generate`` on the training weights.
* ``--impl trl``: TRL 0.23.1's ``IterativeSFTTrainer.step`` and ``model.generate`` on the training model
  under bf16 autocast (the strongest plain-transformers setting).
* ``--impl compat``: the TRL script with one line changed: ``compat.IterativeSFTTrainer`` and
  ``trainer.generate(input_ids=..., ...)`` in place of ``model.generate``.

Workloads: fixed (exactly NEW new tokens, EOS off on both sides) or ``--ragged SCALE`` (EOS on, its
embedding row scaled as in ``gen_common.make_ragged``, up to NEW tokens). Round 0 warms up
(compiles); the figures are medians of the timed rounds. Prints ``RESULT {json}``.

    python benchmarks/bench_loop.py --impl jaxsft --shape qwen05 [--ragged 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_speed import drop_named_cache  # noqa: E402  (stdlib imports only)

drop_named_cache(os.environ)  # first steps are timed cold; before jax (imported below) reads it

import numpy as np

from gen_common import EOS_ID, SHAPES, IdTokenizer, build_torch_model, make_ragged


def prompts_for(round_: int, a, vocab: int) -> np.ndarray:
    return np.random.default_rng(1000 + round_).integers(3, min(vocab, 8192), size=(a.prompts, a.prompt_len))


def completion(tokens: np.ndarray, ragged: bool) -> np.ndarray:
    """A generated row up to and including its first EOS (the whole row when EOS is off or absent)."""
    tokens = np.asarray(tokens)
    if ragged:
        hit = np.flatnonzero(tokens == EOS_ID)
        if hit.size:
            return tokens[: hit[0] + 1]
    return tokens


def kept(prompt_ids: np.ndarray, completions, a):
    """The filter: every K-th sample. Returns (input_ids, labels) lists."""
    ids, labels = [], []
    for j, comp in enumerate(completions):
        if j % a.keep_every:
            continue
        p = prompt_ids[j // a.samples]
        seq = np.concatenate([p, np.asarray(comp, np.int64)])
        lab = seq.copy()
        lab[: len(p)] = -100
        ids.append(seq)
        labels.append(lab)
    return ids, labels


def torch_model_for(a):
    tm = build_torch_model(a.shape)
    if a.ragged is not None:
        make_ragged(tm, a.ragged)
    return tm


def run_jaxsft(a):
    import jax
    from flax import nnx

    import jaxsft

    model = jaxsft.from_pretrained(torch_model_for(a))
    tc = jaxsft.TrainConfig(learning_rate=1e-5, lr_scheduler_type="constant", per_device_train_batch_size=8,
                            max_length=a.max_length or a.prompt_len + a.new, bf16=jax.default_backend() != "cpu", logging_steps=0,
                            disable_tqdm=True, dropout=False,
                            compilation_cache=False)  # compile times as on a fresh machine
    trainer = jaxsft.IterativeSFTTrainer(model, tc, IdTokenizer())
    eos = [EOS_ID] if a.ragged is not None else []
    log = []
    for rnd in range(a.rounds + 1):
        P = prompts_for(rnd, a, SHAPES[a.shape]["vocab_size"])
        texts = [" ".join(map(str, row)) for row in P]
        t0 = time.perf_counter()
        res = trainer.generate(texts, max_new_tokens=a.new, temperature=1.0, num_return_sequences=a.samples,
                               eos_token_ids=eos, return_tokens=True)
        t1 = time.perf_counter()
        comps = [completion(t, a.ragged is not None) for t in res.tokens]
        ids, labels = kept(P, comps, a)
        trainer.step(input_ids=ids, labels=labels)
        jax.block_until_ready(jax.tree.leaves(nnx.state(trainer.model))[0])
        t2 = time.perf_counter()
        log.append((t1 - t0, t2 - t1, len(ids), sum(len(c) for c in comps)))
        print(f"round {rnd}: generate {t1 - t0:.2f}s train {t2 - t1:.2f}s kept {len(ids)}", flush=True)
    return log[1:], jax.devices()[0].device_kind


def trl_trainer(a, model, compat: bool):
    """TRL's (or compat's) IterativeSFTTrainer with TRL's defaults pinned as a TRL user would set them."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(64)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="0")), pad_token="0",
                                  eos_token=str(EOS_ID))
    if compat:
        import compat as trl
    else:
        import trl
    cuda = model.device.type == "cuda"
    args = trl.IterativeSFTConfig(per_device_train_batch_size=8, learning_rate=1e-5, logging_steps=1000, report_to=[],
                                  output_dir="/tmp/bench_loop", save_strategy="no", bf16=cuda, use_cpu=not cuda,
                                  gradient_checkpointing=False, max_length=a.max_length or a.prompt_len + a.new)
    return trl.IterativeSFTTrainer(model=model, args=args, processing_class=tok)


def run_torch_side(a, compat: bool):
    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = torch_model_for(a).to(dev)
    model.config.eos_token_id = EOS_ID if a.ragged is not None else None
    trainer = trl_trainer(a, model, compat)
    ragged = a.ragged is not None
    kw = dict(do_sample=True, temperature=1.0, top_k=0, max_new_tokens=a.new, num_return_sequences=a.samples,
              pad_token_id=0)
    kw.update(eos_token_id=EOS_ID) if ragged else kw.update(eos_token_id=None, min_new_tokens=a.new)
    log = []
    for rnd in range(a.rounds + 1):
        P = prompts_for(rnd, a, SHAPES[a.shape]["vocab_size"])
        x = torch.as_tensor(P, device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if compat:  # the one changed line: trainer.generate in place of model.generate
            gen_kw = dict(kw)
            gen_kw.pop("min_new_tokens", None)
            out = trainer.generate(input_ids=x, attention_mask=torch.ones_like(x), **gen_kw)
        else:
            model.eval()
            model.config.use_cache = True
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
            model.train()
            model.config.use_cache = False
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        comps = [completion(r, ragged) for r in out[:, a.prompt_len:].cpu().numpy()]
        comps = [c[c != 0] if ragged else c for c in comps]  # HF pads finished rows with pad_token_id
        ids, labels = kept(P, comps, a)
        trainer.step(input_ids=[torch.as_tensor(i) for i in ids],
                     attention_mask=[torch.ones(len(i), dtype=torch.long) for i in ids],
                     labels=[torch.as_tensor(l) for l in labels])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        log.append((t1 - t0, t2 - t1, len(ids), sum(len(c) for c in comps)))
        print(f"round {rnd}: generate {t1 - t0:.2f}s train {t2 - t1:.2f}s kept {len(ids)}", flush=True)
    return log[1:], (torch.cuda.get_device_name() if dev.type == "cuda" else "cpu")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=["jaxsft", "trl", "compat"], required=True)
    p.add_argument("--shape", default="qwen05", choices=sorted(SHAPES))
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--keep-every", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ragged", type=float, default=None)
    p.add_argument("--max-length", type=int, default=None,
                   help="both trainers' max_length (default prompt-len + new: no sequence is padded past its length)")
    a = p.parse_args()
    log, dev = run_jaxsft(a) if a.impl == "jaxsft" else run_torch_side(a, a.impl == "compat")
    gen = statistics.median(r[0] for r in log)
    train = statistics.median(r[1] for r in log)
    new_tokens = statistics.median(r[3] for r in log)
    print("RESULT " + json.dumps(dict(
        impl=a.impl, shape=a.shape, device=dev, ragged=a.ragged, prompts=a.prompts, samples=a.samples,
        prompt_len=a.prompt_len, new=a.new, kept=statistics.median(r[2] for r in log), round_s=round(gen + train, 3),
        generate_s=round(gen, 3), train_s=round(train, 3), gen_share=round(gen / (gen + train), 3),
        new_tokens=new_tokens, gen_tok_s=round(new_tokens / gen), rounds=a.rounds, max_length=a.max_length,
        each_round_s=[round(r[0] + r[1], 3) for r in log])), flush=True)  # TRL's rounds vary: judge a ratio over them


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
