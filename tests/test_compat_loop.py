"""The facade in a TRL user's loop: the usual before/after parameter check on the user's own torch model."""

from __future__ import annotations

import copy

import numpy as np
import torch
from transformers import TrainingArguments

import jaxsft
from compat import IterativeSFTTrainer

import tiny


def test_users_own_model_shows_the_update(tmp_path):
    tokenizer = tiny.load_tokenizer(tiny.tokenizer_dir(str(tmp_path)))
    model = tiny.tiny_torch_model("llama", seed=4)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], disable_tqdm=True, learning_rate=1e-2,
                             max_steps=10, per_device_train_batch_size=4, logging_steps=1)
    trainer = IterativeSFTTrainer(model, args, tokenizer, max_length=32, mesh=jaxsft.single_device_mesh())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    held = model.lm_head.weight  # a tensor reached as an attribute before step()
    held_before = held.detach().clone()

    trainer.step(input_ids=[torch.tensor([5, 6, 7, 8, 9]), torch.tensor([10, 11, 12])])

    # TRL's own check, on the user's model (not trainer.model): every parameter changed.
    changed = {n: not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()}
    assert all(changed.values()), [n for n, c in changed.items() if not c]
    # parameters() and state_dict() read the trained weights as well, and they equal the JAX weights.
    jax_weights = trainer.jax_model
    from jaxsft.models.hf_io import hf_state_dict

    ours = hf_state_dict(jax_weights)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), ours[name])
    assert not all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), before.values()))

    # An attribute tensor is the same object, updated in place; after another step it is current once synced.
    assert held is model.lm_head.weight and not torch.equal(held.detach(), held_before)
    trainer.step(input_ids=[torch.tensor([5, 6, 7, 8])])
    assert trainer.sync_model() is model
    np.testing.assert_array_equal(held.detach().numpy(), hf_state_dict(trainer.jax_model)["lm_head.weight"])

    # A deepcopy is a plain model: its parameter listing does not reach back into the trainer.
    clone = copy.deepcopy(model)
    trainer.step(input_ids=[torch.tensor([7, 8, 9])])
    clone_weights = {n: p.detach().clone() for n, p in clone.named_parameters()}
    assert all(torch.equal(p.detach(), clone_weights[n]) for n, p in clone.named_parameters())
    assert not torch.equal(dict(clone.named_parameters())["lm_head.weight"], dict(model.named_parameters())["lm_head.weight"])
