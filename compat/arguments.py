"""TrainingArguments → ``jaxsft.TrainConfig``: one table says what happens to every field.

``ARGUMENTS`` is the single source of truth: the converter reads its fates to find
ignored fields, ``arguments_table_markdown()`` renders it into
``docs/compat_arguments.md`` (a test keeps the two equal), and the notes record
where TRL 0.23.1 behaved differently. Fields in neither ``ARGUMENTS`` nor
``UNRELATED_FIELDS`` are a test failure, so a new transformers field cannot slip
through unreviewed.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from typing import Any, NamedTuple, Optional

import transformers
from transformers import TrainingArguments

from jaxsft.infra.config import SCHEDULER_TYPES, TrainConfig

MAPPED = "mapped"  # honoured, through the TrainConfig field(s) named in maps_to
FACADE = "facade"  # honoured by compat.IterativeSFTTrainer itself, not by TrainConfig
APPROXIMATED = "approximated"  # honoured in spirit, with a warning
IGNORED = "ignored"  # no effect; a warning when set to a non-default value
REJECTED = "rejected"  # a non-default value raises ValueError
FATES = (MAPPED, FACADE, APPROXIMATED, IGNORED, REJECTED)


class ArgumentRow(NamedTuple):
    """One TrainingArguments / IterativeSFTConfig field and what the facade does with it."""

    field: str
    fate: str
    maps_to: str
    note: str


# The optim names that mean "torch AdamW" in some transformers version.
ADAMW_NAMES = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_torch_xla", "adamw_torch_npu_fused")
OPTIM_NAMES = {**{name: "adamw" for name in ADAMW_NAMES}, "adafactor": "adafactor", "sgd": "sgd"}

_MAX_STEPS_NOTE = (
    "-1 means no horizon. TRL 0.23.1 then builds its linear schedule with num_training_steps=-1, which gives "
    "learning rate 0 on every update, so the model never changes (bug); classic TRL (<= 0.17) raised "
    "ValueError('When no scheduler is provided, you need to set the total number of training steps to perform "
    "`max_steps`'). jaxsft trains at a constant rate after warmup and warns, because a decaying schedule needs a "
    "horizon. With max_steps=N the schedule reaches its end after N optimizer updates and stays there."
)

ARGUMENTS: tuple[ArgumentRow, ...] = (
    # --- optimisation -------------------------------------------------------------------------
    ArgumentRow("learning_rate", MAPPED, "TrainConfig.learning_rate",
                "Peak rate of the schedule. The logged learning_rate follows HF Trainer and TRL: the scheduler's "
                "value after the update, i.e. the rate the next update will use."),
    ArgumentRow("lr_scheduler_type", MAPPED, "TrainConfig.lr_scheduler_type",
                "linear, cosine, constant and constant_with_warmup. Any other type raises ValueError; for the "
                "LambdaLR-based ones, build the torch scheduler with transformers.get_scheduler and pass "
                "optimizers=(optimizer, scheduler): compat.optimizers reproduces it."),
    ArgumentRow("lr_scheduler_kwargs", MAPPED, "TrainConfig.lr_scheduler_kwargs",
                "None becomes {}; passed to the schedule (e.g. num_cycles for cosine)."),
    ArgumentRow("warmup_steps", MAPPED, "TrainConfig.warmup_steps, or TrainConfig.warmup_ratio for a float < 1",
                "transformers 5 reads a float < 1 as a ratio of max_steps; that is kept. A value >= 1 is a step "
                "count (int() of it, as HF). When both warmup_steps and warmup_ratio are set, warmup_steps wins, "
                "as in HF get_warmup_steps."),
    ArgumentRow("warmup_ratio", MAPPED, "TrainConfig.warmup_ratio",
                "transformers 4.x only (5.x folds it into warmup_steps). ceil(ratio * max_steps) warmup updates; "
                "none when max_steps=-1, as in HF."),
    ArgumentRow("weight_decay", MAPPED, "TrainConfig.weight_decay",
                "On every parameter except biases and norm weights (HF's split): decoupled for adamw, added to the "
                "gradient (L2) for sgd, as torch does."),
    ArgumentRow("adam_beta1", MAPPED, "TrainConfig.adam_beta1", "Used by adamw only, as in HF."),
    ArgumentRow("adam_beta2", MAPPED, "TrainConfig.adam_beta2", "Used by adamw only, as in HF."),
    ArgumentRow("adam_epsilon", MAPPED, "TrainConfig.adam_epsilon",
                "Used by adamw only; added outside the square root, as torch AdamW."),
    ArgumentRow("max_grad_norm", MAPPED, "TrainConfig.max_grad_norm",
                "Global-norm clipping before the update. None or a value <= 0 disables it, as in HF Trainer; "
                "TRL 0.23.1 zeroed every gradient at 0 (bug, not reproduced)."),
    ArgumentRow("optim", MAPPED, "TrainConfig.optim",
                "adamw_torch, adamw_torch_fused, adamw_hf, adamw_torch_xla, adamw_torch_npu_fused -> adamw; "
                "adafactor -> adafactor (HF's settings: no relative step, no parameter scaling); sgd -> sgd. "
                "Any other name raises ValueError listing these."),
    ArgumentRow("optim_args", MAPPED, "TrainConfig.sgd_momentum",
                "optim='sgd' on transformers 5: momentum=<float> is honoured; nesterov=true or a non-zero "
                "dampening raise ValueError; weight_decay is overridden by the per-group decay, as in HF. "
                "transformers 4.x ignored optim_args for sgd and for the AdamW names, so do we (warned)."),
    ArgumentRow("adafactor", MAPPED, "TrainConfig.optim",
                "transformers 4.x flag; TrainingArguments already turned it into optim='adafactor'."),
    ArgumentRow("optim_target_modules", IGNORED, "-",
                "Only used by GaLore/APOLLO optimizers, which are not supported."),
    # --- batching and steps -------------------------------------------------------------------
    ArgumentRow("per_device_train_batch_size", MAPPED, "TrainConfig.per_device_train_batch_size",
                "Micro-batch size: each step() call shuffles its examples and splits them into micro-batches of "
                "this size, the last one possibly smaller, as TRL."),
    ArgumentRow("per_device_eval_batch_size", MAPPED, "TrainConfig.per_device_eval_batch_size",
                "Batch size of evaluate()."),
    ArgumentRow("gradient_accumulation_steps", MAPPED, "TrainConfig.gradient_accumulation_steps",
                "Honoured: one optimizer update per k micro-batches. TRL 0.23.1 with transformers >= 4.47 silently "
                "ignored it (every micro-batch was an update), so parity runs against TRL must use 1."),
    ArgumentRow("max_steps", MAPPED, "TrainConfig.max_steps", _MAX_STEPS_NOTE),
    ArgumentRow("num_train_epochs", IGNORED, "-", "step() is the unit of work and has no epochs; TRL ignored it too."),
    ArgumentRow("seed", MAPPED, "TrainConfig.seed",
                "Seeds shuffling inside step() and any dropout. The shuffle order differs from TRL's, which drew "
                "from torch's global RNG."),
    ArgumentRow("data_seed", IGNORED, "-", "Shuffling is seeded by seed."),
    ArgumentRow("full_determinism", IGNORED, "-", "No torch determinism flags to set; runs are seeded by seed."),
    ArgumentRow("auto_find_batch_size", IGNORED, "-", "The micro-batch size is fixed by per_device_train_batch_size."),
    ArgumentRow("dataloader_drop_last", IGNORED, "-",
                "The last, smaller micro-batch of a step() call is always used, as TRL."),
    ArgumentRow("group_by_length", IGNORED, "-", "transformers 4.x; step() shuffles uniformly, as TRL."),
    ArgumentRow("train_sampling_strategy", IGNORED, "-", "transformers 5; step() shuffles uniformly, as TRL."),
    # --- precision, memory, kernels -----------------------------------------------------------
    ArgumentRow("bf16", MAPPED, "TrainConfig.bf16",
                "bf16 compute with fp32 parameters and optimizer state. IterativeSFTConfig resolves None to "
                "not fp16, or False where TrainingArguments would reject bf16 on this machine."),
    ArgumentRow("fp16", APPROXIMATED, "TrainConfig.bf16=True",
                "JAX trains in bf16 instead: no fp16 and no loss scaling (warned). bf16 and fp16 both True "
                "raise ValueError."),
    ArgumentRow("bf16_full_eval", IGNORED, "-", "evaluate() uses the training compute dtype."),
    ArgumentRow("fp16_full_eval", IGNORED, "-", "evaluate() uses the training compute dtype."),
    ArgumentRow("tf32", IGNORED, "-", "XLA chooses the matmul precision (see JAX_DEFAULT_MATMUL_PRECISION)."),
    ArgumentRow("gradient_checkpointing", MAPPED, "TrainConfig.gradient_checkpointing",
                "Honoured: decoder layers are rematerialised in the backward pass (less memory, about a third "
                "more compute). IterativeSFTConfig defaults to True like TRL 0.22+, where it never took effect "
                "because train() was never called; plain TrainingArguments default to False."),
    ArgumentRow("activation_checkpointing", MAPPED, "TrainConfig.gradient_checkpointing",
                "transformers 5's name for gradient_checkpointing; same meaning."),
    ArgumentRow("gradient_checkpointing_kwargs", IGNORED, "-", "use_reentrant and the like have no JAX meaning."),
    ArgumentRow("activation_checkpointing_kwargs", IGNORED, "-", "use_reentrant and the like have no JAX meaning."),
    ArgumentRow("torch_compile", IGNORED, "-",
                "XLA always compiles the training step. (torch_compile_backend / _mode set it to True.)"),
    ArgumentRow("torch_empty_cache_steps", IGNORED, "-", "Use optimize_device_cache to free memory after step()."),
    ArgumentRow("use_liger_kernel", IGNORED, "-",
                "jaxsft always uses its own fused, chunked lm_head + cross-entropy."),
    ArgumentRow("liger_kernel_config", IGNORED, "-", "See use_liger_kernel."),
    ArgumentRow("label_smoothing_factor", REJECTED, "-",
                "A value > 0 raises ValueError: label smoothing is not supported (TRL applied HF's label smoother)."),
    ArgumentRow("neftune_noise_alpha", IGNORED, "-",
                "HF adds NEFTune noise only inside Trainer.train(), which TRL's step() never calls, so it had no "
                "effect in TRL either."),
    ArgumentRow("average_tokens_across_devices", IGNORED, "-",
                "TRL never passed num_items_in_batch; jaxsft's loss normalisation is its own (see the trainer)."),
    ArgumentRow("use_cpu", IGNORED, "-",
                "JAX chooses the devices; set JAX_PLATFORMS=cpu to force the CPU. IterativeSFTConfig still reads "
                "it to decide whether bf16 is available."),
    ArgumentRow("deepspeed", IGNORED, "-", "jaxsft shards over its own device mesh (the mesh= argument)."),
    ArgumentRow("fsdp", IGNORED, "-", "jaxsft shards over its own device mesh (the mesh= argument)."),
    ArgumentRow("parallelism_config", IGNORED, "-", "jaxsft shards over its own device mesh (the mesh= argument)."),
    # --- logging, evaluation, saving ------------------------------------------------------------
    ArgumentRow("logging_steps", MAPPED, "TrainConfig.logging_steps",
                "Log every N optimizer updates. IterativeSFTConfig defaults to 10 (TrainingArguments: 500). A "
                "float < 1 is a ratio of max_steps as in HF Trainer and needs max_steps > 0; TRL used the float "
                "itself as a modulus (bug)."),
    ArgumentRow("logging_strategy", MAPPED, "TrainConfig.logging_steps",
                "'steps': every logging_steps; 'no': logging off (logging_steps=0); 'epoch': ignored (warned), "
                "logs every logging_steps. TRL ignored logging_strategy entirely."),
    ArgumentRow("logging_first_step", IGNORED, "-", "TRL never honoured it."),
    ArgumentRow("logging_nan_inf_filter", IGNORED, "-",
                "The logged loss is the plain mean since the last log, as TRL."),
    ArgumentRow("eval_steps", MAPPED, "TrainConfig.eval_steps",
                "Evaluate every N updates whenever it is set, whatever eval_strategy says (TRL's behaviour). A "
                "float < 1 is a ratio of max_steps."),
    ArgumentRow("eval_strategy", MAPPED, "TrainConfig.eval_steps",
                "'steps' with eval_steps=None: TrainingArguments has already set eval_steps=logging_steps. 'no' "
                "does not switch off an explicit eval_steps (TRL's behaviour). 'epoch': ignored (warned)."),
    ArgumentRow("eval_delay", IGNORED, "-", "TRL never honoured it."),
    ArgumentRow("eval_on_start", IGNORED, "-", "TRL never honoured it; call trainer.evaluate() yourself."),
    ArgumentRow("save_steps", MAPPED, "TrainConfig.save_steps",
                "With save_strategy='steps', a step() call whose updates reach a multiple of save_steps ends by "
                "writing output_dir/checkpoint-N (N = global_step after the call): jaxsft's whole trainer state "
                "(weights, optimizer state, counters, log history, shuffling RNG), atomically. A float < 1 is a "
                "ratio of max_steps. TRL's step() never saved."),
    ArgumentRow("save_strategy", FACADE, "compat.IterativeSFTTrainer",
                "'steps' (TrainingArguments' default) saves as save_steps says; 'no' never saves; 'epoch' and "
                "'best' are ignored (warned): step() has no epochs and no best metric."),
    ArgumentRow("save_total_limit", MAPPED, "TrainConfig.save_total_limit",
                "Keeps the newest N checkpoint-* folders under output_dir (orbax CheckpointManager's "
                "max_to_keep); None keeps all."),
    ArgumentRow("load_best_model_at_end", IGNORED, "-", "No best-model tracking; checkpoints are kept by recency."),
    ArgumentRow("metric_for_best_model", IGNORED, "-", "No best-model tracking; checkpoints are kept by recency."),
    ArgumentRow("report_to", FACADE, "compat.IterativeSFTTrainer",
                "The named integrations (tensorboard, wandb, ...) are transformers' own callbacks, built with "
                "transformers.integrations.get_reporting_integration_callbacks as HF Trainer does: on_train_begin "
                "fires at the first update, then on_log, on_step_end and on_evaluate. on_train_end never fires "
                "(there is no end of training). TRL called on_log only, after the same setup."),
    ArgumentRow("include_num_input_tokens_seen", IGNORED, "-", "Not counted in the state (TRL never updated it)."),
    ArgumentRow("disable_tqdm", MAPPED, "TrainConfig.disable_tqdm",
                "None resolves as in TrainingArguments (off unless the log level is above WARN)."),
    ArgumentRow("output_dir", MAPPED, "TrainConfig.output_dir",
                "Default directory of save_model() and save_checkpoint(); the core writes the save_steps "
                "checkpoints there."),
    ArgumentRow("push_to_hub", IGNORED, "-", "Nothing is pushed automatically (TRL only created the repo)."),
    ArgumentRow("resume_from_checkpoint", FACADE, "compat.IterativeSFTTrainer",
                "A checkpoint-N folder, or True for the newest under output_dir: restored when the trainer is "
                "built (weights, optimizer state, global_step, log_history, RNG), so the next step() continues "
                "the saved run exactly. True with no checkpoint raises ValueError."),
    # --- IterativeSFTConfig ---------------------------------------------------------------------
    ArgumentRow("max_length", MAPPED, "TrainConfig.max_length",
                "Truncates along the sequence axis, on the texts path and the token path alike. TRL 0.23.1 "
                "sliced the batch axis on the token path, dropping examples (bug, not reproduced)."),
    ArgumentRow("truncation_mode", MAPPED, "TrainConfig.truncation_mode",
                "keep_end keeps the last max_length tokens, keep_start the first; validated at construction. The "
                "caller's tokenizer is not mutated (TRL set its truncation_side)."),
    ArgumentRow("optimize_device_cache", FACADE, "compat.IterativeSFTTrainer",
                "Frees accelerator memory after each step(), per trainer (TRL's flag was process-global)."),
    ArgumentRow("model_init_kwargs", FACADE, "compat.IterativeSFTTrainer", "Used when model is given as a string."),
    ArgumentRow("skip_nonfinite_updates", MAPPED, "TrainConfig.skip_nonfinite_updates",
                "IterativeSFTConfig only (jaxsft's NaN guard): an update whose loss or gradient norm is NaN/inf "
                "is skipped inside the compiled step and its NaN stays out of the logged loss. Off by default, "
                "as in HF Trainer."),
    ArgumentRow("max_nonfinite_in_a_row", MAPPED, "TrainConfig.max_nonfinite_in_a_row",
                "IterativeSFTConfig only: step() raises FloatingPointError after this many non-finite updates in "
                "a row (None: never)."),
)

# TrainingArguments fields (transformers 4.56-5.x) that do not change what step() trains:
# logging destinations, hub, distributed launch, evaluation internals, data-loader workers.
UNRELATED_FIELDS: frozenset[str] = frozenset({
    "_n_gpu", "accelerator_config", "batch_eval_metrics", "dataloader_in_order",
    "dataloader_multiprocessing_context", "dataloader_num_workers", "dataloader_persistent_workers",
    "dataloader_pin_memory", "dataloader_prefetch_factor", "ddp_backend", "ddp_broadcast_buffers",
    "ddp_bucket_cap_mb", "ddp_find_unused_parameters", "ddp_static_graph", "ddp_timeout", "debug", "do_eval",
    "do_predict", "do_train", "enable_jit_checkpoint", "eval_accumulation_steps", "eval_do_concat_batches",
    "eval_use_gather_object", "fp16_backend", "fp16_opt_level", "fsdp_config", "fsdp_min_num_params",
    "fsdp_transformer_layer_cls_to_wrap", "greater_is_better", "half_precision_backend", "hub_always_push",
    "hub_model_id", "hub_private_repo", "hub_revision", "hub_strategy", "hub_token", "ignore_data_skip",
    "include_for_metrics", "include_inputs_for_metrics", "include_tokens_per_second", "jit_mode_eval",
    "label_names", "length_column_name", "local_rank", "log_level", "log_level_replica", "log_on_each_node",
    "logging_dir", "mp_parameters", "no_cuda", "overwrite_output_dir", "past_index", "per_gpu_eval_batch_size",
    "per_gpu_train_batch_size", "prediction_loss_only", "project", "push_to_hub_model_id",
    "push_to_hub_organization", "push_to_hub_token", "ray_scope", "remove_unused_columns",
    "restore_callback_states_from_checkpoint", "run_name", "save_on_each_node", "save_only_model",
    "save_safetensors", "skip_memory_metrics", "torch_compile_backend", "torch_compile_mode",
    "torchdynamo", "tpu_metrics_debug", "tpu_num_cores", "trackio_bucket_id", "trackio_space_id",
    "trackio_static_space_id", "use_cache", "use_legacy_prediction_loop", "use_mps_device",
})

_ROWS = {row.field: row for row in ARGUMENTS}


def _plain(value: Any) -> Any:
    """Enum members (IntervalStrategy, OptimizerNames, ...) as their string values."""
    return value.value if isinstance(value, enum.Enum) else value


def _unset(value: Any) -> bool:
    return value in (None, False, "", "no", "none") or (isinstance(value, (list, tuple, dict)) and not value)


def _field_default(args: TrainingArguments, name: str) -> Any:
    field = type(args).__dataclass_fields__.get(name)
    if field is None:
        return None
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _is_default(args: TrainingArguments, name: str) -> bool:
    """Whether ``args.<name>`` still holds its default, seen through __post_init__'s normalisations."""
    value = _plain(getattr(args, name))
    if name == "report_to":  # normalised to the list of integrations to call
        names = [value] if isinstance(value, str) else list(value or [])
        return all(n in ("none", "None") for n in names)
    default = _plain(_field_default(args, name))
    if _unset(value) and _unset(default):
        return True
    return value == default


def _bad(name: str, value: Any, problem: str, fix: str) -> ValueError:
    return ValueError(f"TrainingArguments.{name}={value!r}: {problem}; {fix}.")


def _step_count(name: str, value: Any, max_steps: int) -> Optional[int]:
    """An HF steps field: None, an int, or a float < 1 meaning a ratio of max_steps (HF Trainer semantics)."""
    if value is None:
        return None
    if isinstance(value, float) and 0 < value < 1:
        if max_steps <= 0:
            raise _bad(name, value, "a value below 1 is a ratio of max_steps, but max_steps is not set",
                       f"set max_steps or pass an integer {name}")
        return max(1, math.ceil(max_steps * value))
    if isinstance(value, float):
        if not value.is_integer():
            raise _bad(name, value, "must be an integer when >= 1", f"pass e.g. {name}={int(value)}")
        return int(value)
    return value


def _warmup(args: TrainingArguments) -> tuple[int, float]:
    """(warmup_steps, warmup_ratio): transformers 5 folds the ratio into a float warmup_steps < 1."""
    steps = getattr(args, "warmup_steps", 0) or 0
    ratio = float(getattr(args, "warmup_ratio", 0.0) or 0.0)
    if isinstance(steps, float) and 0 < steps < 1:
        return 0, steps
    if steps >= 1:
        return int(steps), ratio
    return 0, ratio


def _sgd_momentum(args: TrainingArguments, optim: str, ignored: list[str]) -> float:
    """HF (transformers 5) reads SGD's momentum from optim_args; 4.x ignored optim_args there."""
    raw = getattr(args, "optim_args", None)
    if not raw:
        return 0.0
    major = int(transformers.__version__.split(".")[0])
    if optim != "sgd" or major < 5:
        ignored.append("optim_args")
        return 0.0
    parsed = {}
    for item in str(raw).replace(" ", "").split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise _bad("optim_args", raw, f"entry {item!r} is not key=value", "pass e.g. optim_args='momentum=0.9'")
        parsed[key] = value
    if parsed.get("nesterov", "false").lower() in ("true", "1", "yes"):
        raise _bad("optim_args", raw, "nesterov SGD is not supported by TrainConfig",
                   "drop nesterov, or pass a torch SGD optimizer via optimizers=(opt, sched)")
    if float(parsed.get("dampening", 0.0)) != 0.0:
        raise _bad("optim_args", raw, "SGD dampening is not supported", "drop dampening")
    unknown = set(parsed) - {"momentum", "nesterov", "dampening", "weight_decay"}
    if unknown:
        raise _bad("optim_args", raw, f"unknown SGD option(s) {sorted(unknown)}", "use momentum=<float>")
    return float(parsed.get("momentum", 0.0))


def training_arguments_to_config(
    args: TrainingArguments, *, max_length: Optional[int], truncation_mode: str
) -> tuple[TrainConfig, list[str]]:
    """Convert TrainingArguments (or IterativeSFTConfig) into a TrainConfig.

    ``max_length`` and ``truncation_mode`` come separately because a plain
    TrainingArguments lacks them (classic TRL took them as trainer kwargs).
    Returns the config and the names of fields that are set but not honoured
    (fate ``ignored``, plus ``fp16`` and ignored strategy values), in table
    order; the caller warns once per name, e.g. with
    :func:`ignored_argument_message`. Contradictions raise ValueError.
    """
    if not isinstance(args, TrainingArguments):
        raise TypeError(
            f"args must be a transformers.TrainingArguments or compat.IterativeSFTConfig - got {type(args)}; "
            "build one with IterativeSFTConfig(output_dir=...)."
        )
    ignored: list[str] = []
    fp16, bf16 = bool(args.fp16), bool(args.bf16)
    if fp16 and bf16:
        raise ValueError(
            "TrainingArguments.fp16=True and bf16=True: at most one may be set; jaxsft computes in bf16, so pass "
            "bf16=True and fp16=False."
        )
    if args.label_smoothing_factor and args.label_smoothing_factor > 0:
        raise _bad("label_smoothing_factor", args.label_smoothing_factor, "label smoothing is not supported",
                   "pass label_smoothing_factor=0.0")

    optim_name = str(_plain(args.optim))
    if optim_name not in OPTIM_NAMES:
        raise _bad("optim", optim_name, "this optimizer is not supported by jaxsft",
                   f"pick one of {', '.join(OPTIM_NAMES)}, or pass a torch AdamW/Adam/SGD or an optax "
                   "transformation as optimizers=(optimizer, scheduler)")
    optim = OPTIM_NAMES[optim_name]

    scheduler = str(_plain(args.lr_scheduler_type))
    if scheduler not in SCHEDULER_TYPES:
        raise _bad("lr_scheduler_type", scheduler, f"is not supported (supported: {', '.join(SCHEDULER_TYPES)})",
                   "pick one of those, or build the scheduler with transformers.get_scheduler and pass "
                   "optimizers=(optimizer, scheduler)")

    max_steps = int(args.max_steps)
    warmup_steps, warmup_ratio = _warmup(args)

    logging_strategy = str(_plain(args.logging_strategy))
    logging_steps = _step_count("logging_steps", args.logging_steps, max_steps)
    if logging_strategy == "no":
        logging_steps = 0
    eval_steps = _step_count("eval_steps", args.eval_steps, max_steps)
    # Periodic checkpoints are the core's (TrainConfig.save_steps); save_strategy other than "steps" saves nothing.
    save_steps = save_steps_of(args, max_steps) if str(_plain(getattr(args, "save_strategy", "steps"))) == "steps" else 0

    checkpointing = getattr(args, "activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = args.gradient_checkpointing

    sgd_momentum = 0.0
    for row in ARGUMENTS:  # table order
        if row.fate == IGNORED and hasattr(args, row.field) and not _is_default(args, row.field):
            ignored.append(row.field)
        elif row.field == "fp16" and fp16:
            ignored.append("fp16")
        elif row.field == "logging_strategy" and logging_strategy == "epoch":
            ignored.append("logging_strategy")
        elif row.field == "eval_strategy" and str(_plain(args.eval_strategy)) == "epoch":
            ignored.append("eval_strategy")
        elif row.field == "save_strategy" and str(_plain(getattr(args, "save_strategy", "steps"))) in ("epoch", "best"):
            ignored.append("save_strategy")
        elif row.field == "optim_args":
            sgd_momentum = _sgd_momentum(args, optim, ignored)

    config = TrainConfig(
        learning_rate=float(args.learning_rate),
        per_device_train_batch_size=int(args.per_device_train_batch_size),
        gradient_accumulation_steps=int(args.gradient_accumulation_steps),
        max_steps=max_steps,
        warmup_steps=warmup_steps,
        warmup_ratio=warmup_ratio,
        lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=dict(args.lr_scheduler_kwargs or {}),
        weight_decay=float(args.weight_decay),
        adam_beta1=float(args.adam_beta1),
        adam_beta2=float(args.adam_beta2),
        adam_epsilon=float(args.adam_epsilon),
        max_grad_norm=None if args.max_grad_norm is None else float(args.max_grad_norm),
        optim=optim,
        sgd_momentum=sgd_momentum,
        seed=int(args.seed),
        logging_steps=logging_steps,
        eval_steps=eval_steps,
        per_device_eval_batch_size=int(args.per_device_eval_batch_size),
        bf16=bf16 or fp16,
        gradient_checkpointing=bool(checkpointing),
        max_length=max_length,
        truncation_mode=truncation_mode,
        disable_tqdm=bool(args.disable_tqdm),
        skip_nonfinite_updates=getattr(args, "skip_nonfinite_updates", False),
        max_nonfinite_in_a_row=getattr(args, "max_nonfinite_in_a_row", None),
        output_dir=str(args.output_dir) if args.output_dir is not None else None,
        save_steps=save_steps if args.output_dir is not None else 0,
        save_total_limit=getattr(args, "save_total_limit", None),
    )
    return config, ignored


def save_steps_of(args: Any, max_steps: int) -> int:
    """``save_steps`` as a count of updates (a float below 1 is a ratio of ``max_steps``; 0 without one)."""
    value = getattr(args, "save_steps", 0) or 0
    if isinstance(value, float) and 0 < value < 1:
        return math.ceil(max_steps * value) if max_steps > 0 else 0
    return int(value)


def ignored_argument_message(args: TrainingArguments, name: str) -> str:
    """The warning text for one name returned by :func:`training_arguments_to_config`."""
    row = _ROWS[name]
    value = _plain(getattr(args, name, None))
    verb = "is approximated" if row.fate == APPROXIMATED else "is ignored"
    return f"{type(args).__name__}.{name}={value!r} {verb} by jaxsft: {row.note}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def arguments_table_markdown() -> str:
    """docs/compat_arguments.md, rendered from ARGUMENTS (a test keeps the file equal to this)."""
    lines = [
        "# TrainingArguments in the compat facade",
        "",
        "<!-- Generated by compat.arguments.arguments_table_markdown(); do not edit by hand. -->",
        "",
        "How `compat.IterativeSFTTrainer` treats each `TrainingArguments` / `IterativeSFTConfig` field that "
        "matters to training. Fates: **mapped** (honoured through `jaxsft.TrainConfig`), **facade** (honoured "
        "by the compat trainer itself), **approximated** (honoured in spirit, warned), **ignored** (no effect; "
        "one warning per trainer when set to a non-default value), **rejected** (a non-default value raises "
        "`ValueError`). Fields not listed (logging destinations, hub, distributed launch, data-loader workers, "
        "evaluation internals) do not change what `step()` trains.",
        "",
        "| field | fate | maps to | note |",
        "|---|---|---|---|",
    ]
    for row in ARGUMENTS:
        lines.append(f"| `{row.field}` | {row.fate} | {_cell(row.maps_to)} | {_cell(row.note)} |")
    return "\n".join(lines) + "\n"


def resume_path(args: Any) -> Optional[str]:
    """``args.resume_from_checkpoint`` as a folder: a path as given, True (or "true") the newest in output_dir."""
    from jaxsft.infra.checkpoint import latest_checkpoint

    value = getattr(args, "resume_from_checkpoint", None)
    if value is None or value is False:
        return None
    if value is True or (isinstance(value, str) and value.lower() == "true"):
        newest = latest_checkpoint(str(args.output_dir))
        if newest is None:
            raise ValueError(
                f"resume_from_checkpoint=True: no complete checkpoint-N folder in output_dir={str(args.output_dir)!r}; "
                "save one with trainer.save_checkpoint() (or save_steps), or pass the checkpoint's path."
            )
        return newest
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"resume_from_checkpoint must be a checkpoint folder path or True, got {type(value).__name__}.")
    return os.fspath(value)
