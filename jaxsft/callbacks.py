"""The trainer's event protocol and what ``compute_metrics`` receives (no dependencies, so sinks can import it)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class TrainerCallback:
    """Hooks the trainer fires; override what you need (the facade bridges HF callbacks here).

    ``step()`` reports an update's events in order (its evaluation, its log, ``on_step_end``) after
    the call's updates have run, so each event carries the number of the update it belongs to
    (``step``; logs also hold it as ``logs["step"]``); ``trainer.state.global_step`` is already the
    call's last one then. Log dicts are the trainer's own ``log_history`` entries: read, don't modify.
    """

    def on_log(self, trainer: "IterativeSFTTrainer", logs: dict[str, Any]) -> None: ...

    def on_step_end(self, trainer: "IterativeSFTTrainer", step: int) -> None: ...

    def on_evaluate(self, trainer: "IterativeSFTTrainer", metrics: dict[str, Any], step: int) -> None: ...


class EvalPrediction(NamedTuple):
    """What ``compute_metrics`` receives: numpy predictions and labels, padded with -100 to one length.

    Unpacks as ``predictions, label_ids = prediction``, like ``transformers.EvalPrediction``.
    """

    predictions: Any
    label_ids: np.ndarray


__all__ = ["EvalPrediction", "TrainerCallback"]
