"""Checks of the trainer's constructor arguments that are not the config's: each names the argument,
what was wrong and the fix, and runs before any state exists (``IterativeSFTTrainer.__init__`` calls
:func:`check_trainer_arguments` inside its agreed checks; :func:`check_built_optimizer` where an
``optimizer=`` factory's result is first seen)."""

from __future__ import annotations

import os
from typing import Any

import optax


def check_trainer_arguments(tokenizer: Any, compute_metrics: Any, preprocess_logits_for_metrics: Any) -> None:
    """A tokenizer object (not a hub name: jaxsft never downloads) and callables where callables go."""
    if isinstance(tokenizer, (str, bytes, os.PathLike)):
        raise TypeError(
            f"tokenizer={tokenizer!r} is a name or path, not a tokenizer; jaxsft never downloads. Pass a tokenizer "
            "object, e.g. transformers.AutoTokenizer.from_pretrained(<local folder>), or None."
        )
    if tokenizer is not None and not callable(tokenizer):
        raise TypeError(
            f"tokenizer must be a tokenizer object (callable on texts, like transformers' tokenizers) or None, got "
            f"{type(tokenizer).__name__}."
        )
    for name, value, shape in (
        ("compute_metrics", compute_metrics, "EvalPrediction -> dict of metrics"),
        ("preprocess_logits_for_metrics", preprocess_logits_for_metrics, "(logits, labels) -> array"),
    ):
        if value is not None and not callable(value):
            raise TypeError(f"{name}={value!r:.60} is not callable; pass a function {shape}, or None.")


def check_built_optimizer(built: Any) -> optax.GradientTransformation:
    """What an ``optimizer=`` factory returned must be an optax transformation."""
    if not isinstance(built, optax.GradientTransformation):
        raise TypeError(
            f"optimizer: the function passed as optimizer= returned {type(built).__name__}, not an "
            "optax.GradientTransformation; return e.g. optax.adamw(schedule), or pass the transformation itself."
        )
    return built
