"""Scalars where users look: TensorBoard event files and Weights & Biases runs, through the libraries themselves.

``TrainConfig.report_to`` names the sinks; the trainer adds one :class:`ScalarWriter`
callback per sink, and each writes every numeric entry the trainer logs (training
logs every ``logging_steps``, evaluations) at that entry's ``step``. Tags follow HF
Trainer's integrations (``train/loss``, ``train/learning_rate``, ``eval/loss``), so a
run of the TRL facade and one of the JAX API read the same. Only process 0 logs.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import os
import socket
import time
from typing import Any, Optional, Sequence

_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_installed(names: Sequence[str]) -> None:
    """ImportError naming the extra for every sink whose library is missing (before the trainer changes anything)."""
    for name in names:
        if importlib.util.find_spec(_PACKAGE[name]) is None:
            raise ImportError(
                f"TrainConfig.report_to includes {name!r}, but the {_PACKAGE[name]} package is not installed; "
                f"install it with pip install 'jaxsft[{name}]', or drop {name!r} from report_to."
            )


def default_logging_dir() -> str:
    """``runs/<date>_<time>_<host>``, the folder torch's SummaryWriter and HF Trainer default to."""
    stamp = datetime.datetime.now().strftime("%b%d_%H-%M-%S")
    return os.path.join("runs", f"{stamp}_{socket.gethostname()}")


def scalar_tags(logs: dict[str, Any]) -> dict[str, float]:
    """HF's tag names: ``eval_x`` -> ``eval/x``, anything else -> ``train/x``; non-numbers and ``step`` dropped."""
    out = {}
    for key, value in logs.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return out


class ScalarWriter:
    """Base of the sinks: turns each log entry into tagged scalars at its step.

    A trainer callback by shape (the three hooks of ``jaxsft.training.callbacks.TrainerCallback``, which the
    trainer checks by name): the infrastructure imports nothing of the training side.
    """

    def on_log(self, trainer: Any, logs: dict[str, Any]) -> None:
        scalars = scalar_tags(logs)
        if scalars:
            self.write(scalars, int(logs.get("step", trainer.state.global_step)))

    def on_step_end(self, trainer: Any, step: int) -> None:
        """Nothing: the sinks write log entries only."""

    def on_evaluate(self, trainer: Any, metrics: dict[str, Any], step: int) -> None:
        """Nothing: an evaluation's metrics reach ``on_log`` as its log entry."""

    def write(self, scalars: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release the sink (also safe to call twice)."""


class TensorBoardWriter(ScalarWriter):
    """Event files in ``logging_dir``, written by TensorBoard's own event writer (no TensorFlow, no torch)."""

    def __init__(self, logging_dir: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.logging_dir = logging_dir
        self._writer = EventFileWriter(logging_dir)

    def write(self, scalars: dict[str, float], step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()]
        self._writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
        self._writer.flush()  # a log every logging_steps is rare enough to make each one visible at once

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbWriter(ScalarWriter):
    """A W&B run (``wandb.init`` on the first log, with the TrainConfig as its config); ``wandb.log`` per entry."""

    def __init__(self, config: Any, logging_dir: Optional[str]):
        self._config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
        self._dir = logging_dir
        self._run = None

    def write(self, scalars: dict[str, float], step: int) -> None:
        import wandb

        if self._run is None:
            self._run = wandb.run or wandb.init(config=self._config, dir=self._dir)
        self._run.log(scalars, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def writers_for(config: Any) -> list[ScalarWriter]:
    """The sinks ``config.report_to`` asks for (ImportError naming the extra if a library is missing)."""
    names = config.report_to  # TrainConfig normalised it to a tuple of known names
    check_installed(names)
    logging_dir = os.fspath(config.logging_dir) if config.logging_dir else default_logging_dir()
    writers: list[ScalarWriter] = []
    for name in names:
        writers.append(TensorBoardWriter(logging_dir) if name == "tensorboard" else WandbWriter(config, logging_dir))
    return writers
