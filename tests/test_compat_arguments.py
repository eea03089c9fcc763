"""compat.config.IterativeSFTConfig and compat.arguments: TrainingArguments → TrainConfig."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import transformers
from transformers import TrainingArguments

import compat.config as compat_config
from compat.arguments import (
    ARGUMENTS,
    FATES,
    IGNORED,
    OPTIM_NAMES,
    UNRELATED_FIELDS,
    arguments_table_markdown,
    ignored_argument_message,
    training_arguments_to_config,
)
from compat.config import IterativeSFTConfig

REPO = Path(__file__).resolve().parents[1]
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def convert(args, max_length=None, truncation_mode="keep_end"):
    return training_arguments_to_config(args, max_length=max_length, truncation_mode=truncation_mode)


# --- IterativeSFTConfig ----------------------------------------------------------------------


def test_config_defaults_are_trls_and_construct_on_cpu(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FutureWarning for the checkpointing default we set
        config = IterativeSFTConfig(output_dir=str(tmp_path))
    assert config.model_init_kwargs is None
    assert config.max_length is None
    assert config.truncation_mode == "keep_end"
    assert config.optimize_device_cache is False
    assert config.logging_steps == 10
    assert config.gradient_checkpointing is True
    assert isinstance(config.bf16, bool)
    assert "model_init_kwargs" in IterativeSFTConfig._VALID_DICT_FIELDS


def test_config_bf16_resolves_to_not_fp16_where_supported(tmp_path):
    # use_cpu=True is the case TrainingArguments accepts bf16 for on any machine.
    assert IterativeSFTConfig(output_dir=str(tmp_path), use_cpu=True).bf16 is True
    assert IterativeSFTConfig(output_dir=str(tmp_path), use_cpu=True, fp16=False, bf16=False).bf16 is False


def test_config_bf16_falls_back_when_the_machine_rejects_it(tmp_path, monkeypatch):
    monkeypatch.setattr(compat_config, "_bf16_supported", lambda args: False)
    assert IterativeSFTConfig(output_dir=str(tmp_path)).bf16 is False


def test_config_bf16_falls_back_when_the_parent_check_rejects_it(tmp_path, monkeypatch):
    # The predicate says yes but TrainingArguments says no: the default is dropped, not raised.
    monkeypatch.setattr(compat_config, "_bf16_supported", lambda args: True)
    if transformers.utils.is_torch_bf16_gpu_available():
        pytest.skip("this machine supports bf16, so TrainingArguments never rejects it")
    assert IterativeSFTConfig(output_dir=str(tmp_path)).bf16 is False


def test_config_explicit_bf16_is_not_overridden(tmp_path):
    if transformers.utils.is_torch_bf16_gpu_available():
        pytest.skip("needs a machine without bf16 to see TrainingArguments reject it")
    with pytest.raises(ValueError, match="bf16"):
        IterativeSFTConfig(output_dir=str(tmp_path), bf16=True)


def test_config_truncation_mode_message_is_trls(tmp_path):
    with pytest.raises(ValueError) as err:
        IterativeSFTConfig(output_dir=str(tmp_path), truncation_mode="middle")
    assert str(err.value) == "truncation_mode must be either 'keep_end' or 'keep_start', got middle"


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_config_rejects_bad_max_length(tmp_path, bad):
    with pytest.raises(ValueError, match=r"max_length=.*positive integer"):
        IterativeSFTConfig(output_dir=str(tmp_path), max_length=bad)


def test_config_gradient_checkpointing_can_be_turned_off(tmp_path):
    name = "activation_checkpointing" if TRANSFORMERS_5 else "gradient_checkpointing"
    config = IterativeSFTConfig(output_dir=str(tmp_path), **{name: False})
    assert config.gradient_checkpointing is False
    assert convert(config)[0].gradient_checkpointing is False


def test_config_model_init_kwargs_json_string_is_parsed(tmp_path):
    config = IterativeSFTConfig(output_dir=str(tmp_path), model_init_kwargs='{"revision": "main"}')
    assert config.model_init_kwargs == {"revision": "main"}


# --- the table --------------------------------------------------------------------------------


def test_table_rows_are_unique_and_well_formed():
    names = [row.field for row in ARGUMENTS]
    assert len(names) == len(set(names))
    for row in ARGUMENTS:
        assert row.fate in FATES, row
        assert row.maps_to and row.note, row
    assert not set(names) & UNRELATED_FIELDS


def test_every_field_of_the_installed_transformers_is_reviewed():
    fields = {f.name for f in dataclasses.fields(IterativeSFTConfig)}
    unreviewed = fields - {row.field for row in ARGUMENTS} - UNRELATED_FIELDS
    assert not unreviewed, f"add these TrainingArguments fields to compat.arguments: {sorted(unreviewed)}"


def test_doc_is_generated_from_the_table():
    doc = (REPO / "docs" / "compat_arguments.md").read_text()
    assert doc == arguments_table_markdown(), (
        "docs/compat_arguments.md is stale; regenerate it with "
        "python -c 'import compat.arguments as a; open(\"docs/compat_arguments.md\", \"w\").write(a.arguments_table_markdown())'"
    )


def test_table_documents_the_trl_traps():
    notes = {row.field: row.note for row in ARGUMENTS}
    assert "When no scheduler is provided, you need to set the total number of training steps" in notes["max_steps"]
    assert "learning rate 0" in notes["max_steps"]
    assert "after the update" in notes["learning_rate"]


# --- conversion -------------------------------------------------------------------------------


def test_trainingarguments_defaults(tmp_path):
    config, ignored = convert(TrainingArguments(output_dir=str(tmp_path)))
    assert ignored == []
    assert (config.learning_rate, config.per_device_train_batch_size, config.max_steps) == (5e-5, 8, -1)
    assert (config.logging_steps, config.optim, config.lr_scheduler_type) == (500, "adamw", "linear")
    assert config.bf16 is False and config.gradient_checkpointing is False
    assert config.lr_scheduler_kwargs == {}
    assert config.max_grad_norm == 1.0 and config.seed == 42


def test_iterative_config_defaults(tmp_path):
    config, ignored = convert(IterativeSFTConfig(output_dir=str(tmp_path)))
    assert ignored == []
    assert config.logging_steps == 10
    assert config.gradient_checkpointing is True


def test_packing_is_the_cores_per_backend_default_and_sftconfigs_names_are_refused(tmp_path):
    """TRL 0.23.1's IterativeSFTConfig has no ``packing`` / ``padding_free`` (SFTConfig's fields): neither has the
    facade's, so such a keyword fails as it does in TRL, and the facade trains with the core's per-backend rule."""
    config, _ = convert(IterativeSFTConfig(output_dir=str(tmp_path)))
    assert config.packing is None  # resolved by the core trainer (jaxsft.training.fast_path.resolve_packing)
    for name in ("packing", "padding_free"):
        with pytest.raises(TypeError, match=name):
            IterativeSFTConfig(output_dir=str(tmp_path), **{name: True})


def test_mapped_fields(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=1e-3, per_device_train_batch_size=3, per_device_eval_batch_size=5,
        gradient_accumulation_steps=2, max_steps=40, warmup_steps=4, lr_scheduler_type="cosine",
        lr_scheduler_kwargs={"num_cycles": 0.25}, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95,
        adam_epsilon=1e-6, max_grad_norm=0.5, seed=7, logging_steps=3, eval_steps=6, optim="adamw_torch",
        disable_tqdm=True,
    )
    config, ignored = convert(args, max_length=64, truncation_mode="keep_start")
    assert ignored == []
    expected = dict(
        learning_rate=1e-3, per_device_train_batch_size=3, per_device_eval_batch_size=5,
        gradient_accumulation_steps=2, max_steps=40, warmup_steps=4, lr_scheduler_type="cosine",
        lr_scheduler_kwargs={"num_cycles": 0.25}, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95,
        adam_epsilon=1e-6, max_grad_norm=0.5, seed=7, logging_steps=3, eval_steps=6, optim="adamw",
        disable_tqdm=True, max_length=64, truncation_mode="keep_start",
    )
    assert {k: getattr(config, k) for k in expected} == expected


def test_truncation_mode_is_validated_with_trls_message(tmp_path):
    with pytest.raises(ValueError, match="truncation_mode must be either 'keep_end' or 'keep_start', got middle"):
        convert(TrainingArguments(output_dir=str(tmp_path)), truncation_mode="middle")


@pytest.mark.parametrize("name,expected", sorted(OPTIM_NAMES.items()))
def test_supported_optim_names(tmp_path, name, expected):
    args = TrainingArguments(output_dir=str(tmp_path))
    args.optim = name  # some names (xla, npu, hf) are not constructible on every install
    assert convert(args)[0].optim == expected


def test_unsupported_optim_lists_the_supported_names(tmp_path):
    with pytest.raises(ValueError, match=r"optim='adagrad'.*adamw_torch, adamw_torch_fused.*adafactor, sgd"):
        convert(TrainingArguments(output_dir=str(tmp_path), optim="adagrad"))


def test_unsupported_scheduler_points_at_torch_schedulers(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), lr_scheduler_type="cosine_with_restarts")
    with pytest.raises(ValueError, match=r"lr_scheduler_type='cosine_with_restarts'.*get_scheduler"):
        convert(args)


def test_fp16_becomes_bf16_with_a_warning_name(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path))
    args.fp16 = True  # fp16=True is rejected at construction on a CPU-only torch
    config, ignored = convert(args)
    assert config.bf16 is True
    assert ignored == ["fp16"]
    message = ignored_argument_message(args, "fp16")
    assert "fp16=True" in message and "approximated" in message and "loss scaling" in message


def test_fp16_and_bf16_together_raise(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path))
    args.fp16 = args.bf16 = True
    with pytest.raises(ValueError, match=r"fp16=True and bf16=True.*pass bf16=True and fp16=False"):
        convert(args)


def test_label_smoothing_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"label_smoothing_factor=0.1: label smoothing is not supported"):
        convert(TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1))


def test_not_trainingarguments_is_a_type_error():
    with pytest.raises(TypeError, match=r"args must be a transformers.TrainingArguments.*got <class 'dict'>"):
        convert({"learning_rate": 1e-3})


def test_warmup_steps_win_over_ratio(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=100, warmup_steps=7)
    if hasattr(args, "warmup_ratio"):
        args.warmup_ratio = 0.5
    config, _ = convert(args)
    assert config.num_warmup_steps() == 7


def test_warmup_ratio(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=100)
    if hasattr(args, "warmup_ratio"):  # transformers 4.x
        args.warmup_ratio = 0.1
    else:  # transformers 5: a float < 1 is a ratio
        args.warmup_steps = 0.1
    config, _ = convert(args)
    assert (config.warmup_steps, config.warmup_ratio, config.num_warmup_steps()) == (0, 0.1, 10)


def test_logging_steps_ratio(tmp_path):
    config, _ = convert(TrainingArguments(output_dir=str(tmp_path), max_steps=50, logging_steps=0.1))
    assert config.logging_steps == 5
    with pytest.raises(ValueError, match=r"logging_steps=0.1: a value below 1 is a ratio of max_steps"):
        convert(TrainingArguments(output_dir=str(tmp_path), logging_steps=0.1))


def test_logging_strategy(tmp_path):
    config, ignored = convert(TrainingArguments(output_dir=str(tmp_path), logging_strategy="no"))
    assert config.logging_steps == 0 and ignored == []
    config, ignored = convert(TrainingArguments(output_dir=str(tmp_path), logging_strategy="epoch"))
    assert config.logging_steps == 500 and ignored == ["logging_strategy"]


def test_eval_steps_follow_trl(tmp_path):
    # eval_strategy="steps" without eval_steps: TrainingArguments fills in logging_steps.
    config, _ = convert(TrainingArguments(output_dir=str(tmp_path), eval_strategy="steps", logging_steps=4))
    assert config.eval_steps == 4
    # TRL evaluated whenever eval_steps was set, even with eval_strategy="no".
    config, _ = convert(TrainingArguments(output_dir=str(tmp_path), eval_steps=9))
    assert config.eval_steps == 9
    _, ignored = convert(TrainingArguments(output_dir=str(tmp_path), eval_strategy="epoch"))
    assert ignored == ["eval_strategy"]


def test_max_grad_norm_none_and_zero_pass_through(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_grad_norm=0.0)
    assert convert(args)[0].clipping_enabled is False
    args.max_grad_norm = None
    assert convert(args)[0].max_grad_norm is None


def test_gradient_checkpointing(tmp_path):
    name = "activation_checkpointing" if TRANSFORMERS_5 else "gradient_checkpointing"
    args = TrainingArguments(output_dir=str(tmp_path), **{name: True})
    assert convert(args)[0].gradient_checkpointing is True


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4.x ignores optim_args for sgd")
def test_sgd_momentum_from_optim_args(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), optim="sgd", optim_args="momentum=0.9")
    config, ignored = convert(args)
    assert (config.optim, config.sgd_momentum, ignored) == ("sgd", 0.9, [])
    args.optim_args = "momentum=0.9, nesterov=True"
    with pytest.raises(ValueError, match=r"optim_args=.*nesterov SGD is not supported"):
        convert(args)
    args.optim_args = "dampening=0.1"
    with pytest.raises(ValueError, match=r"dampening is not supported"):
        convert(args)


def test_optim_args_for_adamw_are_ignored(tmp_path):
    _, ignored = convert(TrainingArguments(output_dir=str(tmp_path), optim_args="foo=1"))
    assert ignored == ["optim_args"]


def _non_default(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "_other"
    return ["set"] if isinstance(value, list) else "set"


IGNORED_ROWS = [row.field for row in ARGUMENTS if row.fate == IGNORED]


@pytest.mark.parametrize("name", IGNORED_ROWS)
def test_each_ignored_field_is_reported_when_set(tmp_path, name):
    args = TrainingArguments(output_dir=str(tmp_path))
    if not hasattr(args, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    setattr(args, name, _non_default(getattr(args, name)))
    _, ignored = convert(args)
    assert ignored == [name]
    message = ignored_argument_message(args, name)
    assert message.startswith(f"TrainingArguments.{name}=") and "is ignored by jaxsft" in message


def test_report_to_is_honoured_by_the_facade_not_reported_as_ignored(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    assert convert(args)[1] == []
    args.report_to = ["wandb"]
    assert convert(args)[1] == []  # compat.IterativeSFTTrainer builds the integration callbacks


def test_ignored_names_come_once_in_table_order(tmp_path):
    # (save_steps is honoured since issue 13; logging_first_step stands in as the third ignored field)
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, logging_first_step=True, data_seed=3)
    order = [row.field for row in ARGUMENTS]
    _, ignored = convert(args)
    assert ignored == sorted({"num_train_epochs", "logging_first_step", "data_seed"}, key=order.index)


@pytest.mark.slow  # a fresh interpreter importing torch and transformers
def test_the_facade_config_takes_the_core_constants_and_imports_without_jax():
    """compat.config has no copy of the truncation modes: it reads jaxsft.infra.config's, which (with the lazy
    jaxsft package) imports where JAX cannot (the TRL reference venv has none). Checked in a fresh process
    in which every import of jax, jaxlib, flax and optax fails."""
    import subprocess
    import sys

    from jaxsft.infra import config as core_config

    assert compat_config.TRUNCATION_MODES is core_config.TRUNCATION_MODES
    assert not hasattr(compat_config, "TRL_TRUNCATION_MODES")
    script = (
        "import sys\n"
        "for name in ('jax', 'jaxlib', 'flax', 'optax'): sys.modules[name] = None  # importing them raises\n"
        "import compat.config, jaxsft\n"
        "from jaxsft.infra.config import TRUNCATION_MODES, IGNORE_INDEX, TrainConfig\n"
        "assert compat.config.TRUNCATION_MODES is TRUNCATION_MODES\n"
        "try:\n"
        "    compat.config.IterativeSFTConfig(output_dir='out', truncation_mode='middle')\n"
        "except ValueError as err:\n"
        "    assert 'keep_end' in str(err), err\n"
        "assert TrainConfig(truncation_mode='keep_start').truncation_mode == 'keep_start'\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax') and sys.modules[m]))\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root,
                          env={**__import__("os").environ, "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"  # nothing of JAX was loaded


def test_the_jaxsft_package_exports_every_public_name_lazily():
    """``from jaxsft import X``, ``jaxsft.X``, ``__all__`` and ``dir(jaxsft)`` after the package became lazy."""
    import importlib

    import jaxsft

    for name in jaxsft.__all__:
        value = getattr(jaxsft, name)
        assert value is getattr(importlib.import_module("jaxsft"), name)
        assert name in dir(jaxsft)
    from jaxsft import IterativeSFTTrainer, TrainConfig, generate, make_mesh  # noqa: F401

    assert TrainConfig.__module__ == "jaxsft.infra.config" and jaxsft.distributed.__name__ == "jaxsft.infra.distributed"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        jaxsft.nothing  # noqa: B018
