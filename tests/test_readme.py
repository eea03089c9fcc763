"""The README runs as written: every Python block (on jaxsft.testing's tiny model, as the README says), the
example commands it names in their --tiny forms, and its rft command on the tiny model."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_examples import run_example
from xla_settings import child_env

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def sections_with_python() -> list[tuple[str, list[str]]]:
    """(## section title, its python blocks in order) for every section that has any."""
    out = []
    for part in re.split(r"^## ", README.read_text(), flags=re.M)[1:]:
        blocks = re.findall(r"^```python\n(.*?)^```$", part, re.S | re.M)
        if blocks:
            out.append((part.splitlines()[0], blocks))
    return out


def test_the_readme_has_the_blocks_this_test_runs():
    titles = [t for t, _ in sections_with_python()]
    assert titles == ["Quick start: JAX API", "Quick start: the TRL facade", "Rejection sampling with a reward",
                      "LoRA (PEFT-compatible in and out)"], titles
    for title, blocks in sections_with_python():
        assert "tiny_model(" in blocks[-1], f"{title}: the last block runs the code on jaxsft.testing.tiny_model"


RUNNER = textwrap.dedent(
    """
    import json, sys
    sections = json.load(open(sys.argv[1]))
    for title, blocks in sections:
        namespace = {"__name__": "__readme__"}  # each section runs on its own, as a reader pastes it
        for block in blocks:
            exec(compile(block, f"README.md: {title}", "exec"), namespace)
        print(f"RAN {title}", flush=True)
        if "history" in namespace:
            print("HISTORY " + json.dumps([title, namespace["history"]]), flush=True)
    """
)


@pytest.mark.slow
def test_every_python_block_runs_as_pasted(tmp_path):
    sections = sections_with_python()
    (tmp_path / "sections.json").write_text(json.dumps(sections))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = child_env(REPO)
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TMPDIR=str(scratch))
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "sections.json")], cwd=work, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert [line[4:] for line in done.stdout.splitlines() if line.startswith("RAN ")] == [t for t, _ in sections]
    histories = dict(json.loads(line[8:]) for line in done.stdout.splitlines() if line.startswith("HISTORY "))
    assert [h["round"] for h in histories["Quick start: JAX API"]] == [0, 1, 2]
    assert any(h["kept"] for h in histories["Rejection sampling with a reward"])
    # what the blocks wrote is where they said: the tiny model, the TRL output, the adapter and merged model
    assert {p.name for p in work.iterdir()} == {"tiny-model", "trl-out", "adapter", "merged"}
    assert (work / "adapter" / "adapter_config.json").is_file() and (work / "merged" / "config.json").is_file()


def example_commands() -> dict[str, list[str]]:
    """The `python examples/NAME.py ...` commands the README shows, by script name."""
    found = re.findall(r"`python (examples/\w+\.py)([^`]*)`", README.read_text())
    return {Path(script).name: shlex.split(rest) for script, rest in found}


def test_the_readme_names_two_example_commands():
    commands = example_commands()
    assert sorted(commands) == ["expert_iteration.py", "trl_switch.py"], commands
    assert all("--model" in args for args in commands.values())


@pytest.mark.slow
def test_expert_iteration_example_command_tiny(tmp_path):
    history = run_example("expert_iteration.py", tmp_path)
    assert [h["round"] for h in history] == [0, 1, 2]
    assert all(0.0 <= h["accuracy"] <= 1.0 for h in history)
    trained = [h for h in history[1:] if h["kept"]]
    assert trained and all(h["updates"] >= 1 and h["loss"] > 0 for h in trained)


@pytest.mark.slow
def test_trl_switch_example_command_tiny(tmp_path):
    history = run_example("trl_switch.py", tmp_path, "--output-dir", str(tmp_path / "trained"))
    for h in history:
        if h["kept"]:  # the user's own model shows the update in every parameter
            assert h["updates"] >= 1 and h["changed_parameters"] > 0
        else:
            assert h["changed_parameters"] == 0
    assert any(h["kept"] for h in history)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "trained"))  # trainer.save_model's folder, where asked


@pytest.mark.slow
def test_the_rft_command_runs_on_the_tiny_model(tmp_path, monkeypatch, tiny_chat_model):
    """The README's rft command, with the tiny model for --model, its data files written as the README
    describes them, and one round."""
    from jaxsft import __main__ as cli
    from jaxsft.testing import addition_problems

    block = re.search(r"^```sh\n(.*?)^```$", README.read_text(), re.S | re.M).group(1)
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[:4] == ["python", "-m", "jaxsft", "rft"]
    args = argv[4:]
    monkeypatch.chdir(tmp_path)
    for name, seed in (("train.jsonl", 1), ("heldout.jsonl", 2)):
        assert name in args
        Path(name).write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}], "answer": a}) + "\n"
                                      for q, a in addition_problems(8, seed)))
    args[args.index("--model") + 1] = tiny_chat_model  # jaxsft.testing.tiny_model's folder
    args[args.index("--rounds") + 1] = "1"
    assert cli.main(["rft", *args, "--max-new-tokens", "8", "--quiet"]) == 0
    out = tmp_path / args[args.index("--output-dir") + 1]
    saved = json.loads((out / "results.json").read_text())
    assert saved["finished"] and [r["round"] for r in saved["rounds"]] == [0, 1]
    assert (out / "model" / "config.json").is_file() and (out / "accuracy.png").is_file()
