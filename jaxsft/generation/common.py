"""What the decoder and encoder-decoder samplers share: the result type and the argument checks.

Its own module so that :mod:`jaxsft.generation.seq2seq` needs nothing from the public API module
(which dispatches encoder-decoder models to it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


@dataclasses.dataclass
class GenerationResult:
    """What :func:`generate` returns with ``return_tokens=True``.

    Rows are prompt-major: row ``i * num_return_sequences + j`` is sample ``j`` of
    prompt ``i``. ``tokens[r]`` holds the generated ids (an EOS that ended the row
    included, as HF does; for a stop string, up to the token that completed it);
    ``texts[r]`` is their decoding without special tokens, cut before the first
    stop string.
    """

    texts: list[str]
    tokens: list[np.ndarray]
    prompt_tokens: list[np.ndarray]
    finish_reasons: list[str]  # "eos" | "stop" | "length"
    num_return_sequences: int = 1

    @property
    def num_generated_tokens(self) -> int:
        return int(sum(len(t) for t in self.tokens))

    def grouped(self) -> list[list[str]]:
        """Texts as one list of ``num_return_sequences`` samples per prompt."""
        n = self.num_return_sequences
        return [self.texts[i : i + n] for i in range(0, len(self.texts), n)]


def is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def check_sampling_arguments(max_new_tokens, temperature, top_k, top_p, num_return_sequences, batch_size) -> None:
    """The argument checks every sampler shares (decoder-only and encoder-decoder), before any work."""
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"generate(): max_new_tokens={max_new_tokens!r} must be an integer >= 1.")
    if not is_number(temperature) or temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"generate(): temperature={temperature!r} must be a finite number >= 0 (0 = greedy).")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ValueError(f"generate(): top_k={top_k!r} must be None or an integer >= 1.")
    if top_p is not None and (not is_number(top_p) or not (0.0 < top_p <= 1.0)):
        raise ValueError(f"generate(): top_p={top_p!r} must be None or a number in (0, 1].")
    if not is_int(num_return_sequences) or num_return_sequences < 1:
        raise ValueError(f"generate(): num_return_sequences={num_return_sequences!r} must be an integer >= 1.")
    if batch_size is not None and (not is_int(batch_size) or batch_size < 1):
        raise ValueError(f"generate(): batch_size={batch_size!r} must be None or an integer >= 1.")
