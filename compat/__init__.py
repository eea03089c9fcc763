"""TRL-compatible facade over jaxsft: ``from compat import IterativeSFTTrainer, IterativeSFTConfig``.

Drop-in for ``trl.IterativeSFTTrainer`` / ``trl.IterativeSFTConfig`` (TRL 0.7.3-0.23.1, which deleted the
trainer in 0.24): the same constructor and ``step()``, trained by jaxsft's JAX core. See docs/compat.md.
"""

from compat.config import IterativeSFTConfig

__all__ = ["IterativeSFTTrainer", "IterativeSFTConfig"]


def __getattr__(name):
    # Lazy, so the torch-only pieces (config, inputs, arguments) import without JAX.
    if name == "IterativeSFTTrainer":
        from compat.trainer import IterativeSFTTrainer

        return IterativeSFTTrainer
    raise AttributeError(f"module 'compat' has no attribute {name!r}")
