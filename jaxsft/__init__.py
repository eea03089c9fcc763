"""jaxsft: TRL's IterativeSFTTrainer in JAX/Flax NNX, for generate → filter → train loops at scale."""

from importlib import metadata as _metadata

from jaxsft.infra.config import Optimization, Performance, PrecisionAndMemory, TrainConfig
from jaxsft.models import (
    CausalLM, LoraConfig, ModelSpec, Seq2SeqLM, Seq2SeqSpec, add_lora, from_pretrained, init_model, load_adapter,
    save_adapter, save_pretrained,
)
from jaxsft.infra.sharding import make_mesh, single_device_mesh

try:
    __version__ = _metadata.version("jaxsft")
except _metadata.PackageNotFoundError:  # a source checkout that was never pip-installed
    __version__ = "0.1.0"

__all__ = [
    "TrainConfig", "Optimization", "PrecisionAndMemory", "Performance", "CausalLM", "ModelSpec", "Seq2SeqLM", "Seq2SeqSpec", "from_pretrained", "init_model", "save_pretrained",
    "LoraConfig", "add_lora", "save_adapter", "load_adapter",
    "make_mesh", "single_device_mesh", "IterativeSFTTrainer", "generate", "SamplingParams", "distributed",
    "checkpoint", "diagnostics", "bundled", "metrics",
]

_PUBLIC_MODULES = {
    "distributed": "jaxsft.infra.distributed", "checkpoint": "jaxsft.infra.checkpoint",
    "diagnostics": "jaxsft.infra.diagnostics", "metrics": "jaxsft.infra.metrics", "bundled": "jaxsft.app.bundled",
}


def __getattr__(name):
    # Lazy: the trainer and generation pull in optax/tqdm; model-only users need not pay for them.
    if name == "IterativeSFTTrainer":
        from jaxsft.training.trainer import IterativeSFTTrainer

        return IterativeSFTTrainer
    if name == "generate":
        from jaxsft.generation import generate

        return generate
    if name == "SamplingParams":
        from jaxsft.generation import SamplingParams

        return SamplingParams
    if name in _PUBLIC_MODULES:  # user-facing modules keep their short names (``jaxsft.distributed.initialize()``)
        import importlib

        return importlib.import_module(_PUBLIC_MODULES[name])
    raise AttributeError(f"module 'jaxsft' has no attribute {name!r}")
