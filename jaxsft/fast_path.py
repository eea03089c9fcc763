"""The default configuration's per-backend choices that change no result, only speed.

``TrainConfig.packing=None`` (the default) is resolved here, once, when the trainer is built. Packing
(examples laid end to end in shared rows, kept apart by segment ids) gives the same examples and the
same per-update losses as one example per row (``tests/test_packing.py``); what differs is the cost:

* GPU, where cuDNN's ragged kernel applies (16-bit compute, no sliding window, no attention dropout):
  attention costs per segment and rows may grow past the longest example's bucket, so packed rows
  carry almost no padding. Measured on one H100 at Qwen2.5-0.5B on a log-normal-length workload
  (``benchmarks/RESULTS.md``): 72.2k tokens/s packed against 40.1k with one example per row.
* Everywhere else (CPU, TPU, fp32 or sliding-window models on GPU, encoder-decoders): masked XLA
  attention costs and stores rows x length^2 whatever the segments, and packing was not measured
  faster, so one example per row stays the default.

``packing=True`` / ``False`` force either layout on any backend.
"""

from __future__ import annotations

from typing import Optional

import jax

from jaxsft.models import layers


def resolve_packing(
    packing: Optional[bool],
    *,
    attention_implementation: str,
    dtype,
    sliding_window: Optional[int],
    attention_dropout: float,
    encoder_decoder: bool = False,
    backend: Optional[str] = None,
) -> bool:
    """``TrainConfig.packing`` as the trainer applies it: a bool as given, None by the rule above.

    ``attention_implementation`` and ``dtype`` are the training view's (``RunOptions``);
    ``attention_dropout`` is the rate training applies (0 with dropout off); ``backend``
    defaults to JAX's default backend and is a parameter so each backend's rule is testable anywhere.
    """
    if packing is not None:
        return bool(packing)
    if encoder_decoder:  # T5 / BART batches have no packed layout
        return False
    backend = backend or jax.default_backend()
    implementation = layers.resolve_attention_implementation(attention_implementation, dtype, backend=backend)
    return backend == "gpu" and layers.ragged_kernel_applies(implementation, sliding_window, attention_dropout)
