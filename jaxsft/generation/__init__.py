"""Generation on the training weights: an engine of fixed row slots refilled from a queue of prompts.

* :mod:`~jaxsft.generation.api`: :func:`generate`, :class:`Sampler`, :class:`GenerationResult` (host side);
* :mod:`~jaxsft.generation.params`: :class:`SamplingParams`, what to sample and when to stop, checked once;
* :mod:`~jaxsft.generation.prompts`: prompts (strings, chats, token ids) to tokens, stop strings;
* :mod:`~jaxsft.generation.engine`: the slot engine's programs and host loop, over a :class:`DecodeModel`;
* :mod:`~jaxsft.generation.causal`: the decoder-only adapter (a prompt's K/V once, each sample's own);
* :mod:`~jaxsft.generation.seq2seq`: the encoder-decoder adapter (T5, BART: encoder and cross K/V once);
* :mod:`~jaxsft.generation.kv_cache`: the decoder's cache layout and its attention;
* :mod:`~jaxsft.generation.sampling`: temperature / top-k / top-p and the draw, in one pass over the vocabulary.
"""

from jaxsft.generation.api import (
    DecodeState, GenerationResult, Mode, Sampler, Sampling, clear_cache, compiled_programs, format_prompts, generate,
    pow2_at_least,
)
from jaxsft.generation.engine import DecodeModel
from jaxsft.generation.params import SamplingParams

__all__ = [
    "generate", "Sampler", "SamplingParams", "DecodeModel", "DecodeState", "Sampling", "Mode", "GenerationResult",
    "compiled_programs", "clear_cache", "format_prompts", "pow2_at_least",
]
