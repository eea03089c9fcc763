"""``TrainConfig.compilation_cache``: a trainer keeps its compiled programs on disk, so a rerun of the same script
loads them instead of compiling, and trains the same; bad folders are refused by name before anything changes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import jaxsft
from jaxsft.infra import compile_cache
from test_trainer import fast_compiles, llama, make_trainer  # noqa: F401  (its fixtures, imported by name)
from xla_settings import child_env

HERE = Path(__file__).resolve().parent


def run_worker(mode: str, folder: Path, scratch: Path, **env_extra: str) -> dict:
    """``scratch``: where the worker trains its tokenizer (not under ``folder``, which may be unwritable)."""
    env = {k: v for k, v in child_env(HERE).items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    env.pop("JAX_COMPILATION_CACHE_DIR")  # a fresh process with no cache of its own, as a user's script starts
    env.update(env_extra)
    done = subprocess.run([sys.executable, str(HERE / "compile_cache_worker.py"), mode, str(folder), str(scratch)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "stderr": done.stderr}


@pytest.mark.slow
def test_a_rerun_loads_the_programs_and_trains_the_same(tmp_path):
    """The trainer compiles ahead of time (``Lowered.compile`` on worker threads), a path that could bypass the cache
    that ``jax.jit`` consults: a second process finds every program there, the train step's and the generation
    engine's (jax's cache events, no timing), and computes the same losses and tokens."""
    folder = tmp_path / "xla"
    first = run_worker("named", folder, tmp_path)
    assert first["cache_dir"] == str(folder) and first["hits"] == 0 and first["misses"] >= first["programs"] > 0
    assert len(list(folder.iterdir())) >= first["programs"]
    second = run_worker("named", folder, tmp_path)
    assert second["misses"] == 0 and second["hits"] == first["misses"]  # every program loaded, none compiled
    assert second["update_losses"] == first["update_losses"] and second["generated"] == first["generated"]


def test_the_default_folder_and_off(tmp_path):
    default = run_worker("default", tmp_path, tmp_path, JAXSFT_COMPILATION_CACHE_DIR=str(tmp_path / "from-env"))
    assert default["cache_dir"] == str(tmp_path / "from-env") and any((tmp_path / "from-env").iterdir())
    off = run_worker("off", tmp_path, tmp_path, JAXSFT_COMPILATION_CACHE_DIR=str(tmp_path / "unused"))
    assert off["cache_dir"] is None and off["hits"] == off["misses"] == 0 and not (tmp_path / "unused").exists()


def test_an_unwritable_folder_is_refused_by_name(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    refused = run_worker("named", blocker / "xla", tmp_path)
    assert "TrainConfig.compilation_cache_dir=" in refused["error"] and "writable folder" in refused["error"]
    # nobody named the default folder: a read-only home warns and trains uncached
    unwritable_default = run_worker("default", tmp_path, tmp_path, JAXSFT_COMPILATION_CACHE_DIR=str(blocker / "xla"))
    assert unwritable_default["cache_dir"] is None and unwritable_default["update_losses"]
    assert "compiled programs are not cached" in unwritable_default["stderr"]


def test_a_process_keeps_its_one_cache(tmp_path, llama):
    """This test process has the suite's cache (conftest): a trainer keeps it, and refuses another folder before
    it builds anything."""
    current = compile_cache.in_use()
    assert current and compile_cache.resolve(True, None) == current
    with pytest.raises(ValueError, match=r"TrainConfig.compilation_cache_dir=.*already caches compiled programs"):
        compile_cache.resolve(True, tmp_path / "other")
    assert compile_cache.resolve(False, tmp_path / "other") is None and compile_cache.in_use() == current
    assert jaxsft.use_compilation_cache() == current
    with pytest.raises(ValueError, match=r"TrainConfig.compilation_cache_dir=.*Pass that folder, or None"):
        make_trainer(llama, compilation_cache_dir=str(tmp_path / "other"))
    assert make_trainer(llama, compilation_cache_dir=current).config.compilation_cache_dir == current
    assert not (tmp_path / "other").exists() and compile_cache.in_use() == current


def test_a_bucket_passes_through_unchecked(monkeypatch, tmp_path):
    """TPU pods share one cache in a bucket (gs://...), which JAX writes through etils: it is neither created nor
    probed locally, and compared as a location, not as a local path."""
    monkeypatch.setattr(compile_cache, "in_use", lambda: None)
    monkeypatch.chdir(tmp_path)
    assert compile_cache.resolve(True, "gs://bucket/xla") == "gs://bucket/xla"
    monkeypatch.setenv(compile_cache.DIRECTORY_ENV, "gs://bucket/from-env")
    assert compile_cache.resolve(True, None) == "gs://bucket/from-env"
    assert not any(tmp_path.iterdir())  # no local folder named gs:
    monkeypatch.setattr(compile_cache, "in_use", lambda: "gs://bucket/xla/")
    assert compile_cache.resolve(True, "gs://bucket/xla") == "gs://bucket/xla/"
    with pytest.raises(ValueError, match="already caches compiled programs in 'gs://bucket/xla/'"):
        compile_cache.resolve(True, "gs://bucket/other")
