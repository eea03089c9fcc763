"""Compiled programs that outlive the process: JAX's persistent compilation cache, on for trainers by default.

Why: most of a first ``step()`` is XLA compiling the train programs (91-93 % of a 14-21 s first step at the
Qwen2.5-0.5B shape on H100s, benchmarks/RESULTS.md), and a generate-filter-train script is run again and again
with the same model and settings. With the cache, a rerun loads each program from disk instead of compiling
it; on GPU the stored executable carries XLA's autotuning results too. The cache's key holds the program, the
compile options and the jax/XLA versions, so a changed model, setting or install compiles afresh.

The cache is process-wide (JAX has one), so a directory the process already set (``JAX_COMPILATION_CACHE_DIR``,
``jax.config.update("jax_compilation_cache_dir", ...)``) is kept; a trainer never switches it to another.
JAX's own thresholds still decide what is stored (by default programs that took at least a second to compile).
A bucket (``gs://...``, which JAX writes through etils) is passed on unchecked, so a TPU pod can share one cache.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Union

import jax

# Where the cache goes when no folder is named: this variable, else $XDG_CACHE_HOME/jaxsft/xla, else ~/.cache/jaxsft/xla.
DIRECTORY_ENV = "JAXSFT_COMPILATION_CACHE_DIR"

PathLike = Union[str, os.PathLike]


def default_directory() -> str:
    """The location used when none is named (see :data:`DIRECTORY_ENV`; a bucket there is kept as written)."""
    named = os.environ.get(DIRECTORY_ENV)
    if named:
        return named
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return str(Path(base) / "jaxsft" / "xla")


def in_use() -> Optional[str]:
    """The folder this process's JAX caches compiled programs in, or None."""
    return jax.config.jax_compilation_cache_dir or None


def resolve(enabled: bool, directory: Optional[PathLike], *, argument: str = "TrainConfig.compilation_cache_dir") -> Optional[str]:
    """The folder to cache in (created, checked writable), or None for no change; raises before anything changes.

    ``enabled=False``: None (a cache the process already uses stays: it is the process's, not the trainer's).
    ``directory=None``: the process's cache if it has one, else :func:`default_directory`; where that cannot be
    written (a read-only home on a cluster) a warning says so and nothing is cached, since nobody asked for that
    folder. A named folder that cannot be written, or other than the one the process already uses (JAX has one
    cache per process), is refused.
    """
    if not enabled:
        return None
    current = in_use()
    if directory is None and current:
        return current
    location = default_directory() if directory is None else os.fspath(directory)
    folder = None if _is_url(location) else Path(location).expanduser().absolute()
    folder_name = location if folder is None else str(folder)  # a bucket (gs://...): JAX writes it through etils
    if current and _normal(current) != _normal(folder_name):
        raise ValueError(
            f"{argument}={folder_name!r}: this process already caches compiled programs in {current!r} (jax's "
            "jax_compilation_cache_dir), and JAX has one cache per process. Pass that folder, or None to use it."
        )
    if current:
        return current  # the same folder, spelt as the process spelt it
    if folder is None:
        return folder_name  # not checked here: JAX reports a bucket it cannot write when it stores a program
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as err:
        if directory is None:
            warnings.warn(
                f"compiled programs are not cached: the default folder {str(folder)!r} cannot be written ({err}). Set "
                f"{DIRECTORY_ENV} or {argument} to a writable folder, or compilation_cache=False to silence this.",
                RuntimeWarning, stacklevel=3,
            )
            return None
        raise ValueError(
            f"{argument}={str(folder)!r}: cannot write compiled programs there ({err}). Pass a writable folder, "
            f"set {DIRECTORY_ENV}, or turn the cache off with compilation_cache=False."
        ) from err
    return str(folder)


def use(folder: Optional[str]) -> None:
    """Point this process's JAX cache at ``folder`` (from :func:`resolve`; None changes nothing)."""
    if folder is not None and in_use() != folder:
        jax.config.update("jax_compilation_cache_dir", folder)


def use_compilation_cache(directory: Optional[PathLike] = None) -> Optional[str]:
    """Cache this process's compiled programs in ``directory`` (None: the process's folder, else
    :func:`default_directory`), for generation-only scripts; a trainer does this itself
    (``TrainConfig.compilation_cache``). Returns the folder (None where the default folder cannot be written)."""
    folder = resolve(True, directory, argument="use_compilation_cache(directory)")
    use(folder)
    return folder


def _is_url(location: str) -> bool:
    return "://" in location


def _normal(location: str) -> str:
    return location.rstrip("/") if _is_url(location) else str(Path(location).expanduser().absolute())
