"""Generation on the training weights: an engine of fixed row slots refilled from a queue of prompts.

* :mod:`~jaxsft.generation.api`: :func:`generate`, :class:`Sampler`, :class:`GenerationResult` (host side);
* :mod:`~jaxsft.generation.engine`: the slot engine's programs and host loop;
* :mod:`~jaxsft.generation.kv_cache`: the cache layout (each prompt's K/V once, each sample's own) and its attention;
* :mod:`~jaxsft.generation.sampling`: temperature / top-k / top-p and the draw, in one pass over the vocabulary;
* :mod:`~jaxsft.generation.seq2seq`: encoder-decoder models (T5, BART).
"""

from jaxsft.generation.api import (
    DecodeState, GenerationResult, Mode, Sampler, Sampling, check_sampling_arguments, clear_cache, compiled_programs,
    format_prompts, generate, pow2_at_least,
)

__all__ = [
    "generate", "Sampler", "DecodeState", "Sampling", "Mode", "GenerationResult", "compiled_programs", "clear_cache",
    "format_prompts", "pow2_at_least", "check_sampling_arguments",
]
