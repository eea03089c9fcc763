"""``IterativeSFTConfig``: TRL 0.23.1's config class, rebuilt on the installed transformers.

TRL deleted this class in 0.24, so the facade carries its own copy. Field names,
defaults and the ``truncation_mode`` message are TRL's, so code written for TRL
constructs it unchanged. Two deliberate differences, both so that the default
``IterativeSFTConfig(output_dir=...)`` works everywhere:

* ``bf16=None`` resolves to ``not fp16`` as in TRL, but falls back to ``False``
  when TrainingArguments would reject bf16 on this machine (TRL raises
  "Your setup doesn't support bf16/gpu" on a CPU-only host).
* ``gradient_checkpointing`` defaults to ``True`` as in TRL (which never applied
  it); jaxsft honours it with rematerialisation. On transformers 5 the value is
  set through ``activation_checkpointing``, the new name, so no deprecation
  warning is raised for a default the user never wrote.

Works with transformers 4.56+ and 5.x: version-specific fields are only read
through ``getattr``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import transformers
from transformers import TrainingArguments

# TRL 0.23.1's choices for IterativeSFTConfig.truncation_mode (its message below) are jaxsft's: one definition,
# in jaxsft.infra.config, which imports without JAX (this module must: the TRL reference venv checks it under
# transformers 4.57 with no JAX installed).
from jaxsft.infra.config import TRUNCATION_MODES


def _bf16_supported(args: TrainingArguments) -> bool:
    """The predicate TrainingArguments.__post_init__ uses (4.56-5.x) to accept ``bf16=True``."""
    if getattr(args, "use_cpu", False):
        return True
    utils = transformers.utils
    for name in ("is_torch_bf16_gpu_available", "is_torch_xla_available"):
        probe = getattr(utils, name, None)
        if probe is not None and probe():
            return True
    return False


@dataclasses.dataclass
class IterativeSFTConfig(TrainingArguments):
    """TrainingArguments plus TRL's IterativeSFT fields (defaults as TRL 0.23.1).

    Args beyond TrainingArguments:
        model_init_kwargs: kwargs for ``from_pretrained`` when the trainer gets a model id.
        max_length: longest sequence in tokens; longer inputs are truncated per ``truncation_mode``.
        truncation_mode: ``"keep_end"`` (drop tokens from the start) or ``"keep_start"``.
        optimize_device_cache: free accelerator memory after every ``step()``.
        skip_nonfinite_updates, max_nonfinite_in_a_row: jaxsft's NaN guard (see ``jaxsft.TrainConfig``).
    """

    _VALID_DICT_FIELDS = list(TrainingArguments._VALID_DICT_FIELDS) + ["model_init_kwargs"]

    model_init_kwargs: Optional[dict[str, Any]] = dataclasses.field(
        default=None,
        metadata={"help": "Keyword arguments for `from_pretrained` when `model` is a string."},
    )
    max_length: Optional[int] = dataclasses.field(
        default=None,
        metadata={"help": "Maximum length of the tokenized sequence; longer sequences are truncated."},
    )
    truncation_mode: str = dataclasses.field(
        default="keep_end",
        metadata={"help": "Which end to keep when truncating: 'keep_end' or 'keep_start'."},
    )
    optimize_device_cache: bool = dataclasses.field(
        default=False,
        metadata={"help": "Free accelerator memory after each step() call."},
    )
    # jaxsft additions (not in TRL): the NaN guard, reachable from the facade's config.
    skip_nonfinite_updates: bool = dataclasses.field(
        default=False,
        metadata={"help": "Skip (inside the compiled step) any update whose loss or gradient norm is NaN/inf."},
    )
    max_nonfinite_in_a_row: Optional[int] = dataclasses.field(
        default=None,
        metadata={"help": "Raise FloatingPointError after this many non-finite updates in a row (None: never)."},
    )
    # TRL overrides of TrainingArguments defaults.
    logging_steps: float = dataclasses.field(
        default=10,
        metadata={"help": "Log every X updates (an int), or a ratio of max_steps if < 1."},
    )
    bf16: Optional[bool] = dataclasses.field(
        default=None,
        metadata={"help": "bf16 compute. None: `not fp16`, or False where this machine rejects bf16."},
    )
    gradient_checkpointing: Optional[bool] = dataclasses.field(
        default=None,
        metadata={"help": "Recompute activations in the backward pass. None: True (TRL's default)."},
    )

    def __post_init__(self) -> None:
        self._resolve_gradient_checkpointing()
        resolved_bf16 = self.bf16 is None
        if resolved_bf16:
            self.bf16 = (not self.fp16) and _bf16_supported(self)
        try:
            super().__post_init__()
        except ValueError as err:
            # Our own default was rejected by a check the predicate did not foresee: drop it.
            if not (resolved_bf16 and self.bf16 and "bf16" in str(err)):
                raise
            self.bf16 = False
            super().__post_init__()
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(
                f"truncation_mode must be either 'keep_end' or 'keep_start', got {self.truncation_mode}"
            )
        if self.max_length is not None and (
            isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1
        ):
            raise ValueError(
                f"IterativeSFTConfig.max_length={self.max_length!r}: must be None or a positive integer; "
                "pass e.g. max_length=512."
            )

    def _resolve_gradient_checkpointing(self) -> None:
        """TRL's default of True, written to the field this transformers version reads."""
        if self.gradient_checkpointing is not None:
            return
        if hasattr(self, "activation_checkpointing"):  # transformers 5: the new name
            if self.activation_checkpointing is None:
                self.activation_checkpointing = True
        else:
            self.gradient_checkpointing = True
