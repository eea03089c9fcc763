"""Helpers for parity tests against TRL 0.23.1, which runs in its own venv (see tests/trl_reference/).

``reference_python()`` builds the venv once per process (make_venv.sh is
idempotent and locked, so parallel workers are safe) and skips the calling test
only when pip cannot reach a package index. ``run_trl(spec, out_dir)`` runs one
spec through ``tests/trl_reference/run_trl.py`` and returns its result JSON.
``save_tiny_llama(directory)`` writes the tiny Llama + BPE tokenizer that the
specs point at, with the project's transformers (5.x).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO / "tests" / "trl_reference"
MAKE_VENV = REFERENCE_DIR / "make_venv.sh"
RUN_TRL = REFERENCE_DIR / "run_trl.py"
NO_INDEX_EXIT = 75  # make_venv.sh: pip could not reach a package index


def reference_venv() -> Path:
    """Where the reference venv lives: $JAXSFT_REF_VENV, else <repo>/.ref-venv."""
    return Path(os.environ.get("JAXSFT_REF_VENV", REPO / ".ref-venv"))


@functools.lru_cache(maxsize=None)
def _build() -> tuple[int, str]:
    proc = subprocess.run(["bash", str(MAKE_VENV)], capture_output=True, text=True, timeout=1800)
    return proc.returncode, proc.stdout + proc.stderr


def reference_python() -> Path:
    """The reference venv's python, building the venv first if needed (about a minute, once)."""
    code, log = _build()
    if code == NO_INDEX_EXIT:
        pytest.skip(f"TRL reference venv unavailable: pip cannot reach a package index.\n{log[-2000:]}")
    if code != 0:
        raise RuntimeError(f"tests/trl_reference/make_venv.sh failed with exit code {code}:\n{log[-4000:]}")
    return reference_venv() / "bin" / "python"


def run_trl(spec: dict[str, Any], out_dir: Path, *, timeout: float = 900) -> dict[str, Any]:
    """Run TRL 0.23.1 on ``spec`` (see run_trl.py's docstring); returns result.json as a dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "output_dir": str(out_dir)}
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # keep the project's transformers 5 out of the reference interpreter
    proc = subprocess.run(
        [str(reference_python()), str(RUN_TRL), str(spec_path)],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=out_dir,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"run_trl.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads((out_dir / "result.json").read_text())


TOKENIZER_LINES = [
    "the quick brown fox jumps over the lazy dog",
    "a journey of a thousand miles begins with a single step",
    "to be or not to be that is the question",
    "all that glitters is not gold",
    "the rain in spain stays mainly in the plain",
    "iterative supervised fine tuning repeats generate filter train",
]


def save_tiny_llama(directory: Path, *, vocab_size: int = 512, seed: int = 0) -> tuple[Path, Path]:
    """A 2-layer, hidden-64 Llama and a locally trained byte-level BPE, saved for both venvs.

    Returns (model_dir, tokenizer_dir). pad=0, eos=1, bos=2. Weights are fp32 safetensors.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)
    model_dir, tok_dir = directory / "model", directory / "tokenizer"
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=["<|pad|>", "<|eos|>", "<|bos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(TOKENIZER_LINES * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<|pad|>", eos_token="<|eos|>", bos_token="<|bos|>")
    tok.save_pretrained(tok_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
    return model_dir, tok_dir


if __name__ == "__main__":  # `python tests/trl_ref.py` builds the venv and prints its python
    print(reference_python())
    sys.exit(0)
