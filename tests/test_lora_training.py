"""LoRA training against a hand-written torch + peft loop, plus what the trainer must hold for adapters.

The reference loop is written from the documented semantics (as tests/test_trainer_parity.py's
full-weight loop is): the same PeftModel start, the same per-call shuffle
(``np.random.default_rng(seed).permutation(n)``), micro-batches, gradient accumulation (a call's
leftover micro-batches make a short update), update loss = token-loss sum / label tokens, torch
AdamW over the trainable (adapter) parameters with HF's decay groups, ``clip_grad_norm_`` and a
linear schedule with warmup. fp32 on CPU. Tolerances: per-update losses rtol 1e-5; each adapter
tensor ``||jax - torch|| <= 1e-5 ||W||`` (observed ~1e-7 .. 1e-6).
"""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, get_scheduler

import jaxsft
from jaxsft.models import lora as lora_lib
from jaxsft.models import peft_io

import tiny

peft = pytest.importorskip("peft")

SEED = 99
LR, WD, WARMUP, CLIP, MAX_STEPS = 5e-3, 0.01, 2, 1.0, 30


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    """As tests/test_trainer_parity.py: skip LLVM backend optimisation passes (HLO semantics unchanged)."""
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def _calls(vocab: int, counts: list[int], seed: int):
    """Per call: (examples, step kwargs). Lengths 17..32 keep every micro-batch in one bucket (one compile)."""
    rng = np.random.default_rng(seed)
    calls = []
    for n in counts:
        examples = []
        for _ in range(n):
            ids = rng.integers(3, vocab, size=int(rng.integers(17, 33))).astype(np.int64)
            labels = ids.copy()
            labels[: int(rng.integers(0, 8))] = -100
            examples.append((ids, labels))
        calls.append((examples, dict(input_ids=[e[0] for e in examples], labels=[e[1] for e in examples])))
    return calls


def _peft_model(family: str, targets, use_rslora: bool):
    torch.manual_seed(5)
    base = tiny.tiny_torch_model(family, seed=3)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets), use_rslora=use_rslora,
        init_lora_weights=False, task_type="CAUSAL_LM",  # B random too, so A's gradient is non-zero from update 1
    )
    return peft.get_peft_model(base, config).eval()


def torch_peft_reference(peft_model, calls, *, bs: int, ga: int):
    model = copy.deepcopy(peft_model)
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": WD},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8)
    sched = get_scheduler("linear", opt, num_warmup_steps=WARMUP, num_training_steps=MAX_STEPS)
    rng = np.random.default_rng(SEED)
    losses = []
    for examples, _ in calls:
        order = rng.permutation(len(examples))
        ordered = [examples[int(i)] for i in order]
        micro = [ordered[i : i + bs] for i in range(0, len(ordered), bs)]
        for u in range(0, len(micro), ga):
            update = [e for mb in micro[u : u + ga] for e in mb]
            total = sum(int((lab[1:] != -100).sum()) for _, lab in update)
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for ids, lab in update:
                logits = model(input_ids=torch.as_tensor(ids)[None]).logits[0]
                ce = F.cross_entropy(logits[:-1], torch.as_tensor(lab[1:]), ignore_index=-100, reduction="sum")
                (ce / total).backward()
                loss_sum += ce.item()
            torch.nn.utils.clip_grad_norm_([p for _, p in named], CLIP)
            opt.step()
            sched.step()
            losses.append(loss_sum / total)
    adapters = {k: v.detach().numpy() for k, v in peft.get_peft_model_state_dict(model).items()}
    return losses, adapters


# (family, GA, per-device batch, examples per call, targets, rsLoRA)
# GA=1: 6+5+4 micro-batches = 15 updates. GA=3: (3+3)+(3+2)+(3+1) = 6 updates, two of them short.
CASES = [
    ("llama", 1, 2, [12, 10, 8], "all-linear", False),
    ("llama", 3, 2, [12, 10, 8], "all-linear", False),
    ("qwen2", 1, 2, [12, 10, 8], ("q_proj", "v_proj", "o_proj", "up_proj"), True),
    ("qwen2", 3, 2, [12, 10, 8], ("q_proj", "v_proj", "o_proj", "up_proj"), True),
]


@pytest.mark.parametrize("family,ga,bs,counts,targets,rslora", CASES, ids=[f"{c[0]}-ga{c[1]}" for c in CASES])
def test_matches_torch_peft_loop(family, ga, bs, counts, targets, rslora):
    peft_model = _peft_model(family, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
                             if targets == "all-linear" else targets, rslora)
    calls = _calls(peft_model.config.vocab_size, counts, seed=ga)
    start = {k: v.detach().numpy().copy() for k, v in peft.get_peft_model_state_dict(peft_model).items()}

    model = jaxsft.from_pretrained(peft_model, mesh=jaxsft.single_device_mesh())
    cfg = jaxsft.TrainConfig(
        learning_rate=LR, weight_decay=WD, warmup_steps=WARMUP, max_steps=MAX_STEPS, lr_scheduler_type="linear",
        max_grad_norm=CLIP, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, seed=SEED,
        max_length=32, disable_tqdm=True,
    )
    trainer = jaxsft.IterativeSFTTrainer(model, cfg)
    base_before = [np.array(x) for x in jax.tree.leaves(trainer.frozen_params)]
    losses = []
    for _, kwargs in calls:
        losses += trainer.step(**kwargs)["update_losses"]
    ref_losses, ref_adapters = torch_peft_reference(peft_model, calls, bs=bs, ga=ga)

    assert len(ref_losses) >= 5 and len(losses) == len(ref_losses)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    got = peft_io.export_adapters(trainer.model)
    assert set(got) == set(ref_adapters)
    for key, want in ref_adapters.items():
        err = np.linalg.norm(got[key] - want)
        assert err <= 1e-5 * np.linalg.norm(want), f"{key}: relative error {err / np.linalg.norm(want):.2e}"
        assert np.abs(want - start[key]).max() > 1e-3, f"{key} did not train"
    base_after = [np.array(x) for x in jax.tree.leaves(trainer.frozen_params)]
    assert len(base_after) == len(base_before) > 0
    for before, after in zip(base_before, base_after):
        np.testing.assert_array_equal(before, after)  # bit-identical


@pytest.mark.slow
def test_only_adapters_train_hold_state_and_are_donated():
    """Base weights: no optimizer state, never donated, bit-identical, bf16 allowed. Adapters: sharded by the rules."""
    import jax.numpy as jnp

    torch_base = tiny.tiny_torch_model("llama")
    mesh = jaxsft.make_mesh(data=2, fsdp=2, tensor=2)
    model = jaxsft.from_pretrained(torch_base, mesh=mesh, param_dtype=jnp.bfloat16, dtype=jnp.float32)
    jaxsft.add_lora(model, jaxsft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    lora_layers = model.lora_layers.arrays()
    assert all(v.dtype == jnp.float32 for v in lora_layers.values())
    # Adapters follow the rules table: A's input dim is the base weight's ("embed" -> fsdp), B's heads -> tensor.
    assert lora_layers["lora_a_q_proj"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert lora_layers["lora_b_q_proj"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
    assert lora_layers["lora_a_down_proj"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)

    cfg = jaxsft.TrainConfig(
        learning_rate=1e-2, per_device_train_batch_size=1, max_length=32, disable_tqdm=True, max_steps=5, bf16=True
    )  # bf16 compute: the trainer's view is rebuilt under other options and must keep the adapters
    trainer = jaxsft.IterativeSFTTrainer(model, cfg, mesh=mesh)
    adapter_sizes = sorted(int(np.prod(v.shape)) for v in lora_layers.values())
    moments = [x for x in jax.tree.leaves(trainer._opt_state) if x.ndim > 0]
    assert sorted(int(np.prod(x.shape)) for x in moments) == sorted(adapter_sizes * 2)  # mu and nu of adapters only
    base = jax.tree.leaves(trainer.frozen_params)
    assert base and all(x.dtype == jnp.bfloat16 for x in base)
    before = [np.array(x) for x in base]
    trainer.step(input_ids=[np.arange(3, 30)] * 4)
    trainer.step(input_ids=[np.arange(5, 25)] * 4)
    assert all(not x.is_deleted() for x in base)  # never donated: the same device buffers are still alive
    assert all(a is b for a, b in zip(base, jax.tree.leaves(trainer.frozen_params)))
    for x, want in zip(base, before):
        np.testing.assert_array_equal(np.array(x), want)
    trained = trainer.model.lora_layers.arrays()
    assert float(jnp.abs(trained["lora_b_q_proj"]).max()) > 0  # B started at 0 and moved
    # The caller's model object sees the trained adapters (as for full weights).
    np.testing.assert_array_equal(np.asarray(model.lora_layers.arrays()["lora_b_q_proj"]), np.asarray(trained["lora_b_q_proj"]))
