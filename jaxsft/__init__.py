"""jaxsft: TRL's IterativeSFTTrainer in JAX/Flax NNX, for generate → filter → train loops at scale.

Every public name is imported on first use (PEP 562), so ``import jaxsft.infra.config`` (the config's
constants and ``TrainConfig``) needs no JAX: the TRL facade's config reads its constants from there and
must import where only torch and transformers are installed. ``from jaxsft import X`` and ``jaxsft.X``
work as before.
"""

import importlib as _importlib
from importlib import metadata as _metadata

from jaxsft.infra.lazy import submodule as _submodule

try:
    __version__ = _metadata.version("jaxsft")
except _metadata.PackageNotFoundError:  # a source checkout that was never pip-installed
    __version__ = "0.1.0"

# Public name -> the module that defines it (an attribute of that module, or the module itself).
_NAMES = {
    "TrainConfig": "jaxsft.infra.config", "Optimization": "jaxsft.infra.config",
    "PrecisionAndMemory": "jaxsft.infra.config", "Performance": "jaxsft.infra.config",
    "CausalLM": "jaxsft.models", "ModelSpec": "jaxsft.models", "Seq2SeqLM": "jaxsft.models",
    "Seq2SeqSpec": "jaxsft.models", "from_pretrained": "jaxsft.models", "init_model": "jaxsft.models",
    "save_pretrained": "jaxsft.models", "LoraConfig": "jaxsft.models", "add_lora": "jaxsft.models",
    "save_adapter": "jaxsft.models", "load_adapter": "jaxsft.models",
    "make_mesh": "jaxsft.infra.sharding", "single_device_mesh": "jaxsft.infra.sharding",
    "IterativeSFTTrainer": "jaxsft.training.trainer", "generate": "jaxsft.generation",
    "SamplingParams": "jaxsft.generation", "use_compilation_cache": "jaxsft.infra.compile_cache",
}
# User-facing modules under their short names (``jaxsft.distributed.initialize()``).
_PUBLIC_MODULES = {
    "distributed": "jaxsft.infra.distributed", "checkpoint": "jaxsft.infra.checkpoint",
    "diagnostics": "jaxsft.infra.diagnostics", "metrics": "jaxsft.infra.metrics", "bundled": "jaxsft.rft.bundled",
}

__all__ = [*_NAMES, *_PUBLIC_MODULES]


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(_importlib.import_module(_NAMES[name]), name)
    elif name in _PUBLIC_MODULES:
        value = _importlib.import_module(_PUBLIC_MODULES[name])
    else:
        value = _submodule(__name__, name)  # a subpackage (``jaxsft.infra.distributed`` after ``import jaxsft``)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*(k for k in globals() if not k.startswith('_') or k.startswith('__')), *__all__})
