"""step(example_weights=...): every label token of example i counts w_i times in the loss and in its normaliser.

Three equalities, each on the losses (1e-5 relative) and on the weights after the call (2e-5 in norm per
tensor, relative): all ones equal no weights; [2, 1] over [a, b] equal [a, a, b]; a zero weight equals
leaving the example out. For a decoder (packed and unpacked) and an encoder-decoder (BART), with gradient
accumulation 1 and 3, on one device and on the 8-device CPU mesh. Each call's examples form one update
(so the pairs compare the same sums); dropout off. SGD, not Adam: Adam's first step is nearly sign(grad),
blind to a gradient scaled by a wrong normaliser. Each case also checks that unweighted duplicates differ
from the weighted run by far more than the tolerance, so the equalities have power.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

import jaxsft
from jaxsft.models.hf_io import hf_state_dict

import tiny
from tiny_seq2seq import tiny_seq2seq_model

VOCAB = 120


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="module")
def torch_models():
    return {
        "llama": tiny.tiny_torch_model("llama", seed=3, vocab_size=VOCAB),
        "bart": tiny_seq2seq_model("bart", seed=3, vocab_size=VOCAB),
    }


# (mesh data axis, per-device rows, gradient accumulation, examples): every call is one update (examples + 1 fit
# rows x accumulation), and with accumulation 3 it spans several micro-batches.
SETUPS = {
    "1dev-ga1": (1, 8, 1, 5),
    "1dev-ga3": (1, 2, 3, 5),
    "8dev-ga1": (8, 1, 1, 5),
    "8dev-ga3": (8, 1, 3, 12),
}
CASES = [("llama", False), ("llama", True), ("bart", False)]


def _examples(family: str, n: int, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(3, VOCAB, int(rng.integers(4, 15)))
        if family == "bart":
            out.append((ids, rng.integers(3, VOCAB, int(rng.integers(2, 10)))))
        else:
            labels = ids.copy()
            labels[: int(rng.integers(0, 3))] = -100  # a prompt part
            out.append((ids, labels))
    return out


def _trainer(torch_models, family: str, packing: bool, setup: str):
    data, per_device, ga, _ = SETUPS[setup]
    mesh = jaxsft.make_mesh(data, 1, 1) if data > 1 else jaxsft.single_device_mesh()
    model = jaxsft.from_pretrained(torch_models[family], mesh=mesh)
    config = jaxsft.TrainConfig(
        optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=None, weight_decay=0.0,
        per_device_train_batch_size=per_device, gradient_accumulation_steps=ga, max_length=32, min_bucket_length=16,
        packing=packing, dropout=False, logging_steps=0, disable_tqdm=True, seed=0,
    )
    return jaxsft.IterativeSFTTrainer(model, config)


def _step(trainer, examples, weights=None):
    ids, labels = [e[0] for e in examples], [e[1] for e in examples]
    return trainer.step(input_ids=ids, labels=labels, example_weights=weights)


def _weights(trainer) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in hf_state_dict(trainer.model).items()}


def _relative_gaps(a: dict, b: dict) -> float:
    return max(float(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(b[k]), 1e-12)) for k in b)


def _assert_same_training(got, want, got_trainer, want_trainer):
    assert got["num_updates"] == want["num_updates"] == 1
    np.testing.assert_allclose(got["update_losses"], want["update_losses"], rtol=1e-5)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    assert _relative_gaps(_weights(got_trainer), _weights(want_trainer)) <= 2e-5


FAST = {("1dev-ga1", "llama", False)}  # the rest of the grid is in the slow tier
GRID = [
    pytest.param(setup, family, packing, id=f"{setup}-{family}{'-packed' if packing else ''}",
                 marks=() if (setup, family, packing) in FAST else pytest.mark.slow)
    for setup in SETUPS for family, packing in CASES
]


@pytest.mark.parametrize("setup,family,packing", GRID)
def test_weights_equal_repeating_or_leaving_out_examples(torch_models, setup, family, packing):
    n = SETUPS[setup][3]
    examples = _examples(family, n, seed=n)
    a = examples[0]
    # Two trainers, reset() between the three comparisons (the same compiled programs serve all three).
    weighted, plain = _trainer(torch_models, family, packing, setup), _trainer(torch_models, family, packing, setup)

    # all ones == no weights (the weighted programs against the plain ones)
    got, want = _step(weighted, examples, [1.0] * n), _step(plain, examples)
    _assert_same_training(got, want, weighted, plain)
    assert got["num_tokens"] == want["num_tokens"] and got["weighted_num_tokens"] == pytest.approx(want["num_tokens"])
    assert "weighted_num_tokens" not in want
    unweighted = _weights(plain)

    # [2, 1, ...] over [a, b, ...] == [a, a, b, ...]
    weighted.reset(), plain.reset()
    got = _step(weighted, examples, np.array([2.0] + [1.0] * (n - 1)))
    want = _step(plain, [a] + examples)
    _assert_same_training(got, want, weighted, plain)
    assert got["weighted_num_tokens"] == pytest.approx(want["num_tokens"])
    assert got["num_tokens"] < want["num_tokens"]  # the real count: a's tokens once
    # Power: the same examples without the weight train measurably differently.
    assert _relative_gaps(_weights(weighted), unweighted) > 100 * 2e-5

    # a zero weight == the example left out
    weighted.reset(), plain.reset()
    got = _step(weighted, examples, [0.0] + [1.0] * (n - 1))
    want = _step(plain, examples[1:])
    _assert_same_training(got, want, weighted, plain)
    assert got["num_tokens"] == want["num_tokens"]


def test_bad_weights_are_refused_before_anything_changes(torch_models):
    trainer = _trainer(torch_models, "llama", False, "1dev-ga1")
    examples = _examples("llama", 3, seed=1)
    before = _weights(trainer)
    cases = [
        ([1.0, 1.0], "3 examples"),
        ([1.0, float("nan"), 1.0], r"example_weights\[1\]"),
        ([1.0, -0.5, 1.0], r"example_weights\[1\]"),
        ([1.0, float("inf"), 1.0], r"example_weights\[1\]"),
        (1.0, "example_weights must be a list"),
        ("111", "example_weights must be a list"),
        ([[1.0], [1.0], [1.0]], "example_weights has shape"),
        (["a", "b", "c"], "example_weights"),
        ([True, False, True], "example_weights has dtype bool"),
    ]
    for weights, message in cases:
        with pytest.raises((TypeError, ValueError), match=message):
            _step(trainer, examples, weights)
    assert trainer.state.global_step == 0 and trainer.compiled_shapes == 0 and trainer.state.log_history == []
    got = _weights(trainer)
    assert all(np.array_equal(got[k], before[k]) for k in before)


def test_all_zero_weights_are_an_empty_round(torch_models):
    trainer = _trainer(torch_models, "llama", False, "1dev-ga1")
    before = _weights(trainer)
    with pytest.warns(UserWarning, match="no examples"):
        stats = _step(trainer, _examples("llama", 3, seed=2), [0, 0, 0])
    assert stats["num_updates"] == 0 and stats["num_tokens"] == 0 and trainer.state.global_step == 0
    got = _weights(trainer)
    assert all(np.array_equal(got[k], before[k]) for k in before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(trainer, _examples("llama", 3, seed=2), [0.5, 1, 3])  # integers and floats mix
    assert trainer.state.global_step == 1
