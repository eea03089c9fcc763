"""The examples run (their --tiny mode, offline) and the README's code blocks are their code, verbatim.

Each example is run as a user runs it: ``python examples/<name>.py --tiny`` in a fresh process,
on one CPU device, with this checkout on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from xla_settings import child_env

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
README = REPO / "README.md"
MARKED = ("expert_iteration.py", "trl_switch.py", "rejection_sampling.py")


def readme_region(name: str) -> str:
    text = (EXAMPLES / name).read_text()
    found = re.findall(r"^# README:begin\n(.*?)^# README:end\n", text, re.S | re.M)
    assert len(found) == 1, f"{name} needs exactly one README:begin/README:end region"
    return found[0]


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, re.S | re.M)


@pytest.mark.parametrize("section, name", [
    ("Quick start: JAX API", "expert_iteration.py"),
    ("Quick start: the TRL facade", "trl_switch.py"),
    ("Rejection sampling with a reward", "rejection_sampling.py"),
])
def test_readme_code_is_the_examples_code(section, name):
    blocks = python_blocks(readme_section(section))
    assert blocks, f"README section {section!r} has no python block"
    assert blocks[0] == readme_region(name), (
        f"README section {section!r} differs from examples/{name} between its README markers; copy the region "
        f"into the README (or the README's block into the example) so they are equal again"
    )


def test_readme_lists_every_stats_key():
    """The README's list of step()'s stats keys is exactly the keys step() returns."""
    import jaxsft

    import tiny

    tok = tiny.load_tokenizer(tiny.tokenizer_dir(str(REPO / ".cache" / "readme-stats-tok")))
    model = jaxsft.from_pretrained(tiny.tiny_torch_model("llama"), mesh=jaxsft.single_device_mesh())
    trainer = jaxsft.IterativeSFTTrainer(model, jaxsft.TrainConfig(max_length=32, disable_tqdm=True), tok)
    with pytest.warns(UserWarning, match="no examples"):
        stats = trainer.step(texts=[])  # the same dict, without compiling anything
    listed = re.search(r"Returns a dict: (.*?)\.\n", readme_section("Quick start: JAX API"), re.S)
    assert listed, "the README's 'Returns a dict: ...' sentence is missing"
    names = re.findall(r"`(\w+)`", listed.group(1))
    assert sorted(names) == sorted(stats), (sorted(names), sorted(stats))


def run_example(name: str, tmp_path: Path, *extra: str) -> list[dict]:
    """Run ``examples/<name> --tiny`` in a fresh process; it must leave nothing behind but what it was asked
    to write: no temporary folder (TMPDIR is checked empty, but for torch's inductor cache) and nothing new
    in its working folder."""
    env = child_env(REPO)  # one CPU device, as a user has
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TMPDIR=str(scratch))
    summary = tmp_path / "summary.json"
    cmd = [sys.executable, str(EXAMPLES / name), "--tiny", "--rounds", "2", "--summary", str(summary), *extra]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{name} --tiny failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert "round 2" in done.stdout
    left = [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor")]  # torch's own cache
    assert left == [], f"{name} --tiny left temporary files: {left}"
    asked = {"tmp", "summary.json"} | {Path(e).name for e in extra if e.startswith(str(tmp_path))}
    assert {p.name for p in tmp_path.iterdir()} <= asked, f"{name} wrote {sorted(p.name for p in tmp_path.iterdir())}"
    return json.loads(summary.read_text())


# expert_iteration.py and trl_switch.py are the README's example commands: tests/test_readme.py runs their
# --tiny forms (with the assertions on what they return); rejection_sampling.py runs here.


@pytest.mark.slow
def test_rejection_sampling_example(tmp_path):
    history = run_example("rejection_sampling.py", tmp_path)
    assert any(h["kept"] and h["updates"] >= 1 for h in history)
    assert all(-10 < h["mean_reward"] <= 1.0 for h in history)


def test_readme_keeps_two_setup_commands_and_ci_runs_the_test_one():
    blocks = re.findall(r"^```bash\n(.*?)^```$", README.read_text(), re.S | re.M)
    assert len(blocks) == 2, "the README has exactly two set-up commands (demo; tests), nothing else in bash blocks"
    demo, tests = (b.strip() for b in blocks)
    assert demo.endswith("-m jaxsft demo") and tests.endswith("-m pytest -q -n 2")
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == tests
