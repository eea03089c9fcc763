"""TRL-compatible facade over jaxsft: ``from compat import IterativeSFTTrainer, IterativeSFTConfig``.

Drop-in for ``trl.IterativeSFTTrainer`` / ``trl.IterativeSFTConfig`` (TRL 0.7.3-0.23.1, which deleted the
trainer in 0.24): the same constructor and ``step()``, trained by jaxsft's JAX core. See docs/compat.md.
"""

from compat.config import IterativeSFTConfig
from compat.trainer import IterativeSFTTrainer

__all__ = ["IterativeSFTTrainer", "IterativeSFTConfig"]
