#!/usr/bin/env python3
"""What the TRL-compatible facade costs on top of the JAX core: input conversion and torch weight sync.

Two trainers start from the same small torch model with the same config: ``jaxsft.IterativeSFTTrainer``
fed numpy arrays, and ``compat.IterativeSFTTrainer`` fed the same examples as lists of torch tensors.
After compiling, they alternate ``step()`` calls; after each compat step ``trainer.model`` is read, which
copies the new JAX weights into the torch model (the worst case: a user who generates with the torch
model after every step). Reported per call (medians):

* core step: ``core.step(numpy)``
* compat step: ``compat.step(torch)`` (conversion + validation + the same core step + HF state/callbacks)
* conversion alone: ``compat.inputs.convert_step_inputs(torch)``
* sync: reading ``trainer.model`` after an update (device -> host fetch + HF layout + in-place copy)

and each as a percentage of the core step. The facade's promise is (compat - core + sync) < 5% of a step.

    python benchmarks/bench_compat_overhead.py                  # CPU-sized default model
    python benchmarks/bench_compat_overhead.py --hidden 512 --layers 8 --seq 256 --batch 16
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time
import warnings


def build_model(args):
    import torch
    import transformers as tf

    config = tf.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=max(2048, args.seq), tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).eval()


def check_sync(facade) -> None:
    """The synced torch weights are exactly the JAX weights (as hf_state_dict lays them out)."""
    import numpy as np

    from jaxsft.models.hf_io import hf_state_dict

    want = hf_state_dict(facade.jax_model)
    for name, param in facade.model.named_parameters():
        got = param.detach().float().cpu().numpy()
        if not np.array_equal(got, np.asarray(want[name], dtype=got.dtype)):
            raise AssertionError(f"torch weight {name} differs from the JAX weights after sync")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256, help="tokens per example")
    parser.add_argument("--batch", type=int, default=8, help="examples per step() call (= micro-batch size)")
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--torch-device", default="cpu", help="where the torch model lives (cpu or cuda)")
    args = parser.parse_args()

    import jax
    import numpy as np
    import torch
    from transformers import TrainingArguments

    import jaxsft
    from compat import IterativeSFTTrainer
    from compat.inputs import convert_step_inputs

    torch_model = build_model(args).to(args.torch_device)
    n_params = sum(p.numel() for p in torch_model.parameters())
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, report_to=[], disable_tqdm=True, learning_rate=1e-4, max_steps=10_000, logging_steps=10,
            per_device_train_batch_size=args.batch, max_grad_norm=1.0, use_cpu=args.torch_device == "cpu",
        )
        facade = IterativeSFTTrainer(torch_model, targs, max_length=args.seq)
        core_model = jaxsft.from_pretrained(copy.deepcopy(torch_model).cpu())
        core = jaxsft.IterativeSFTTrainer(core_model, dataclasses.replace(facade.core.config))

        rng = np.random.default_rng(0)
        calls = []
        for _ in range(args.warmup + args.iters):
            rows = rng.integers(3, args.vocab, size=(args.batch, args.seq), dtype=np.int64)
            calls.append(([torch.from_numpy(r.copy()) for r in rows], [r.astype(np.int32) for r in rows]))

        core_t, compat_t, convert_t, sync_t = [], [], [], []
        for i, (torch_rows, numpy_rows) in enumerate(calls):
            # alternate who goes first, so drifting machine load does not favour one side
            for who in (("core", "compat") if i % 2 else ("compat", "core")):
                t0 = time.perf_counter()
                if who == "core":
                    core.step(input_ids=numpy_rows)
                else:
                    facade.step(input_ids=torch_rows)
                    t1 = time.perf_counter()
                    facade.model  # sync the torch weights (an update happened)
                    t_sync = time.perf_counter() - t1
                elapsed = (t1 if who == "compat" else time.perf_counter()) - t0
                (compat_t if who == "compat" else core_t).append(elapsed)
            t3 = time.perf_counter()
            convert_step_inputs(input_ids=torch_rows)
            convert_t.append(time.perf_counter() - t3)
            sync_t.append(t_sync)
        core_t, compat_t, convert_t, sync_t = (x[args.warmup:] for x in (core_t, compat_t, convert_t, sync_t))

        check_sync(facade)

    med = {k: statistics.median(v) for k, v in
           (("core", core_t), ("compat", compat_t), ("convert", convert_t), ("sync", sync_t))}
    base = med["core"]
    facade_overhead = statistics.median(c - k for c, k in zip(compat_t, core_t))  # paired, per call
    rows = [
        ("core step (numpy inputs)", base),
        ("compat step (torch inputs)", med["compat"]),
        ("  facade overhead (median of compat - core)", facade_overhead),
        ("  input conversion alone", med["convert"]),
        ("torch weight sync (trainer.model)", med["sync"]),
        ("facade total (overhead + sync)", facade_overhead + med["sync"]),
    ]
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}) x{jax.device_count()}; model: Llama "
          f"{args.layers}x{args.hidden}, vocab {args.vocab}, {n_params / 1e6:.1f}M params; "
          f"step(): {args.batch} x {args.seq} tokens, 1 update; {args.iters} timed calls (medians)")
    print(f"{'':40s} {'ms':>9s} {'% of core step':>15s}")
    for name, seconds in rows:
        print(f"{name:40s} {seconds * 1e3:9.3f} {100 * seconds / base:14.2f}%")
    weight_bytes = sum(p.numel() * p.element_size() for p in torch_model.parameters())
    print(f"  sync moves {weight_bytes / 1e6:.0f} MB: {weight_bytes / med['sync'] / 1e9:.2f} GB/s "
          f"(torch model on {args.torch_device}; synced weights checked equal to the JAX weights)")
    total = 100 * (facade_overhead + med["sync"]) / base
    print(f"\nfacade cost: {total:.2f}% of a core step ({'under' if total < 5 else 'OVER'} the 5% budget)")


if __name__ == "__main__":
    main()
