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


def check_callbacks(callbacks: Any) -> None:
    """A list of objects with the three hooks, or a TypeError naming the one that is not."""
    if isinstance(callbacks, TrainerCallback) or not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks must be a list of jaxsft TrainerCallback objects, got {type(callbacks).__name__}.")
    for i, callback in enumerate(callbacks):
        missing = [h for h in ("on_log", "on_step_end", "on_evaluate") if not callable(getattr(callback, h, None))]
        if missing:
            raise TypeError(
                f"callbacks[{i}] ({type(callback).__name__}) lacks {', '.join(missing)}; subclass "
                "jaxsft.training.trainer.TrainerCallback and override the hooks you need."
            )


def notify(trainer: Any, callbacks: Any, events: Any) -> None:
    """Fire the hooks for a call's events in order: ("eval" | "log" | "step_end", entry, extra) each.

    ``on_log`` fires on process 0 only (as HF logs on the main process); the others on every process.
    """
    import jax

    main = jax.process_index() == 0
    for kind, entry, extra in events:
        if kind in ("eval", "log") and main:
            for callback in callbacks:
                callback.on_log(trainer, entry)
        if kind == "eval":
            for callback in callbacks:
                callback.on_evaluate(trainer, extra, entry["step"])
        if kind == "step_end":  # entry: the update's step
            for callback in callbacks:
                callback.on_step_end(trainer, entry)
