"""What an rft run writes: the per-round table, results.json and the accuracy plot with a ±1 s.e. band.

Every file is rewritten whole at the end of each round (results.json via a temporary file and a
rename, so a reader or a resumed run never sees half a file).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Optional


@dataclasses.dataclass
class RoundResult:
    round: int
    accuracy: float  # greedy accuracy on the held-out set
    stderr: float = 0.0  # one standard error of that accuracy: sqrt(p (1 - p) / n)
    kept: int = 0  # new samples kept this round
    sampled: int = 0
    trained_on: int = 0  # samples in this round's training pass (all kept so far with replay)
    loss: float = float("nan")
    gen_tokens_per_second: float = float("nan")
    train_tokens_per_second: float = float("nan")
    seconds: float = 0.0
    global_step: int = 0  # the trainer's optimizer updates so far (from the start of training, or of the reset)


def standard_error(accuracy: float, n: int) -> float:
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n) if n else 0.0


HEADER = ("| round | held-out acc | ± s.e. | kept / sampled | trained on | loss | gen tok/s | train tok/s | seconds |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table_row(h: RoundResult) -> str:
    kept = f"{h.kept} / {h.sampled}" if h.sampled else "-"
    return (f"| {h.round} | {h.accuracy:.1%} | {h.stderr:.1%} | {kept} | {h.trained_on if h.sampled else '-'} "
            f"| {_fmt(h.loss, '.4f')} | {_fmt(h.gen_tokens_per_second, '.0f')} "
            f"| {_fmt(h.train_tokens_per_second, '.0f')} | {h.seconds:.1f} |")


def table(history: list[RoundResult]) -> str:
    return "\n".join([HEADER] + [table_row(h) for h in history])


def finite(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def from_json(row: dict) -> RoundResult:
    return RoundResult(**{k: (float("nan") if v is None else v) for k, v in row.items()})


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=lambda x: None if isinstance(x, float) else str(x)))
    os.replace(tmp, path)


def figure(history: list[RoundResult], title: str) -> Any:
    """A matplotlib figure of held-out accuracy per round with a shaded ±1 standard-error band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    rounds = [h.round for h in history]
    acc = [100 * h.accuracy for h in history]
    se = [100 * h.stderr for h in history]
    ax.fill_between(rounds, [a - s for a, s in zip(acc, se)], [a + s for a, s in zip(acc, se)], alpha=0.25,
                    label="±1 s.e.")
    ax.plot(rounds, acc, marker="o", label="held-out accuracy")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(rounds)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot(history: list[RoundResult], path: Path, title: str) -> Path:
    """Write :func:`figure` as a PNG (atomically)."""
    import matplotlib.pyplot as plt

    fig = figure(history, title)
    tmp = path.with_name("." + path.name)
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
