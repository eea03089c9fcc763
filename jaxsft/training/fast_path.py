"""The default configuration's per-backend choices that change no result, only speed.

``TrainConfig.packing=None`` (the default) is resolved here, once, when the trainer is built. Packing
(examples laid end to end in shared rows, kept apart by segment ids) gives the same examples and the
same per-update losses as one example per row (``tests/test_packing.py``); what differs is the cost:

* GPU, where cuDNN's ragged kernel applies (16-bit compute, no sliding window, no attention-score soft
  cap, no attention dropout):
  attention costs per segment and rows may grow past the longest example's bucket, so packed rows
  carry almost no padding. Measured on one H100 at Qwen2.5-0.5B on a log-normal-length workload
  (``benchmarks/RESULTS.md``): 72.2k tokens/s packed against 40.1k with one example per row.
* Everywhere else (CPU, TPU; on GPU fp32, sliding-window or soft-capped models such as Mistral and
  Gemma 2/3, encoder-decoders): masked XLA
  attention costs and stores rows x length^2 whatever the segments, and packing was not measured
  faster, so one example per row stays the default.

``packing=True`` / ``False`` force either layout on any backend.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax

from jaxsft.models import layers


def ragged_attention_applies(
    *,
    attention_implementation: str,
    dtype,
    windows: Sequence[Optional[int]] = (),
    softcap: Optional[float] = None,
    attention_dropout: float = 0.0,
    backend: Optional[str] = None,
) -> bool:
    """Whether a decoder's packed rows run on cuDNN's ragged kernel, whose cost follows the examples.

    The model's own kernel rule first (``layers.attention_kernel``: cuDNN only in 16-bit compute on a
    GPU, without an attention-score soft cap or windows that differ by layer), then the ragged kernel's
    (no sliding window in any layer, no attention dropout). ``windows``: each layer's window (None =
    global); ``attention_dropout``: the rate training applies (0 with dropout off); ``backend`` defaults to
    JAX's default backend and is a parameter so that each backend's rule is testable anywhere.
    """
    backend = backend or jax.default_backend()
    implementation = layers.attention_kernel(
        layers.resolve_attention_implementation(attention_implementation, dtype, backend=backend),
        softcap=softcap, windows_vary=len(set(windows)) > 1,
    )
    window = next((w for w in windows if w is not None), None)
    return backend == "gpu" and layers.ragged_kernel_applies(implementation, window, attention_dropout)


def resolve_packing(packing: Optional[bool], *, ragged_attention: bool, encoder_decoder: bool = False) -> bool:
    """``TrainConfig.packing`` as the trainer applies it: a bool as given; None packs exactly where the
    ragged kernel applies (``ragged_attention``, from :func:`ragged_attention_applies`), never for T5 / BART,
    whose batches have no packed layout."""
    if packing is not None:
        return bool(packing)
    return ragged_attention and not encoder_decoder
