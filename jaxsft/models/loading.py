"""``jaxsft.from_pretrained``: the one entry for loading, which sends a plain model to the HF loader
and a model with a LoRA adapter to the PEFT wrapper, so the HF loader knows nothing of PEFT."""

from __future__ import annotations

import os
from typing import Any, Union

from jaxsft.models import hf_io, peft_io
from jaxsft.models.interface import LanguageModel


def from_pretrained(source: Any, *, adapter: Union[str, os.PathLike, None] = None, **load_options: Any) -> LanguageModel:
    """Load a Hugging Face model as a jaxsft model; see :func:`jaxsft.models.hf_io.from_pretrained` for
    ``source`` and ``load_options`` (``dtype``, ``param_dtype``, ``mesh``, ``remat``,
    ``attention_implementation``, ``norm_implementation``, ``sharding_rules``). With ``adapter`` (a PEFT LoRA folder) or a
    ``peft.PeftModel`` as ``source``, the base loads and the adapter is attached
    (:func:`jaxsft.models.peft_io.from_pretrained`).
    """
    plain = isinstance(source, (str, os.PathLike)) or not peft_io.is_peft_model(source)
    if adapter is None and plain:
        return hf_io.from_pretrained(source, **load_options)
    return peft_io.from_pretrained(source, adapter=adapter, **load_options)
