"""Test-wide settings: 8 simulated CPU devices, CPU only, no hub access, one compile cache.

The environment must be set before jax is imported anywhere, hence module level here.
"""

import os
import pathlib
import re
import sys

from xla_settings import DEVICE_COUNT_FLAG, with_test_flags  # noqa: E402  (tests/ is on sys.path)


def gpu_tier_selected(argv: list[str]) -> bool:
    """Whether the command line selects the GPU tier (a ``-m`` expression naming ``gpu``, not ``not gpu``).

    Why: such a run must not get the CPU defaults below. With them, the GPU's jaxlib meets XLA:CPU's flags and
    aborts before pytest prints a line (one such tier run printed nothing at all, eleventh session), and the
    tier's numerics would be those of unoptimised programs."""
    expressions = [b for a, b in zip(argv, argv[1:]) if a == "-m"] + [a[2:] for a in argv if a.startswith("-m") and len(a) > 2]
    return any(re.search(r"\bgpu\b", e) and not re.search(r"\bnot\s+gpu\b", e) for e in expressions)


_GPU_TIER = gpu_tier_selected(sys.argv)

# 8 simulated devices unless XLA_FLAGS says otherwise, and the suite's compile flags (tests/xla_settings.py
# says why each).
# Only for a CPU run: the GPU tier (pytest -m gpu) runs on another jaxlib, which may not
# know XLA:CPU's flags, and an unknown flag in XLA_FLAGS aborts the process before pytest can print a line.
if not _GPU_TIER:  # the GPU tier lets jax pick its accelerator (JAX_PLATFORMS=cuda still works)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ.get("JAX_PLATFORMS") == "cpu":
    _flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = with_test_flags(_flags if DEVICE_COUNT_FLAG in _flags else f"{DEVICE_COUNT_FLAG}=8 {_flags}")
# XLA's LLVM backend optimisations off for the whole run, worker processes included (they inherit the
# environment): the suite's programs are tiny, so compiling them dominates running them. HLO passes
# (fusion, collective combining) still run, so programs keep their structure; only machine-code
# optimisation is skipped. Measured on the 2-core CI-like machine: test_seq2seq_training.py and
# test_dropout.py took 145 s instead of 207 s from a cold compile cache.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "0" if _GPU_TIER else "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist each worker gets its share of the cores for torch's intra-op threads (one each for
# `-n 2` on the 2-core machine), and so do the child processes it starts (OMP_NUM_THREADS is inherited):
# torch's OpenMP threads spin while they wait, so two workers each running torch on every core slow each
# other down several times over (SmolLM2's 10 x 32-token greedy reference in transformers: 27.6 s on 2
# threads, 8.4 s on 1, with the other worker busy). Thread counts change scheduling, not what is computed.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

# Most of the suite's time is XLA compiling small programs, many of them identical across tests and
# files (trainers built alike). XLA's persistent cache turns every repeat into a load, within a run and
# across runs on the same checkout. JAXSFT_TEST_XLA_CACHE moves it (several worktrees can share one).
# Set through the environment, so that child processes (examples, multi-process workers, the SIGKILL
# test's restarts; xla_settings.child_env) share it too.
_CACHE = os.environ.get("JAXSFT_TEST_XLA_CACHE") or str(pathlib.Path(__file__).resolve().parents[1] / ".cache" / "xla-tests")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

# and here too, in case something (a pytest plugin) imported jax before this file ran
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402


@pytest.fixture
def optimized_xla():
    """XLA's backend optimisations back on for one test: a real model's generation runs long enough
    that unoptimised machine code costs more than the compile saves (SmolLM2 greedy: 100 s off, 51 s on)."""
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> str:
    """jaxsft.testing.tiny_model's folder, built once per run and shared (read-only) by the in-process tests
    that run a loop on it: building it teaches the model 150 updates (~8 s of one core), and its build is
    deterministic. Under pytest-xdist the workers share one folder in the run's temporary root (a file lock
    makes the first builder the only one; tiny_model returns a finished folder as it is)."""
    import fcntl

    from jaxsft.testing import tiny_model

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by this run's workers
    with open(root / "tiny-chat-model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return tiny_model(root / "tiny-chat-model")


# ---------------------------------------------------------------------------- parallel runs (pytest -n 2)
# The README's test command runs the suite on two pytest-xdist workers. Both share the compile cache
# above: a program one worker compiled is a load for the other. jax writes an entry with one plain
# write and reads it whole; a read that meets a half-written entry fails to decompress, which jax
# reports as a warning and answers by compiling, so a race costs a compile, never a wrong program.
#
# Whole files go to one worker (module fixtures such as a TRL run or a trainer are built once), the
# slowest files first, so that no worker is left running one long file alone at the end (order from
# pytest --durations=0 of a cold run on the 2-core machine, 2026-12-06 at 79f65ed; a file missing here only
# starts later).
_SLOW_FILES_FIRST = (
    "test_smollm2.py", "test_readme.py", "test_engine.py", "test_gemma.py", "test_dropout.py",
    "test_example_weights.py", "test_rft.py", "test_torch_optional.py", "test_seq2seq_training.py",
    "test_checkpoint_kill.py", "test_checkpoint.py", "test_seq2seq_compat.py", "test_trainer_parity.py",
    "test_trainer.py", "test_packing.py", "test_generate.py", "test_compat_trl_parity.py", "test_sharding.py",
    "test_compat_trainer.py", "test_models.py", "test_lora_training.py", "test_loop.py", "test_demo.py",
    "test_compat_checkpoints.py", "test_examples.py", "test_step.py", "test_seq2seq_generate.py",
    "test_bad_inputs.py", "test_scaling.py", "test_lora_loop.py", "test_compat_peft.py", "test_seq2seq_models.py",
    "test_lora_peft_io.py", "test_multihost_agreement.py", "test_multihost.py",
)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent without it
def pytest_xdist_make_scheduler(config, log):
    """Under ``-n`` with no ``--dist`` given: one file per work unit, in the order of the collection below."""
    if config.getvalue("dist") != "load":
        return None  # an explicit --dist is honoured
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # keep the slow-first order instead of most-tests-first
    return LoadFileScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """On xdist workers only: slow files first (a stable sort: order within a file and among the rest kept)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: i for i, name in enumerate(_SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
