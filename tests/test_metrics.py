"""report_to: scalars written by the libraries themselves, read back with TensorBoard's own event reader."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import jaxsft
import tiny

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    files = list(Path(folder).glob("events.out.tfevents.*"))
    assert files, f"no event file in {folder}"
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_events_hold_the_logged_losses(tmp_path):
    torch_model = tiny.tiny_torch_model("llama", vocab_size=128)
    mesh = jaxsft.single_device_mesh()
    config = jaxsft.TrainConfig(
        learning_rate=1e-2, per_device_train_batch_size=2, max_steps=10, warmup_steps=1, logging_steps=2,
        eval_steps=3, max_length=16, length_buckets=(16,), disable_tqdm=True, report_to="tensorboard",
        logging_dir=str(tmp_path / "tb"),
    )
    rng = np.random.default_rng(0)
    held_out = [rng.integers(3, 128, 10) for _ in range(3)]
    trainer = jaxsft.IterativeSFTTrainer(jaxsft.from_pretrained(torch_model, mesh=mesh), config, mesh=mesh,
                                         eval_dataset={"input_ids": held_out})
    batch = [rng.integers(3, 128, 12) for _ in range(4)]
    for _ in range(3):
        trainer.step(input_ids=batch)  # 2 updates per call
    got = scalars(tmp_path / "tb")
    train = [h for h in trainer.state.log_history if "loss" in h]
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in train] == [2, 4, 6] and [h["step"] for h in evals] == [3, 6]
    assert [s for s, _ in got["train/loss"]] == [2, 4, 6]
    np.testing.assert_allclose([v for _, v in got["train/loss"]], [h["loss"] for h in train], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in got["train/learning_rate"]], [h["learning_rate"] for h in train],
                               rtol=1e-6)
    np.testing.assert_allclose([v for _, v in got["train/grad_norm"]], [h["grad_norm"] for h in train], rtol=1e-6)
    assert [s for s, _ in got["eval/loss"]] == [3, 6]
    np.testing.assert_allclose([v for _, v in got["eval/loss"]], [h["eval_loss"] for h in evals], rtol=1e-6)
    assert got["train/loss"][-1][1] < got["train/loss"][0][1] - 0.1  # it trained (same examples each call)


@pytest.mark.slow
def test_facade_report_to_tensorboard_is_one_mechanism_and_holds_the_losses(tmp_path):
    """The facade keeps HF's own TensorBoardCallback (fed by the core's events); the core adds no second sink."""
    from transformers import TrainingArguments
    from transformers.integrations import TensorBoardCallback

    from compat import IterativeSFTTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=["tensorboard"], logging_steps=1,
                             max_steps=5, learning_rate=1e-3, per_device_train_batch_size=2, disable_tqdm=True)
    trainer = IterativeSFTTrainer(tiny.tiny_torch_model("gpt2", vocab_size=128), args, max_length=16,
                                  mesh=jaxsft.single_device_mesh())
    assert sum(isinstance(cb, TensorBoardCallback) for cb in trainer.callback_handler.callbacks) == 1
    assert trainer.core.config.report_to == ()  # no core sink beside HF's callback
    rng = np.random.default_rng(1)
    trainer.step(input_ids=[rng.integers(3, 128, 8) for _ in range(4)])
    folders = {p.parent for p in (tmp_path / "out").rglob("events.out.tfevents.*")}
    assert len(folders) == 1
    got = scalars(folders.pop())
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [s for s, _ in got["train/loss"]] == [h["step"] for h in logged] == [1, 2]
    np.testing.assert_allclose([v for _, v in got["train/loss"]], [h["loss"] for h in logged], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in got["train/learning_rate"]], [h["learning_rate"] for h in logged],
                               rtol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_missing_library_names_the_extra_before_any_state(tmp_path):
    config = jaxsft.TrainConfig(max_length=16, report_to=["wandb"], logging_dir=str(tmp_path / "w"))
    model = jaxsft.from_pretrained(tiny.tiny_torch_model("llama", vocab_size=128), mesh=jaxsft.single_device_mesh())
    with pytest.raises(ImportError, match=r"report_to includes 'wandb'.*pip install 'jaxsft\[wandb\]'"):
        jaxsft.IterativeSFTTrainer(model, config)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("value", ["mlflow", ["tensorboard", 3], 5])
def test_unknown_sink_is_refused_naming_the_field(value):
    with pytest.raises(ValueError, match=r"TrainConfig.report_to=.*(not a supported sink|must be).*'tensorboard' or 'wandb'"):
        jaxsft.TrainConfig(report_to=value)


def test_report_to_forms_are_normalised():
    assert jaxsft.TrainConfig().report_to == ()
    assert jaxsft.TrainConfig(report_to="none").report_to == ()
    assert jaxsft.TrainConfig(report_to=["tensorboard", "tensorboard", "wandb"]).report_to == ("tensorboard", "wandb")
