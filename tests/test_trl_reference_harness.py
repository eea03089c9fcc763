"""Smoke tests of the TRL 0.23.1 reference harness (the parity tests build on it).

Slow: the first run builds the reference venv (about a minute; see tests/trl_reference/make_venv.sh).
"""

from __future__ import annotations

import math
import os
import subprocess
import textwrap

import pytest
from safetensors.numpy import load_file

from trl_ref import REPO, reference_python, run_trl, save_tiny_llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def test_trl_trains_the_tiny_llama_and_logs(tiny_llama, tmp_path):
    model_dir, tok_dir = tiny_llama
    spec = {
        "model_dir": str(model_dir),
        "tokenizer_dir": str(tok_dir),
        "training_args": {"per_device_train_batch_size": 2, "max_steps": 10, "learning_rate": 1e-3, "logging_steps": 1},
        "steps": [
            {"input_ids": [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15], [3, 4, 5, 6, 7]]},  # labels filled by the harness
            {"texts": ["the quick brown fox", "all that glitters is not gold"]},
        ],
    }
    result = run_trl(spec, tmp_path / "out")

    assert result["versions"]["trl"] == "0.23.1" and result["versions"]["transformers"] == "4.57.6"
    first, second = result["calls"]
    assert [first["global_step"], second["global_step"]] == [2, 3]  # ceil(3/2) then ceil(2/2) micro-batches
    assert [len(m["input_ids"]) for m in first["micro_batches"]] in ([2, 1], [1, 2])
    assert first["returned"] == "None"  # TRL's step() never returned its promised stats
    logs = result["final"]["log_history"]
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    for entry in logs:
        assert math.isfinite(entry["loss"]) and entry["loss"] > 0
        assert entry["learning_rate"] > 0  # max_steps set: no lr-0 trap
    assert logs[0]["learning_rate"] == pytest.approx(1e-3 * 9 / 10)  # logged after the scheduler step

    before = load_file(str(model_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "final_model.safetensors"))
    assert set(before) == set(after)
    assert any(not (before[k] == after[k]).all() for k in before)


def test_compat_config_works_under_transformers_4_57(tmp_path):
    """compat.config (torch/transformers only, no jax) supports transformers 4.56+.

    compat.inputs converts through jaxsft's one validation layer, so it needs the JAX core, which this
    reference venv does not carry; its datasets Column conversion is tested in this venv below.
    """
    script = textwrap.dedent(
        """
        import transformers, warnings
        from compat.config import IterativeSFTConfig
        assert transformers.__version__.startswith("4."), transformers.__version__
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            config = IterativeSFTConfig(output_dir="out")
        assert config.logging_steps == 10 and config.gradient_checkpointing is True
        assert config.bf16 is transformers.utils.is_torch_bf16_gpu_available()
        assert IterativeSFTConfig(output_dir="out", use_cpu=True).bf16 is True
        try:
            IterativeSFTConfig(output_dir="out", truncation_mode="middle")
        except ValueError as err:
            assert str(err) == "truncation_mode must be either 'keep_end' or 'keep_start', got middle"
        else:
            raise AssertionError("truncation_mode was not validated")
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(reference_python()), "-c", script], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_compat_inputs_take_a_real_datasets_column():
    import datasets

    from compat.inputs import convert_step_inputs

    ds = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]], "text": ["a b", "c"]})
    ds.set_format("torch", columns=["input_ids"], output_all_columns=True)
    out = convert_step_inputs(input_ids=ds["input_ids"])
    assert [r.tolist() for r in out.input_ids] == [[5, 6, 7], [8, 9]]
    assert convert_step_inputs(texts=ds["text"]).texts == ["a b", "c"]
