"""The demo pipeline end to end on a tiny model (the real SmolLM2 run is too slow for CI)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def model_dir(tiny_chat_model):
    """jaxsft.testing's tiny chat model (a Hugging Face folder, what --model takes): it ends its replies with
    EOS, so samples finish (a reply cut by the token budget never counts, whatever the verifier)."""
    return tiny_chat_model


@pytest.mark.slow
def test_demo_end_to_end(model_dir, tmp_path, capsys):
    from jaxsft.rft import tasks
    from jaxsft.rft.demo import DemoConfig, run

    class Lenient(tasks.Task):
        """Accept every non-empty reply, so that every round keeps samples and trains."""

        def verify(self, completion, problem, finish_reason="eos"):
            return bool(completion.strip())

    base = tasks.get_task("add1")
    task = Lenient(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    cfg = DemoConfig(
        model=str(model_dir), rounds=2, output_dir=str(tmp_path / "out"), train_prompts=4, samples_per_prompt=2,
        eval_prompts=6, max_new_tokens=6, batch_size=1, epochs=1, max_length=64, quiet=False,
    )
    summary = run(cfg, task=task)
    printed = capsys.readouterr()
    assert printed.out.count("| round | held-out acc |") == 1  # the table's header once, a row per round
    assert [line.split("|")[1].strip() for line in printed.out.splitlines() if line.startswith("| ") and
            line.split("|")[1].strip().isdigit()] == ["0", "1", "2"]
    bars = [b for b in printed.err.replace("\r", "\n").splitlines() if "%|" in b]
    assert bars and all(b.lstrip().startswith("rft") for b in bars), bars[:3]  # one progress bar, no inner one

    out = tmp_path / "out"
    table = (out / "results.md").read_text()
    assert table.startswith("| round | held-out acc | ± s.e. |") and len(table.strip().splitlines()) == 2 + 3
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [0, 1, 2]
    assert all(r["kept"] > 0 and np.isfinite(r["loss"]) for r in saved["rounds"][1:])
    assert summary["accuracy_before"] == saved["rounds"][0]["accuracy"]

    # The best round's model (the earliest of the highest held-out accuracy) is a Hugging Face folder that
    # transformers loads, with the tokenizer beside it: round 0's is the starting model, a later one trained.
    accuracies = [r["accuracy"] for r in saved["rounds"]]
    assert saved["best_round"] == accuracies.index(max(accuracies))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok(["What is 2 + 3?"], return_tensors="pt")
    with torch.no_grad():
        same = torch.allclose(hf(**ids).logits, original(**ids).logits)
    assert same == (saved["best_round"] == 0)


def test_cli_parses_demo_as_default(monkeypatch, tmp_path):
    import jaxsft.__main__ as cli
    import jaxsft.rft.demo

    seen = []
    monkeypatch.setattr(jaxsft.rft.demo, "run", lambda cfg: seen.append(cfg))
    folder = tmp_path / "some-folder"  # --model must name a model folder (checked before loading; tests/test_cli.py)
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert cli.main([]) == 0
    assert cli.main(["--rounds", "2", "--task", "sub", "--seed", "3"]) == 0
    assert cli.main(["demo", "--output-dir", "x", "--model", str(folder), "--no-replay"]) == 0
    assert seen[0] == jaxsft.rft.demo.DemoConfig()
    assert (seen[1].rounds, seen[1].task, seen[1].seed) == (2, "sub", 3)
    assert (seen[2].output_dir, seen[2].model, seen[2].replay) == ("x", str(folder), False)
    assert cli.main(["--resume", "--output-dir", str(tmp_path / "nothing-yet")]) == 0 and seen[3].resume
    with pytest.raises(SystemExit):
        cli.main(["--task", "no-such-task"])
