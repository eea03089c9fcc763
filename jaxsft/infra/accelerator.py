"""One line at the start of a run: which JAX backend and devices it uses, with a hint when a GPU sits idle.

Why: ``pip install jaxsft`` installs CPU jaxlib; on a machine with an NVIDIA GPU a run would then
train on the CPU without a word. The extras ``jaxsft[cuda]`` and ``jaxsft[tpu]`` install JAX for them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Sequence

CUDA_HINT = ("an NVIDIA GPU is visible but JAX runs on the CPU; install JAX for it with "
             "pip install 'jaxsft[cuda]' (see the README's Set-up)")


def nvidia_gpu_visible() -> bool:
    """An NVIDIA driver is present (``nvidia-smi`` on the PATH, or /proc/driver/nvidia)."""
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia").exists()


def notice(backend: Optional[str] = None, devices: Optional[Sequence[str]] = None,
           gpu_visible: Optional[bool] = None) -> str:
    """``"JAX backend: gpu, 1 device (NVIDIA H100)"``, plus :data:`CUDA_HINT` when a GPU is idle.

    The arguments default to the running JAX and machine (given for tests).
    """
    if backend is None or devices is None:
        import jax

        backend = backend or jax.default_backend()
        devices = devices if devices is not None else [d.device_kind for d in jax.devices()]
    kinds = sorted(set(devices))
    line = f"JAX backend: {backend}, {len(devices)} device{'s' if len(devices) != 1 else ''} ({', '.join(kinds)})"
    if backend == "cpu" and (nvidia_gpu_visible() if gpu_visible is None else gpu_visible):
        line += f"; {CUDA_HINT}"
    return line
