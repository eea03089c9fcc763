"""TRL-compatible facade over jaxsft: ``from compat import IterativeSFTTrainer, IterativeSFTConfig``.

Drop-in for ``trl.IterativeSFTTrainer`` / ``trl.IterativeSFTConfig`` (TRL 0.7.3-0.23.1, which deleted the
trainer in 0.24): the same constructor and ``step()``, trained by jaxsft's JAX core. See docs/compat.md.
The facade speaks torch, which the JAX core does not install: ``pip install 'jaxsft[compat]'``.
"""

try:
    import torch  # noqa: F401
except ImportError as _err:  # a core-only install
    raise ImportError(
        "compat (the TRL facade) needs PyTorch, which the JAX core does not install; install the extra: "
        "pip install 'jaxsft[compat]' (pin torch, e.g. torch==2.13.0, for the CPU build)."
    ) from _err

from compat.config import IterativeSFTConfig

__all__ = ["IterativeSFTTrainer", "IterativeSFTConfig"]


def __getattr__(name):
    # Lazy, so importing the config (TRL's IterativeSFTConfig) does not build the trainer machinery.
    if name == "IterativeSFTTrainer":
        from compat.trainer import IterativeSFTTrainer

        return IterativeSFTTrainer
    raise AttributeError(f"module 'compat' has no attribute {name!r}")
