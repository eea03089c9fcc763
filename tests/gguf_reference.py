"""transformers' own GGUF load (a torch class): the reference jaxsft's torch-free GGUF reader must equal."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import torch


def load_gguf_causal_lm(folder: str, filename: str) -> Any:
    """A GGUF checkpoint dequantized to fp32 by transformers' torch loader (its only GGUF reader)."""
    from transformers import AutoModelForCausalLM

    with _gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are dequantized fp32 now
    return model


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """While loading: the GGUF file parsed once, and gguf's tensor-name map built once per (architecture, layers).

    Why: transformers parses the file twice (config, then weights; 2.8 s each for SmolLM2-135M on a 2-core
    machine) and rebuilds the name map for every submodule it walks (397 times, about 8 s). Both depend
    on their arguments only and are only read.
    """
    try:
        import gguf
    except ImportError:  # transformers reports the missing package itself
        yield
        return
    original_map, original_reader = gguf.get_tensor_name_map, gguf.GGUFReader
    readers: dict[Any, Any] = {}

    def shared_reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original_reader(path, *args, **kwargs)
        return readers[key]

    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_map)
    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.get_tensor_name_map, gguf.GGUFReader = original_map, original_reader
