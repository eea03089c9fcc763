"""The suite's process settings in one place: the XLA flags every test process and its children compile
with, the per-program options under which two different programs are compared bit for bit, and the
torch-free mode of child workers that run the JAX core only.

No jax import here: conftest applies these before jax is first imported, and child-process scripts
(multi-process workers) apply them before they import it.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Union

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"

TEST_XLA_FLAGS = (
    # With the persistent cache, XLA:CPU executables *loaded from the cache* that hold several
    # collectives could deadlock (devices entering different all-reduces first: "Expected 8 threads to
    # join the rendezvous, but only 5 ... arrived", then an abort; seen in test_compat_trainer's quick
    # start on every warm run). The concurrency-optimised scheduler is what lets them reorder; without it
    # warm runs pass. It changes scheduling only, never results.
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",
    # XLA:CPU's older loop emitters for fusions instead of the MLIR-based ones: the suite's programs are
    # tiny, so compiling them is most of the suite's time, and these compile in under half the time (a
    # tiny BART train step from a cold cache: 13 s of compile against 31 s on the 2-core machine). This
    # changes code generation only: results agree to float rounding. Where a test asserts that two
    # *different* programs give bit-identical results, it compiles them with BIT_EXACT_XLA_OPTIONS, the
    # code generation users get.
    "--xla_cpu_use_fusion_emitters=false",
    # No XNNPACK rewrites either: 15 % less compile time again (the same BART step: 7.4 s against 8.7 s),
    # the same bits there.
    "--xla_cpu_use_xnnpack=false",
)

# Per-program compile options (TrainConfig.xla_options, or jit(...).lower().compile(compiler_options=...)):
# XLA:CPU's default code generation, for the assertions of bit-identical results between two programs.
BIT_EXACT_XLA_OPTIONS = {"xla_cpu_use_fusion_emitters": True, "xla_cpu_use_xnnpack": True}


def with_test_flags(flags: str) -> str:
    """``flags`` plus those of the suite's flags it does not set already."""
    return " ".join([*flags.split(), *(flag for flag in TEST_XLA_FLAGS if flag.split("=")[0] not in flags)])


def child_flags(flags: str, devices: Optional[int] = None) -> str:
    """``flags`` with the suite's flags, the simulated device count replaced by ``devices`` (None: no
    count, so one CPU device as a user has)."""
    kept = [flag for flag in with_test_flags(flags).split() if not flag.startswith(DEVICE_COUNT_FLAG)]
    return " ".join(([f"{DEVICE_COUNT_FLAG}={devices}"] if devices is not None else []) + kept)


def child_env(*pythonpath: Union[str, os.PathLike]) -> dict[str, str]:
    """The environment for a test's child process: this run's settings (compile flags, the persistent
    compile cache, offline hub) on one CPU device, with ``pythonpath`` in front of PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env["XLA_FLAGS"] = child_flags(env.get("XLA_FLAGS", ""))
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), env.get("PYTHONPATH", "")])
    return env


def run_torch_free() -> None:
    """Make this (child) process torch-free, as on a TPU VM: the JAX core needs no torch, and transformers
    then does not import it to read a config (2.3 s less per process start on the 2-core machine).
    Call it first thing in a worker's ``__main__``, never in the pytest process."""
    sys.modules["torch"] = None  # find_spec("torch") is None now, and `import torch` raises ImportError
