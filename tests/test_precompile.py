"""``IterativeSFTTrainer.precompile``: it compiles what the next ``step()`` with the same inputs runs, and
changes nothing else (weights, optimizer state, RNG, counters), so that step trains exactly as without it."""

from __future__ import annotations

import numpy as np
import pytest

# test_trainer's fixtures (its autouse fast compiles, its tiny Llama) apply here too, imported by name.
from test_trainer import (VOCAB, assert_same_weights, fast_compiles, llama, make_trainer,  # noqa: F401
                          opt_state_leaves, random_ids, weights)


def test_precompiled_step_compiles_nothing_and_trains_as_without(llama):
    rng = np.random.default_rng(3)
    calls = [random_ids(rng, 13, lo=5, hi=60), random_ids(rng, 9, lo=5, hi=20)]  # two buckets in the first call
    plain, ahead = make_trainer(llama, per_device_train_batch_size=4), make_trainer(llama, per_device_train_batch_size=4)
    rng_state, w0, opt0 = ahead._rng.bit_generator.state, weights(ahead), opt_state_leaves(ahead)

    report = ahead.precompile(input_ids=calls[0])
    assert report["new_programs"] == len(report["programs"]) == report["compiled_shapes"] > 1
    assert report["compile_seconds"] > 0
    # nothing but the program cache changed
    assert ahead._rng.bit_generator.state == rng_state and ahead.state.global_step == 0
    assert_same_weights(weights(ahead), w0)
    assert all(np.array_equal(a, b) for a, b in zip(opt0, opt_state_leaves(ahead)))
    again = ahead.precompile(input_ids=calls[0])
    assert again["new_programs"] == 0 and again["compile_seconds"] == 0.0 and again["programs"] == report["programs"]

    for call in calls:
        want, got = plain.step(input_ids=call), ahead.step(input_ids=call)
        assert got["loss"] == want["loss"] and got["update_losses"] == want["update_losses"]  # the same shuffle, the same updates
        if call is calls[0]:
            assert got["compile_seconds"] == 0.0 and got["compiled_shapes"] == report["compiled_shapes"]
    assert_same_weights(weights(ahead), weights(plain))
    ahead.reset()  # the starting weights were kept by precompile(), before any update
    assert_same_weights(weights(ahead), w0)


def test_precompile_one_at_a_time_times_each_program(llama):
    trainer = make_trainer(llama, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    report = trainer.precompile(input_ids=random_ids(np.random.default_rng(4), 8, lo=5, hi=14), side_by_side=False)
    layouts = [layout for layout, _, _ in report["each"]]
    assert layouts == report["programs"] and {"zeros", "apply"} <= set(layouts)
    assert any(layout.startswith("accumulate 4x") for layout in layouts)
    assert all(lower_s > 0 and compile_s > 0 for _, lower_s, compile_s in report["each"])


def test_precompile_rejects_what_step_rejects_before_compiling(llama):
    trainer = make_trainer(llama)
    bad = [np.array([3, 4, VOCAB + 5])]
    with pytest.raises(ValueError) as from_step:
        trainer.step(input_ids=bad)
    with pytest.raises(ValueError) as from_precompile:
        trainer.precompile(input_ids=bad)
    assert str(from_precompile.value) == str(from_step.value)
    assert trainer.compiled_shapes == 0


def test_a_plan_may_follow_the_gpus_longer_packed_rows(llama):
    """``longer_packed_rows`` is the planning rule of cuDNN's ragged attention (packed rows may outgrow the longest
    example's bucket); it is public so that a host-side measurement plans as a GPU would. Off on CPU; on, the same
    call packs into fewer, longer rows."""
    rng = np.random.default_rng(5)
    examples = [rng.integers(3, VOCAB, size=n) for n in (60, 50, 40, 30, 20, 10, 5, 3)]  # one update of 8
    cpu_rule = make_trainer(llama, per_device_train_batch_size=8, packing=True, max_length=256)
    gpu_rule = make_trainer(llama, per_device_train_batch_size=8, packing=True, max_length=256)
    assert cpu_rule.packing and not cpu_rule.longer_packed_rows
    gpu_rule.longer_packed_rows = True
    on_cpu, as_gpu = cpu_rule.precompile(input_ids=examples), gpu_rule.precompile(input_ids=examples)
    (cpu_rows, cpu_length), (gpu_rows, gpu_length) = (
        tuple(map(int, report["programs"][0].split()[1].split("x"))) for report in (on_cpu, as_gpu))  # "fused RxL packed"
    assert len(on_cpu["programs"]) == len(as_gpu["programs"]) == 1
    assert gpu_rows < cpu_rows and gpu_length > cpu_length, (on_cpu["programs"], as_gpu["programs"])
    assert cpu_rule.step(input_ids=examples)["compile_seconds"] == 0.0  # each plan is what its own step() runs
    assert gpu_rule.step(input_ids=examples)["compile_seconds"] == 0.0
