"""A rerun's first step loads its programs from jax's persistent compilation cache (the README's recipe).

The trainer compiles ahead of time (``Lowered.compile`` on worker threads), a path that could bypass the cache
that ``jax.jit`` consults; this checks that it does not: a second process with the same cache directory finds
every program of its first step there (jax's cache-hit and cache-miss events, no timing), and the directory
holds the update program.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xla_settings import child_env

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

FIRST_STEP = """
import collections, json, sys
import jax
import numpy as np
import jaxsft
events = collections.Counter()
jax.monitoring.register_event_listener(lambda name, **kwargs: events.update([name]))
from tiny import tiny_torch_model
model = jaxsft.from_pretrained(tiny_torch_model("llama", num_hidden_layers=4, hidden_size=128, intermediate_size=256))
trainer = jaxsft.IterativeSFTTrainer(model, jaxsft.TrainConfig(max_length=64, disable_tqdm=True, logging_steps=0))
rng = np.random.default_rng(0)
out = trainer.step(input_ids=[rng.integers(3, 300, 40) for _ in range(8)])
print(json.dumps({"hits": events["/jax/compilation_cache/cache_hits"], "misses": events["/jax/compilation_cache/cache_misses"],
                  "loss": out["loss"]}))
"""


@pytest.mark.slow
def test_a_rerun_loads_the_first_steps_programs_from_the_persistent_cache(tmp_path):
    env = child_env(ROOT, TESTS)
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", FIRST_STEP], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, rerun = runs
    assert rerun["loss"] == first["loss"]  # the same programs
    assert first["misses"] >= 2 and first["hits"] == 0, runs  # the update program and the optimizer's init at least
    assert rerun["hits"] >= first["misses"] and rerun["misses"] == 0, runs
    assert any(p.name.startswith("jit_run-") for p in (tmp_path / "cache").iterdir())  # the update program
