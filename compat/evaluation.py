"""HF's evaluation conventions over the core's: dicts of named eval sets, ``transformers.EvalPrediction`` for
``compute_metrics``, torch tensors for ``preprocess_logits_for_metrics``."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from jaxsft.training.batching import STEP_KEYWORDS


def is_dataset_dict(dataset: Any) -> bool:
    return isinstance(dataset, dict) and bool(dataset) and not set(dataset) <= set(STEP_KEYWORDS)


def to_numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    if isinstance(value, (tuple, list)):
        return type(value)(to_numpy(v) for v in value)
    return np.asarray(value)


def hf_compute_metrics(fn: Callable) -> Callable:
    """The core's EvalPrediction -> ``transformers.EvalPrediction``, which HF metric functions expect."""
    from transformers import EvalPrediction

    return lambda prediction: fn(EvalPrediction(predictions=prediction.predictions, label_ids=prediction.label_ids))


def torch_preprocess(fn: Callable) -> Callable:
    """HF hands ``preprocess_logits_for_metrics`` torch tensors; the core has numpy arrays."""
    return lambda logits, labels: to_numpy(fn(torch.from_numpy(logits), torch.from_numpy(labels)))
