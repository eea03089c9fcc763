"""``compat.IterativeSFTTrainer.generate``: HF ``model.generate``'s common keywords, served by jaxsft's engine.

A TRL loop generates with the torch model's ``generate``; changing ``model.generate(`` to
``trainer.generate(`` runs the same request on the JAX weights the trainer updates (no copy to
torch), through :func:`jaxsft.generation.generate`'s engine. Converts and delegates only: the
arguments take HF's defaults from the model's ``generation_config`` and the result is shaped as
HF shapes it (prompt rows as given, padding included, then the new tokens, rows that stopped early
padded with ``pad_token_id``, ``num_return_sequences`` rows per prompt in order).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from jaxsft.generation import SamplingParams

SUPPORTED = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "num_return_sequences", "eos_token_id",
             "pad_token_id")


def generate(core: Any, generation_config: Any, input_ids: Any, attention_mask: Any = None, **kwargs: Any) -> torch.Tensor:
    """See ``compat.IterativeSFTTrainer.generate``."""
    unknown = sorted(set(kwargs) - set(SUPPORTED))
    if unknown:
        raise TypeError(
            f"trainer.generate(): {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not supported; it takes "
            f"input_ids, attention_mask and {', '.join(SUPPORTED)} (use model.generate for other options)."
        )
    if input_ids is None:
        raise ValueError("trainer.generate(): input_ids is required (a [batch, length] tensor of prompt token ids).")
    ids = _as_2d(input_ids, "input_ids")
    mask = np.ones_like(ids) if attention_mask is None else _as_2d(attention_mask, "attention_mask")
    if mask.shape != ids.shape:
        raise ValueError(f"trainer.generate(): attention_mask has shape {mask.shape}, input_ids {ids.shape}; "
                         "they must match.")
    prompts = [row[m.astype(bool)].tolist() for row, m in zip(ids, mask)]
    if any(not p for p in prompts):
        raise ValueError("trainer.generate(): a row of attention_mask is all zeros; every prompt needs a token.")
    sampling, pad = _sampling(generation_config, ids.shape[1], kwargs)
    result = core.generate(prompts, sampling=sampling, return_tokens=True)
    width = max(len(t) for t in result.tokens)
    n = sampling.num_return_sequences
    out = np.full((len(result.tokens), ids.shape[1] + width), pad, np.int64)
    for r, toks in enumerate(result.tokens):
        out[r, : ids.shape[1]] = ids[r // n]
        out[r, ids.shape[1] : ids.shape[1] + len(toks)] = toks
    device = input_ids.device if isinstance(input_ids, torch.Tensor) else "cpu"
    return torch.as_tensor(out, device=device)


def _as_2d(value: Any, name: str) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"trainer.generate(): {name} must be a [batch, length] integer tensor, got shape "
                         f"{array.shape} of {array.dtype}.")
    return array.astype(np.int64)


def _sampling(config: Any, input_length: int, kwargs: dict) -> tuple[SamplingParams, int]:
    """HF's resolution (a keyword, else the model's generation_config, else HF's own default) as jaxsft's
    SamplingParams (checked there, refusals naming ``trainer.generate()``), and HF's pad id."""

    def pick(name, default=None):
        if kwargs.get(name) is not None:
            return kwargs[name]
        value = getattr(config, name, None)
        return default if value is None else value

    do_sample = bool(pick("do_sample", False))
    max_new = kwargs.get("max_new_tokens")
    if max_new is None:
        max_new = getattr(config, "max_new_tokens", None)
    if max_new is None:  # HF: max_length (default 20) counts the (padded) prompt
        max_new = int(getattr(config, "max_length", None) or 20) - input_length
        if max_new < 1:
            raise ValueError(f"trainer.generate(): the model's generation_config.max_length leaves no room after "
                             f"the {input_length}-token input; pass max_new_tokens.")
    temperature = float(pick("temperature", 1.0))
    if do_sample and temperature <= 0:
        raise ValueError(f"trainer.generate(): temperature={temperature!r} must be > 0 with do_sample=True "
                         "(or pass do_sample=False for greedy).")
    top_k = pick("top_k", 50)
    top_p = float(pick("top_p", 1.0))
    eos = None if "eos_token_id" in kwargs and kwargs["eos_token_id"] is None else pick("eos_token_id")
    eos = [] if eos is None else ([int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)])
    pad = pick("pad_token_id")
    if pad is None:
        pad = eos[0] if eos else 0  # HF pads with the first EOS when the model has no pad token
    options = dict(
        max_new_tokens=max_new,
        temperature=temperature if do_sample else 0.0,
        top_k=(int(top_k) if top_k else None) if do_sample else None,
        top_p=(top_p if top_p < 1.0 else None) if do_sample else None,
        num_return_sequences=pick("num_return_sequences", 1),
        eos_token_ids=eos,
    )
    return SamplingParams.of(None, options, where="trainer.generate()"), int(pad)
