"""The core's one optional door to PyTorch: torch model instances and GGUF files in, as numpy.

The JAX core never needs torch: it reads and writes safetensors with ``safetensors``
and numpy alone. This module is the only place in ``jaxsft`` that imports torch,
and only when a caller hands over a torch object (``from_pretrained(torch_model)``)
or asks for a conversion only transformers' torch classes can do (GGUF files).
Installing torch is the ``compat`` extra's business (``pip install jaxsft[compat]``).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Iterator

TORCH_MISSING = (
    "this needs PyTorch, which the JAX core does not install; install the facade's extra, "
    "pip install 'jaxsft[compat]' (with torch pinned, e.g. torch==2.13.0, to get the CPU build)."
)


def is_torch_model(source: Any) -> bool:
    """True for a ``transformers.PreTrainedModel``; never imports torch (none exists unless torch is loaded)."""
    if "torch" not in sys.modules:
        return False
    try:
        from transformers import PreTrainedModel
    except Exception:  # transformers without its torch classes
        return False
    return isinstance(source, PreTrainedModel)


def checked_state_dict(model: Any) -> dict[str, Any]:
    """A torch model's ``state_dict()``, refusing meta (no values) and sparse tensors before anything is read."""
    import torch

    state = model.state_dict()
    for key, tensor in state.items():
        if tensor.is_meta:
            raise ValueError(
                f"the model's weight {key} is on the meta device (no values: e.g. a model built under "
                "init_empty_weights or with device_map='meta'); load real weights before converting it."
            )
        if tensor.layout != torch.strided:
            raise ValueError(f"the model's weight {key} is a sparse tensor ({tensor.layout}); make it dense first.")
    return state


def tensor_as_numpy(tensor: Any) -> Any:
    """One torch tensor as a host numpy array (bf16/fp16 widened to fp32, which is exact)."""
    import torch

    t = tensor.detach().cpu()
    return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()


def load_gguf_causal_lm(folder: str, filename: str) -> Any:
    """A GGUF checkpoint dequantized to fp32 by transformers' torch loader (its only GGUF reader)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        raise ImportError(f"loading the GGUF file {filename}: {TORCH_MISSING}") from err
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
