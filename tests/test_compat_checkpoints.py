"""Checkpoints through the TRL facade: save_checkpoint / restore_checkpoint, save_steps, resume_from_checkpoint.

* 10 updates straight equal 5 updates, ``save_checkpoint``, a fresh process, ``restore_checkpoint`` and
  5 more, bit for bit (final weights and every logged loss).
* ``save_strategy="steps"`` + ``save_steps`` write ``checkpoint-N`` folders under ``output_dir`` during
  ``step()``; ``save_total_limit`` keeps the newest; ``resume_from_checkpoint=True`` picks the newest and
  ``state.global_step`` / ``state.log_history`` are the core's after it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
VOCAB = 256


def call(i: int):
    import torch

    rng = np.random.default_rng(100 + i)
    return [torch.as_tensor(rng.integers(3, VOCAB, int(rng.integers(4, 15)))) for _ in range(4)]


def build(model_dir: str, output_dir: str, **overrides):
    from transformers import TrainingArguments

    import jaxsft
    from compat import IterativeSFTTrainer

    settings = dict(output_dir=output_dir, report_to=[], disable_tqdm=True, learning_rate=1e-3, max_steps=20,
                    warmup_steps=2, weight_decay=0.01, logging_steps=1, per_device_train_batch_size=4, seed=11,
                    save_strategy="no")
    args = TrainingArguments(**{**settings, **overrides})
    return IterativeSFTTrainer(model_dir, args, mesh=jaxsft.single_device_mesh(), max_length=16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import tiny

    folder = tmp_path_factory.mktemp("compat-ckpt") / "init"
    tiny.tiny_torch_model("llama", vocab_size=VOCAB, num_key_value_heads=4).save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_ten_straight_equal_five_save_fresh_process_restore_five(model_dir, tmp_path):
    straight = build(model_dir, str(tmp_path / "a"))
    for i in range(10):
        straight.step(input_ids=call(i))
    want_weights = {k: v.detach().numpy() for k, v in straight.model.state_dict().items()}

    first = build(model_dir, str(tmp_path / "b"))
    for i in range(5):
        first.step(input_ids=call(i))
    path = first.save_checkpoint()
    assert path == os.path.join(str(tmp_path / "b"), "checkpoint-5")

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "compat_resume_worker.py"), "--model", model_dir, "--checkpoint", path,
         "--out", str(tmp_path), "--output-dir", str(tmp_path / "c"), "--first", "5", "--last", "9"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    got_weights = np.load(tmp_path / "weights.npz")
    got_log = json.loads((tmp_path / "log.json").read_text())

    assert set(got_weights.files) == set(want_weights)
    for key, value in want_weights.items():
        np.testing.assert_array_equal(got_weights[key], value, err_msg=key)  # bit for bit
    assert [e["step"] for e in got_log] == list(range(1, 11))
    assert [e["loss"] for e in got_log] == [e["loss"] for e in straight.state.log_history]
    assert [e["learning_rate"] for e in got_log] == [e["learning_rate"] for e in straight.state.log_history]


def test_save_steps_write_checkpoints_and_resume_picks_the_newest(model_dir, tmp_path):
    from jaxsft.infra import checkpoint as ckpt

    out = str(tmp_path / "run")
    trainer = build(model_dir, out, save_strategy="steps", save_steps=2, save_total_limit=2)
    for i in range(7):
        trainer.step(input_ids=call(i))
    assert sorted(os.listdir(out)) == ["checkpoint-4", "checkpoint-6"]  # 2 was dropped by save_total_limit=2
    assert ckpt.latest_checkpoint(out).endswith("checkpoint-6")

    resumed = build(model_dir, out, save_strategy="steps", save_steps=2, resume_from_checkpoint=True)
    assert resumed.state.global_step == resumed.core.state.global_step == 6
    assert resumed.state.log_history is resumed.core.state.log_history  # one list, the core's
    assert [e["step"] for e in resumed.state.log_history] == [1, 2, 3, 4, 5, 6]
    assert [e["loss"] for e in resumed.state.log_history] == [e["loss"] for e in trainer.state.log_history[:6]]
    stats = resumed.step(input_ids=call(6))  # the 7th update again: same loss as the uninterrupted run
    assert stats["update_losses"][0] == pytest.approx(trainer.state.log_history[6]["loss"], abs=5e-5)
    assert resumed.state.global_step == 7

    explicit = build(model_dir, str(tmp_path / "other"), resume_from_checkpoint=os.path.join(out, "checkpoint-4"))
    assert explicit.state.global_step == 4
    with pytest.raises(ValueError, match="resume_from_checkpoint=True: no complete checkpoint"):
        build(model_dir, str(tmp_path / "empty"), resume_from_checkpoint=True)


def test_nan_guard_from_the_facade_config(model_dir, tmp_path):
    from compat import IterativeSFTConfig

    args = IterativeSFTConfig(output_dir=str(tmp_path), report_to=[], skip_nonfinite_updates=True,
                              max_nonfinite_in_a_row=4, save_strategy="no")
    from compat.arguments import training_arguments_to_config

    config, ignored = training_arguments_to_config(args, max_length=16, truncation_mode="keep_end")
    assert config.skip_nonfinite_updates is True and config.max_nonfinite_in_a_row == 4 and ignored == []
