"""What a step() call reports: log entries and callback events in HF's order, non-finite warnings, the stats dict.

Pure host functions of the call's fetched metrics and the trainer's host state; the trainer stores and
announces what they return (collect, then apply, then notify), so a callback that raises cannot leave the
state half-done.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np


def finite_update(metrics: dict[str, Any]) -> bool:
    return bool(np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"])))


def collect_logs(
    state: Any, config: Any, learning_rate_at: Callable[[int], Optional[float]], applied_steps: Sequence[int],
    host_metrics: Sequence[dict], eval_metrics: dict[int, dict[str, float]],
) -> tuple[list, Optional[str], dict[str, Any]]:
    """The call's log entries and callback events in HF's order, and the logging position after them.

    Pure: nothing is stored here (see step()'s collect/apply/notify); ``state`` is the trainer's host state.
    Returns (events, stop message or None, host fields to store).
    """
    cfg = config
    pending = list(state.loss_since_log)
    last_logged = state.last_logged_step
    in_a_row = state.nonfinite_in_a_row  # (no update: unchanged)
    stopped = None
    events: list[tuple[str, Any, Any]] = []
    for step_number, metrics in zip(applied_steps, host_metrics):
        finite = finite_update(metrics)
        in_a_row = int(metrics["nonfinite_in_a_row"])  # the device state's streak after this update
        if finite or not bool(metrics.get("skipped", False)):
            pending.append(float(metrics["loss"]))  # a skipped update's NaN never enters the logged loss
        if step_number in eval_metrics:  # measured right after this update, reported before its log (as HF)
            events.append(("eval", {**eval_metrics[step_number], "step": step_number}, eval_metrics[step_number]))
        if cfg.logging_steps and step_number % cfg.logging_steps == 0:
            logs: dict[str, Any] = {}
            if pending:
                logs["loss"] = round(float(np.mean(pending)), 4)
            logs["grad_norm"] = float(metrics["grad_norm"])
            rate = learning_rate_at(step_number)  # the rate after this update's scheduler step, as HF logs
            if rate is not None:
                logs["learning_rate"] = rate
            skipped_since = (step_number - last_logged) - len(pending)
            if skipped_since > 0:
                logs["skipped_updates"] = skipped_since
            logs["step"] = step_number
            events.append(("log", logs, None))
            pending, last_logged = [], step_number
        events.append(("step_end", step_number, None))
        limit = cfg.max_nonfinite_in_a_row
        if limit is not None and in_a_row >= limit and stopped is None:
            stopped = (
                f"step(): {in_a_row} updates in a row (up to global step {step_number}) had a non-finite loss or "
                f"gradient norm (TrainConfig.max_nonfinite_in_a_row={limit}); training was stopped. The state is "
                "consistent: restore the last good checkpoint and lower the learning rate, enable clipping, or "
                "check the data."
            )
    host = {"loss_since_log": pending, "last_logged_step": last_logged, "nonfinite_in_a_row": in_a_row}
    return events, stopped, host



def warn_nonfinite(host_metrics: Sequence[dict]) -> int:
    """Warn about the call's non-finite updates (skipped or applied); returns how many were skipped."""
    finite = [m for m in host_metrics if finite_update(m)]
    skipped = sum(bool(m.get("skipped", False)) for m in host_metrics)
    if skipped:
        warnings.warn(
            f"step(): {skipped} of {len(host_metrics)} updates had a non-finite loss or gradient norm and were "
            "skipped (skip_nonfinite_updates=True): weights and optimizer state were left as they were.",
            stacklevel=3,
        )
    elif len(finite) < len(host_metrics):
        warnings.warn(
            f"step(): {len(host_metrics) - len(finite)} of {len(host_metrics)} updates had a non-finite loss or "
            "gradient norm and were applied, so the weights may now hold NaN/inf. Set "
            "TrainConfig(skip_nonfinite_updates=True) to skip such updates.",
            stacklevel=3,
        )
    return skipped


def step_stats(host_metrics: Sequence[dict], *, skipped: int, weighted: bool, **fields: Any) -> dict[str, Any]:
    """step()'s stats: the call's loss (its summed loss over its summed denominator, a skipped update's NaN
    left out; 0.0 when nothing trained), each update's loss, and the counts in ``fields``."""
    counted = [m for m in host_metrics if finite_update(m)] if skipped else host_metrics
    denominator = sum(float(m["denominator"]) for m in counted)
    loss_sum = sum(float(m["loss_sum"]) for m in counted)
    stats = {
        "loss": loss_sum / denominator if denominator else 0.0,
        "learning_rate": fields.pop("learning_rate"),
        "grad_norm": float(host_metrics[-1]["grad_norm"]) if host_metrics else None,
        "num_tokens": fields.pop("num_tokens"),
        # Each update's exact loss (its token-loss sum over its label tokens), unrounded.
        "update_losses": [float(m["loss"]) for m in host_metrics],
        "num_updates": len(host_metrics),
        "skipped_updates": skipped,
        **fields,
    }
    if weighted:  # the label tokens as the loss counted them (each example's tokens times its weight)
        stats["weighted_num_tokens"] = sum(float(m["denominator"]) for m in host_metrics)
    return stats


def progress_bar(config: Any, total: int):
    """A tqdm bar over a call's updates (process 0, 8 updates or more, unless ``disable_tqdm``), else None."""
    import jax

    if config.disable_tqdm or total < 8 or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="jaxsft step", unit="update", leave=False)
