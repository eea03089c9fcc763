"""TrainConfig: flat keywords route into the three groups (one value, two names), and the
trainer's training view is derived from the config without changing the caller's model."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsft
from jaxsft.infra.config import Optimization, Performance, PrecisionAndMemory, TrainConfig
from jaxsft.models.options import RunOptions, with_options

import tiny


def test_flat_keywords_land_in_their_group():
    config = TrainConfig(learning_rate=1e-3, bf16=True, scan_layers=False, seed=3, max_steps=7)
    assert config.optimization.learning_rate == config.learning_rate == 1e-3
    assert config.optimization.max_steps == 7
    assert config.precision.bf16 is True and config.performance.scan_layers is False
    assert config.seed == 3
    config.learning_rate = 2e-3  # a flat write reaches the group: one value, not a copy
    assert config.optimization.learning_rate == 2e-3
    assert {f.name for f in dataclasses.fields(config)} >= {"optimization", "precision", "performance"}


def test_groups_and_keywords_combine_and_replace_keeps_working():
    config = TrainConfig(optimization=Optimization(learning_rate=1e-4, warmup_steps=3), learning_rate=5e-4)
    assert config.learning_rate == 5e-4 and config.warmup_steps == 3  # keywords apply on top of the group
    changed = dataclasses.replace(config, disable_tqdm=True, weight_decay=0.1)
    assert changed.weight_decay == 0.1 and changed.warmup_steps == 3 and changed.disable_tqdm
    assert config.weight_decay == 0.0  # the original is untouched (groups are copied, not shared)
    assert TrainConfig(precision=PrecisionAndMemory(bf16=True)).bf16 is True
    assert TrainConfig(performance=Performance(min_bucket_length=8)).buckets(32) == (8, 12, 16, 24, 32)


def test_bad_values_name_the_field():
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['lr'\]"):
        TrainConfig(lr=1e-3)
    with pytest.raises(ValueError, match=r"TrainConfig\.learning_rate=-1"):
        TrainConfig(learning_rate=-1)
    with pytest.raises(ValueError, match=r"TrainConfig\.attention_implementation='flash'"):
        TrainConfig(attention_implementation="flash")
    with pytest.raises(TypeError, match=r"TrainConfig\.precision must be a jaxsft\.PrecisionAndMemory"):
        TrainConfig(precision=Optimization())


def test_run_options_one_rule_per_knob():
    base = RunOptions(dtype=jnp.float32, remat=True, attention_implementation="xla")
    assert TrainConfig().run_options(base) == RunOptions(
        dtype=jnp.float32, remat=False, attention_implementation="xla", scan_layers=False, dropout=True  # HF trains with its dropout
    )
    got = TrainConfig(bf16=True, gradient_checkpointing=True, attention_implementation="cudnn", dropout=False).run_options(
        base, num_layers=2
    )
    assert got == RunOptions(dtype=jnp.bfloat16, remat=True, attention_implementation="cudnn", scan_layers=False)


@pytest.mark.slow
def test_training_view_is_derived_not_patched():
    model = jaxsft.from_pretrained(tiny.tiny_torch_model("llama"), mesh=jaxsft.single_device_mesh())
    view = with_options(model, RunOptions(dtype=jnp.bfloat16, remat=True, scan_layers=False))
    assert (view.dtype, view.remat, view.scan_layers) == (jnp.bfloat16, True, False)
    assert (model.dtype, model.remat, model.scan_layers) == (jnp.float32, False, True)  # caller's model unchanged
    same = [a is b for a, b in zip(jax_leaves(view), jax_leaves(model))]
    assert same and all(same)  # the view holds the model's own arrays, no copy
    ids = np.array([[3, 4, 5, 6]], np.int32)
    np.testing.assert_allclose(np.asarray(view(ids)), np.asarray(model(ids)), atol=0.1)  # bf16 vs fp32, same weights

    trainer = jaxsft.IterativeSFTTrainer(model, TrainConfig(gradient_checkpointing=True, max_length=16, lr_scheduler_type="constant"))
    assert trainer.model.remat and not model.remat
    assert trainer.run_options == RunOptions(remat=True, scan_layers=False, dropout=True)  # shallow: unrolled


def jax_leaves(model):
    import jax

    return jax.tree.leaves(nnx.state(model))


def test_the_gpu_tier_command_line_keeps_the_cpu_defaults_out():
    """conftest's rule: only a ``-m`` expression that selects ``gpu`` (not one that excludes it) lifts the CPU pin,
    so ``pytest -m gpu`` on a GPU machine runs the tier instead of aborting on XLA:CPU flags."""
    from conftest import gpu_tier_selected

    assert gpu_tier_selected(["pytest", "-m", "gpu", "-q"])
    assert gpu_tier_selected(["pytest", "-mgpu"])
    assert gpu_tier_selected(["pytest", "-q", "-m", "gpu and not slow", "tests/test_gpu_tier.py"])
    assert not gpu_tier_selected(["pytest", "-m", "not gpu"])
    assert not gpu_tier_selected(["pytest", "-m", "slow"])
    assert not gpu_tier_selected(["pytest", "-q", "-n", "2"])
    assert not gpu_tier_selected(["pytest", "-k", "gpu"])  # a -k filter is not the tier
