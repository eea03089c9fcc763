"""Training configuration for the JAX-native trainer.

``TrainConfig`` holds the loop, batching and logging fields itself and three
groups, each a small dataclass that validates its own fields:

* ``config.optimization`` (:class:`Optimization`): learning rate, schedule,
  optimizer, clipping, the NaN guard;
* ``config.precision`` (:class:`PrecisionAndMemory`): compute dtype,
  rematerialisation, loss chunking;
* ``config.performance`` (:class:`Performance`): attention kernel, layer loop,
  sequence buckets, XLA options.

Every group field is also a constructor keyword and an attribute of the config
itself, so ``TrainConfig(learning_rate=1e-5, bf16=True)`` and
``config.learning_rate`` work as with a flat dataclass (field names follow
``transformers.TrainingArguments`` wherever one exists, so the facade's mapping
is mostly identity). The value lives in its group only; the flat name is a
route to it, not a copy. Every check happens at construction, so a bad value
never reaches a compiled program.

The model-side knobs (compute dtype, remat, attention kernel, layer loop) are
turned into the model's :class:`~jaxsft.models.options.RunOptions` in one place,
:meth:`TrainConfig.run_options` (which takes the model's options and returns a copy:
this module imports nothing of ``jaxsft.models``, so host-side batching does not load it).
It imports no JAX at module level either (``run_options`` does, when called): the facade's config
(``compat.config``) takes its constants from here where only torch and transformers are installed.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Any, Mapping, Optional, Sequence

SCHEDULER_TYPES = ("linear", "cosine", "constant", "constant_with_warmup")
TRUNCATION_MODES = ("keep_end", "keep_start")
# Attention kernels a model can run (jaxsft.models.layers implements them; models.options re-exports this).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
# The label that marks a position without a loss (HF's and torch's ignore_index), for every module.
IGNORE_INDEX = -100
OPTIMIZERS = ("adamw", "adafactor", "sgd")
# Metrics sinks for ``report_to`` (jaxsft.infra.metrics writes them through the libraries themselves).
REPORT_TO = ("tensorboard", "wandb")

__all__ = [
    "TrainConfig", "Optimization", "PrecisionAndMemory", "Performance", "SCHEDULER_TYPES", "TRUNCATION_MODES",
    "OPTIMIZERS", "ATTENTION_IMPLEMENTATIONS",
]


def _bad(obj: Any, field: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"TrainConfig.{field}={getattr(obj, field)!r}: {problem}; {fix}.")


class ConfigTypeError(TypeError, ValueError):
    """A TrainConfig field of the wrong type. A ValueError too: a bad value is a bad value, whatever its kind."""


def _check_fields(obj: Any) -> None:
    """Types first (bools are not numbers, strings are not bools: bf16="no" must not turn bf16 on), then
    finiteness, for every field of ``obj``, naming the field. numpy scalars become plain Python values."""
    for field in dataclasses.fields(obj):
        if field.name not in _FIELD_KINDS:
            continue  # a group (checked by its own __post_init__)
        kind, optional = _FIELD_KINDS[field.name]
        value = getattr(obj, field.name)
        if value is None and optional:
            continue
        ok, normalised = _coerce(kind, value)
        if not ok:
            expected = ("None or " if optional else "") + _KIND_WORDS[kind]
            example = field.default if field.default is not dataclasses.MISSING else "..."
            raise ConfigTypeError(
                f"TrainConfig.{field.name}={value!r}: must be {expected}, got {type(value).__name__}; pass e.g. "
                f"{field.name}={example!r}."
            )
        if isinstance(normalised, float) and not math.isfinite(normalised):
            raise ValueError(
                f"TrainConfig.{field.name}={value!r}: must be a finite number (NaN and inf poison training, e.g. "
                f"NaN max_grad_norm silently turns clipping off); pass e.g. {field.name}={field.default!r}."
            )
        setattr(obj, field.name, normalised)


@dataclasses.dataclass
class Optimization:
    """How updates are computed: the optimizer, its schedule and gradient clipping (HF's defaults)."""

    learning_rate: float = 5e-5
    lr_scheduler_type: str = "linear"
    lr_scheduler_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The schedule's horizon in optimizer updates (-1: none); step() calls themselves are the caller's loop.
    max_steps: int = -1
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    optim: str = "adamw"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    sgd_momentum: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    # The NaN guard: an update whose loss or gradient norm is NaN/inf is skipped inside the
    # compiled step (weights and optimizer state untouched; stats["skipped_updates"] counts it;
    # global_step and the schedule still advance). Off by default, as in HF Trainer.
    skip_nonfinite_updates: bool = False
    # Stop step() with FloatingPointError once this many updates in a row had a non-finite loss or
    # gradient norm (counted across calls, saved in checkpoints; guard on or off). None: never stop.
    max_nonfinite_in_a_row: Optional[int] = None

    def __post_init__(self) -> None:
        _check_fields(self)
        if not 0.0 <= self.sgd_momentum <= 1.0:
            raise _bad(self, "sgd_momentum", "must lie in [0, 1]", "pass e.g. sgd_momentum=0.9")
        if self.max_steps < -1:
            raise _bad(self, "max_steps", "must be the number of optimizer updates, or -1 for no horizon",
                       "pass e.g. max_steps=-1")
        if self.max_nonfinite_in_a_row is not None and self.max_nonfinite_in_a_row < 1:
            raise _bad(self, "max_nonfinite_in_a_row", "must be None or an integer >= 1",
                       "pass e.g. max_nonfinite_in_a_row=3")
        if not all(isinstance(k, str) for k in self.lr_scheduler_kwargs):
            raise _bad(self, "lr_scheduler_kwargs", "must be a dict with str keys",
                       "pass e.g. lr_scheduler_kwargs={'num_cycles': 0.5}")
        _check_scheduler_kwargs(self.lr_scheduler_kwargs)
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate >= 0 and math.isfinite(self.learning_rate)):
            raise _bad(self, "learning_rate", "must be a finite number >= 0", "pass e.g. learning_rate=1e-5")
        if not isinstance(self.max_steps, int) or isinstance(self.max_steps, bool):
            raise _bad(self, "max_steps", "must be an integer", "pass the number of optimizer updates, or -1 for no horizon")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise _bad(self, "warmup_steps", "must be an integer >= 0", "pass e.g. warmup_steps=10")
        if not (0.0 <= float(self.warmup_ratio) <= 1.0):
            raise _bad(self, "warmup_ratio", "must lie in [0, 1]", "pass e.g. warmup_ratio=0.1")
        if self.lr_scheduler_type not in SCHEDULER_TYPES:
            raise _bad(self, "lr_scheduler_type", f"is not supported (supported: {', '.join(SCHEDULER_TYPES)})", "pick one of those")
        if self.weight_decay < 0:
            raise _bad(self, "weight_decay", "must be >= 0", "pass e.g. weight_decay=0.01")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise _bad(self, name, "must lie in [0, 1)", f"pass e.g. {name}=0.9")
        if self.adam_epsilon <= 0:
            raise _bad(self, "adam_epsilon", "must be > 0", "pass e.g. adam_epsilon=1e-8")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise _bad(self, "max_grad_norm", "must be >= 0 (0 or None turns clipping off)", "pass e.g. max_grad_norm=1.0")
        if self.optim not in OPTIMIZERS:
            raise _bad(self, "optim", f"is not supported (supported: {', '.join(OPTIMIZERS)})", "pick one of those")
        if not isinstance(self.skip_nonfinite_updates, bool):
            raise _bad(self, "skip_nonfinite_updates", "must be True or False", "pass e.g. skip_nonfinite_updates=True")

    @property
    def clipping_enabled(self) -> bool:
        """HF semantics: None or a value <= 0 means no clipping (TRL 0.23.1 zeroed gradients at 0)."""
        return self.max_grad_norm is not None and self.max_grad_norm > 0

    def num_warmup_steps(self) -> int:
        """``warmup_steps`` if set, else ``ceil(warmup_ratio * max_steps)`` (as TrainingArguments.get_warmup_steps)."""
        if self.warmup_steps > 0:
            return self.warmup_steps
        if self.max_steps > 0:
            return math.ceil(self.warmup_ratio * self.max_steps)
        return 0


@dataclasses.dataclass
class PrecisionAndMemory:
    """Numerics and activation memory: compute dtype, rematerialisation, loss chunking."""

    # bf16 compute with fp32 parameters and optimizer state; False: the model's own compute dtype.
    bf16: bool = False
    # Recompute each decoder layer's activations in the backward pass (jax.checkpoint).
    gradient_checkpointing: bool = False
    # Tokens per chunk of the fused lm_head + cross-entropy. None: the largest power of
    # two whose fp32 logits fit in ``loss_chunk_bytes`` (capped at a micro-batch's tokens).
    # Small chunks starve the lm_head matmuls (256-token chunks ran them at 330 TFLOP/s
    # on an H200, one 4096-token chunk at 783), so the default budget is generous.
    loss_chunk_size: Optional[int] = None
    loss_chunk_bytes: int = 3 << 30

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.loss_chunk_bytes < 1:
            raise _bad(self, "loss_chunk_bytes", "must be an integer >= 1", "pass e.g. loss_chunk_bytes=1 << 30")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise _bad(self, "loss_chunk_size", "must be None or >= 1", "pass e.g. loss_chunk_size=1024")


# The automatic layer loop unrolls models up to this depth (compile time grows with depth).
UNROLL_MAX_LAYERS = 48


@dataclasses.dataclass
class Performance:
    """Speed knobs that change no result: attention kernel, layer loop, compiled shapes, XLA options."""

    # auto: cuDNN flash attention on GPU in 16-bit compute, XLA elsewhere.
    attention_implementation: str = "auto"
    # True runs the layers as one scanned loop (compile time independent of depth); False
    # unrolls them: no stacked residual buffers or per-layer copies, and XLA can overlap each
    # layer's FSDP gathers and gradient reductions with compute. None (default): unrolled up to
    # UNROLL_MAX_LAYERS layers, scanned beyond (where unrolled compiles get long). On one H200 at
    # Qwen2.5-0.5B shape, unrolled trained 111k tokens/s against 89k scanned (benchmarks/RESULTS.md).
    scan_layers: Optional[bool] = None
    # Lay each micro-batch's examples end to end in as few rows as fit (segment ids
    # keep them apart in attention and loss): fewer padded tokens, same numbers. Pays off on
    # ragged step() calls; off, every example gets a row of its own. None (default): on where
    # measured faster, i.e. on GPU where cuDNN's ragged attention applies, off elsewhere
    # (jaxsft.training.fast_path.resolve_packing); True / False force either layout.
    packing: Optional[bool] = None
    # Sequence-length buckets (ascending). None: ``min_bucket_length`` times powers of two and, between them,
    # three halves of each (32, 48, 64, 96, 128, 192, ...) up to max_length, plus max_length itself: a length pads
    # by less than half, not by up to double (a 384-token sequence trained as 512 before, wherever max_length is
    # longer).
    length_buckets: Optional[Sequence[int]] = None
    min_bucket_length: int = 32
    # XLA compiler options for the train, eval and generation programs (``compile(compiler_options=...)``).
    # None: jaxsft's measured defaults for the backend and model width (jaxsft.infra.compile_options.BACKEND_DEFAULTS:
    # on GPU, cuBLAS for every matmul of models 768 or more wide); {}: XLA's own defaults. jaxsft.infra.compile_options.gpu_overlap_options()
    # is an opt-in preset for GPU communication/compute overlap.
    xla_options: Optional[dict[str, Any]] = None
    # Keep compiled programs on disk (JAX's persistent compilation cache, process-wide), so that a script's rerun
    # loads its train and generation programs instead of compiling them (most of a first step). The folder: None
    # is the process's own cache if it has one, else $JAXSFT_COMPILATION_CACHE_DIR or ~/.cache/jaxsft/xla
    # (jaxsft.infra.compile_cache). False leaves the process's cache as it is.
    compilation_cache: bool = True
    compilation_cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.min_bucket_length < 1:
            raise _bad(self, "min_bucket_length", "must be >= 1", "pass e.g. min_bucket_length=32")
        if self.length_buckets is not None:
            buckets = list(self.length_buckets)
            if not buckets or any(not _is_int(b) or b < 1 for b in buckets) or buckets != sorted(set(buckets)):
                raise _bad(self, "length_buckets", "must be strictly ascending positive integers", "pass e.g. (64, 128, 256)")
            self.length_buckets = tuple(int(b) for b in buckets)
        if self.packing is not None and not isinstance(self.packing, bool):
            raise _bad(self, "packing", "must be True, False or None (automatic)", "pass e.g. packing=None")
        if self.scan_layers is not None and not isinstance(self.scan_layers, bool):
            raise _bad(self, "scan_layers", "must be True, False or None (automatic)", "pass e.g. scan_layers=None")
        if self.xla_options is not None and (
            not isinstance(self.xla_options, dict) or not all(isinstance(k, str) for k in self.xla_options)
        ):
            raise _bad(self, "xla_options", "must be None or a dict of XLA option names to values",
                       "pass e.g. xla_options={'xla_gpu_enable_latency_hiding_scheduler': True}, or {} for XLA's defaults")
        if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise _bad(
                self, "attention_implementation",
                f"is not supported (supported: {', '.join(ATTENTION_IMPLEMENTATIONS)})", "pick one of those",
            )


GROUPS: dict[str, type] = {"optimization": Optimization, "precision": PrecisionAndMemory, "performance": Performance}
# flat field name -> the group that owns it (names are unique across groups and TrainConfig).
_OWNER: dict[str, str] = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}


@dataclasses.dataclass(init=False)
class TrainConfig:
    """Hyperparameters of :class:`jaxsft.IterativeSFTTrainer`.

    Build it with flat keywords (``TrainConfig(learning_rate=1e-5, bf16=True)``),
    with groups (``TrainConfig(optimization=Optimization(...))``), or both, the
    keywords applying on top of the groups (so ``dataclasses.replace(config,
    learning_rate=...)`` works). Defaults are Hugging Face's (AdamW lr 5e-5,
    betas 0.9/0.999, eps 1e-8, linear schedule, clipping at 1.0, seed 42) except
    ``logging_steps``, which uses IterativeSFTConfig's 10 because ``step()``
    calls are short.
    """

    # batching, loop and logging (the fields that belong to no group)
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    per_device_eval_batch_size: int = 8
    max_length: Optional[int] = None
    truncation_mode: str = "keep_end"
    # Completions (``texts_labels``, a chat's assistant turn) get the tokenizer's EOS appended when
    # they do not already end with it, so a model trained on kept samples learns to stop.
    add_eos: bool = True
    seed: int = 42
    logging_steps: int = 10
    eval_steps: Optional[int] = None
    disable_tqdm: bool = False
    # Multi-process only: how long a process waits for its peers to reach the same trainer call
    # before raising TimeoutError (a peer that died, or processes making different calls).
    agreement_timeout_s: float = 300.0
    # Training-mode dropout at the rates the model's HF config declares (T5 dropout_rate, BART dropout /
    # attention_dropout / activation_dropout, GPT-2 resid/embd/attn_pdrop, Llama-family attention_dropout),
    # as HF trains in model.train() mode. Never applied in evaluation or generation. False: off.
    dropout: bool = True
    # Where logged scalars go every logging_steps (and evaluations): None, "tensorboard", "wandb",
    # or a list of them; each needs its library (pip install 'jaxsft[tensorboard]' / 'jaxsft[wandb]').
    report_to: Any = None
    # TensorBoard event folder (W&B's run folder); None: runs/<date>_<time>_<host>, as torch and HF.
    logging_dir: Optional[str] = None
    # Periodic checkpoints: a step() call whose updates reach a multiple of save_steps ends by writing
    # output_dir/checkpoint-<global_step> (trainer.save_checkpoint); 0 never saves. save_total_limit keeps
    # the newest N of them (None: all).
    output_dir: Optional[str] = None
    save_steps: int = 0
    save_total_limit: Optional[int] = None
    # the groups
    optimization: Optimization = dataclasses.field(default_factory=Optimization)
    precision: PrecisionAndMemory = dataclasses.field(default_factory=PrecisionAndMemory)
    performance: Performance = dataclasses.field(default_factory=Performance)

    def __init__(self, **kwargs: Any) -> None:
        own = [f for f in dataclasses.fields(self) if f.name not in GROUPS]
        routed: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
        for name in [k for k in kwargs if k in _OWNER]:
            routed[_OWNER[name]][name] = kwargs.pop(name)
        for group, cls in GROUPS.items():
            given = kwargs.pop(group, None)
            if given is not None and not isinstance(given, cls):
                raise TypeError(f"TrainConfig.{group} must be a jaxsft.{cls.__name__}, got {type(given).__name__}.")
            value = dataclasses.replace(given, **routed[group]) if given is not None else cls(**routed[group])
            setattr(self, group, value)
        for f in own:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(self, f.name, kwargs.pop(f.name, default))
        if kwargs:
            raise TypeError(
                f"TrainConfig got unexpected keyword argument(s) {sorted(kwargs)}; the fields are "
                f"{', '.join(f.name for f in own)} and those of {', '.join(c.__name__ for c in GROUPS.values())}."
            )
        self._validate()

    def _validate(self) -> None:
        _check_fields(self)
        if not 0 <= self.seed < 2**63:
            raise _bad(self, "seed", "must be an integer in [0, 2**63)", "pass e.g. seed=42")
        if self.agreement_timeout_s <= 0:
            raise _bad(self, "agreement_timeout_s", "must be a number of seconds > 0", "pass e.g. agreement_timeout_s=300")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _bad(self, name, "must be an integer >= 1", f"pass e.g. {name}=1")
        if not isinstance(self.logging_steps, int) or self.logging_steps < 0:
            raise _bad(self, "logging_steps", "must be an integer >= 0 (0 turns logging off)", "pass e.g. logging_steps=10")
        if self.eval_steps is not None and (not isinstance(self.eval_steps, int) or self.eval_steps < 1):
            raise _bad(self, "eval_steps", "must be None or an integer >= 1", "pass e.g. eval_steps=50")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise _bad(self, "max_length", "must be None or an integer >= 2", "pass e.g. max_length=512")
        if not isinstance(self.dropout, bool):
            raise _bad(self, "dropout", "must be True or False", "pass dropout=False to train without dropout")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(
                f"truncation_mode must be either 'keep_end' or 'keep_start', got {self.truncation_mode}"
            )
        self.report_to = _report_to(self.report_to)
        if self.logging_dir is not None and not isinstance(self.logging_dir, (str, os.PathLike)):
            raise _bad(self, "logging_dir", "must be None or a folder path", "pass e.g. logging_dir='runs/exp1'")
        if self.output_dir is not None and not isinstance(self.output_dir, (str, os.PathLike)):
            raise _bad(self, "output_dir", "must be None or a folder path", "pass e.g. output_dir='runs/exp1'")
        if self.save_steps < 0:
            raise _bad(self, "save_steps", "must be an integer >= 0 (0 never saves)", "pass e.g. save_steps=100")
        if self.save_steps and self.output_dir is None:
            raise _bad(self, "save_steps", "needs output_dir (where checkpoint-N folders go)",
                       "pass output_dir='...' with it, or save_steps=0")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise _bad(self, "save_total_limit", "must be None (keep all) or an integer >= 1", "pass e.g. save_total_limit=3")

    def validate(self) -> None:
        """Re-run every check (the trainer calls it when it takes the config: a dict field such as
        ``lr_scheduler_kwargs`` can be changed in place, which no assignment check sees)."""
        for group, cls in GROUPS.items():
            value = getattr(self, group)
            if not isinstance(value, cls):
                raise TypeError(f"TrainConfig.{group} must be a jaxsft.{cls.__name__}, got {type(value).__name__}.")
            _revalidate(value)
        _revalidate(self)

    # ------------------------------------------------------------------ derived values
    @property
    def clipping_enabled(self) -> bool:
        return self.optimization.clipping_enabled

    def num_warmup_steps(self) -> int:
        return self.optimization.num_warmup_steps()

    def buckets(self, model_max_length: Optional[int] = None) -> tuple[int, ...]:
        """The finite set of padded sequence lengths a train step is compiled for."""
        return self._lengths(model_max_length, midpoints=True)

    def packed_row_lengths(self, model_max_length: Optional[int] = None) -> tuple[int, ...]:
        """The lengths a packed row may take: :meth:`buckets` without the three-halves midpoints (all of
        ``length_buckets`` when given). A packed layout chooses its row count as well as its length, so every
        length it may take multiplies the shapes a ragged loop compiles; on ``bench_speed.py``'s ragged workload the
        midpoints would add two programs (one first met after the warm-up calls) to save 2.7 % of the padded tokens."""
        return self._lengths(model_max_length, midpoints=False)

    def _lengths(self, model_max_length: Optional[int], *, midpoints: bool) -> tuple[int, ...]:
        limit = self.max_length or model_max_length
        if limit is None:
            raise ValueError(
                "TrainConfig.max_length is None and the model declares no max_position_embeddings; "
                "pass max_length=... so the trainer knows its largest sequence bucket."
            )
        if self.length_buckets is not None:
            return tuple([b for b in self.length_buckets if b < limit] + [limit])
        lengths = []
        size = self.min_bucket_length
        while size < limit:
            lengths.append(size)
            if midpoints and size % 2 == 0 and size * 3 // 2 < limit:
                lengths.append(size * 3 // 2)
            size *= 2
        return tuple(lengths + [limit])

    def run_options(self, model: "RunOptions", *, num_layers: int = 0) -> "RunOptions":
        """The model's compute options for training: the one place each model-side knob is decided.

        * dtype: bf16 when ``bf16``, else the model's own compute dtype;
        * remat: ``gradient_checkpointing`` (the model's remat policy is kept);
        * attention: ``attention_implementation`` unless it is "auto", which keeps the model's;
        * layer loop: ``scan_layers``, or when None unrolled for models of at most
          ``UNROLL_MAX_LAYERS`` layers (faster on one device and on FSDP meshes; benchmarks/RESULTS.md);
        * dropout: ``dropout`` (the HF config's rates, in training steps only).
        """
        import jax.numpy as jnp  # here, not at the top: the module's constants import without JAX

        return dataclasses.replace(
            model,
            dtype=jnp.dtype(jnp.bfloat16) if self.bf16 else model.dtype,
            remat=bool(self.gradient_checkpointing),
            attention_implementation=(
                model.attention_implementation if self.attention_implementation == "auto" else self.attention_implementation
            ),
            scan_layers=bool(self.scan_layers if self.scan_layers is not None else num_layers > UNROLL_MAX_LAYERS),
            dropout=bool(self.dropout),
        )


def _check_scheduler_kwargs(kwargs: dict[str, Any]) -> None:
    """Every scheduler argument a finite number (``num_cycles=nan`` would silently make the rate 0)."""
    for key, value in kwargs.items():
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(
                f"TrainConfig.lr_scheduler_kwargs[{key!r}]={value!r}: must be a finite number (a NaN or inf here "
                f"silently breaks the learning-rate schedule); pass e.g. lr_scheduler_kwargs={{'num_cycles': 0.5}}."
            )


# ------------------------------------------------------------------------------------------ optimizer descriptions
# What the TRL facade reads from torch objects, as plain data; jaxsft.training.optim builds the chain and the schedule.
TORCH_OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULE_RULE_NAMES = ("step", "multistep", "exponential", "constant", "linear", "polynomial", "cosine_annealing")


@dataclasses.dataclass(frozen=True)
class OptimizerDescription:
    """A torch AdamW / Adam / SGD as hyperparameters (:func:`jaxsft.training.optim.build_optimizer` makes the chain).

    ``decay``: parameter name (a "/"-joined path, matched by its longest prefix, e.g. ``layers/q_proj``)
    -> whether weight decay applies; None applies ``weight_decay`` to every parameter.
    ``learning_rate`` is the optimizer's own rate (the constant one when no schedule is described).
    """

    kind: str  # one of TORCH_OPTIMIZERS
    learning_rate: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    nesterov: bool = False
    decay: Optional[Mapping[str, bool]] = None

    def __post_init__(self) -> None:
        if self.kind not in TORCH_OPTIMIZERS:
            raise ValueError(f"OptimizerDescription kind={self.kind!r}: pick one of {', '.join(TORCH_OPTIMIZERS)}.")


@dataclasses.dataclass(frozen=True)
class ScheduleDescription:
    """A learning-rate schedule as data (:func:`jaxsft.training.optim.build_schedule` makes its ``TableSchedule``).

    Either ``table`` (float64 rates for update counts 0, 1, ...; the last one held past it), or a
    closed-form ``rule`` (one of ``SCHEDULE_RULE_NAMES`` with its ``parameters``), evaluated at epoch
    ``start + count``: tabulated in float64 for ``length`` counts, then the fp32 formula.
    """

    table: Optional[tuple[float, ...]] = None
    rule: Optional[str] = None
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    start: int = 0
    length: int = 1

    def __post_init__(self) -> None:
        if (self.table is None) == (self.rule is None):
            raise ValueError("ScheduleDescription: give either table= or rule=, not both or neither.")
        if self.rule is not None and self.rule not in SCHEDULE_RULE_NAMES:
            raise ValueError(f"ScheduleDescription rule={self.rule!r}: pick one of {', '.join(SCHEDULE_RULE_NAMES)}.")


def _report_to(value: Any) -> tuple[str, ...]:
    """None / "none" / a sink name / a sequence of names -> a tuple of sink names, or ValueError naming the field."""
    if value is None:
        return ()
    names = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or (name not in REPORT_TO and name != "none"):
            raise ValueError(
                f"TrainConfig.report_to={value!r}: {name!r} is not a supported sink; pass None, "
                f"{' or '.join(repr(n) for n in REPORT_TO)}, or a list of them."
            )
        if name != "none" and name not in out:
            out.append(name)
    return tuple(out)


def _route(name: str) -> property:
    group = _OWNER[name]

    def get(self: TrainConfig) -> Any:
        return getattr(getattr(self, group), name)

    def put(self: TrainConfig, value: Any) -> None:
        setattr(getattr(self, group), name, value)

    return property(get, put, doc=f"``{group}.{name}`` (a route to the group's field, not a copy).")


for _name in _OWNER:
    if hasattr(TrainConfig, _name):
        raise TypeError(f"TrainConfig: field {_name!r} is defined twice")  # names must stay unique
    setattr(TrainConfig, _name, _route(_name))
del _name


# ------------------------------------------------------------------------------------------ checked assignment
# A config is checked at construction and at every later assignment (``config.weight_decay = nan`` is
# refused and the old value kept), so it cannot be put into a state its constructor would refuse.
_READY = "_jaxsft_checked"


def _revalidate(obj: Any) -> None:
    """Run ``obj``'s construction checks again (they may normalise values: plain setattr meanwhile)."""
    ready = obj.__dict__.get(_READY, False)
    object.__setattr__(obj, _READY, False)
    try:
        if isinstance(obj, TrainConfig):
            obj._validate()
        else:
            obj.__post_init__()
    finally:
        object.__setattr__(obj, _READY, ready)


def _checked_setattr(self: Any, name: str, value: Any) -> None:
    if not self.__dict__.get(_READY, False) or isinstance(getattr(type(self), name, None), property):
        object.__setattr__(self, name, value)  # during construction, or a flat route (its group checks)
        return
    if name in GROUPS and isinstance(self, TrainConfig) and not isinstance(value, GROUPS[name]):
        raise TypeError(f"TrainConfig.{name} must be a jaxsft.{GROUPS[name].__name__}, got {type(value).__name__}.")
    missing = object()
    old = self.__dict__.get(name, missing)
    object.__setattr__(self, name, value)
    try:
        _revalidate(self)
    except BaseException:
        if old is missing:
            object.__delattr__(self, name)
        else:
            object.__setattr__(self, name, old)
        raise


def _checked_init(init: Any) -> Any:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        object.__setattr__(self, _READY, False)
        init(self, *args, **kwargs)
        object.__setattr__(self, _READY, True)

    __init__.__doc__, __init__.__wrapped__ = init.__doc__, init
    return __init__


for _cls in (Optimization, PrecisionAndMemory, Performance, TrainConfig):
    _cls.__init__ = _checked_init(_cls.__init__)
    _cls.__setattr__ = _checked_setattr
del _cls


# ------------------------------------------------------------------------------------------ field types
def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _coerce(kind: str, value: Any) -> tuple[bool, Any]:
    """(accepted?, value as a plain Python object). numpy scalars are accepted and converted."""
    import numpy as np

    if kind == "int":
        return (True, int(value)) if _is_int(value) else (False, value)
    if kind == "float":
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return (True, float(value)) if ok else (False, value)
    if kind == "bool":
        return (True, bool(value)) if isinstance(value, (bool, np.bool_)) else (False, value)
    if kind == "str":
        return isinstance(value, str), value
    if kind == "dict":
        return isinstance(value, dict), value
    if kind == "sinks":  # report_to: a sink name or a list of them (the names are checked by _report_to)
        ok = isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))
        return ok, value
    if kind == "path":
        return isinstance(value, (str, os.PathLike)), value
    if kind == "ints":
        return isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1), value
    raise AssertionError(kind)


_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string",
               "dict": "a dict", "ints": "a sequence of integers", "sinks": "a sink name ('tensorboard' or 'wandb') or a list of them",
               "path": "a folder path"}

# Every field of TrainConfig and its groups: (kind, None allowed). A field missing here fails
# tests/test_bad_inputs.py::test_every_config_field_has_a_type_rule.
_FIELD_KINDS: dict[str, tuple[str, bool]] = {
    "learning_rate": ("float", False), "per_device_train_batch_size": ("int", False),
    "gradient_accumulation_steps": ("int", False), "max_steps": ("int", False), "warmup_steps": ("int", False),
    "warmup_ratio": ("float", False), "lr_scheduler_type": ("str", False), "lr_scheduler_kwargs": ("dict", False),
    "weight_decay": ("float", False), "adam_beta1": ("float", False), "adam_beta2": ("float", False),
    "adam_epsilon": ("float", False), "max_grad_norm": ("float", True), "skip_nonfinite_updates": ("bool", False),
    "max_nonfinite_in_a_row": ("int", True), "optim": ("str", False), "sgd_momentum": ("float", False),
    "seed": ("int", False), "logging_steps": ("int", False), "eval_steps": ("int", True),
    "per_device_eval_batch_size": ("int", False), "bf16": ("bool", False), "gradient_checkpointing": ("bool", False),
    "max_length": ("int", True), "truncation_mode": ("str", False), "add_eos": ("bool", False),
    "length_buckets": ("ints", True),
    "min_bucket_length": ("int", False), "loss_chunk_size": ("int", True), "loss_chunk_bytes": ("int", False),
    "attention_implementation": ("str", False), "scan_layers": ("bool", True), "xla_options": ("dict", True),
    "compilation_cache": ("bool", False), "compilation_cache_dir": ("path", True),
    "disable_tqdm": ("bool", False), "agreement_timeout_s": ("float", False), "packing": ("bool", True), "dropout": ("bool", False),
    "report_to": ("sinks", True), "logging_dir": ("path", True), "output_dir": ("path", True),
    "save_steps": ("int", False), "save_total_limit": ("int", True),
}
