"""python -m jaxsft rft: data checks, verifiers, keep rules, arguments before loading, the plot's band,
and end to end on the tiny model (jaxsft.testing): LoRA + top-k + a user verifier, ReST-EM reset without
replay, Ctrl-C after a round and --resume to the result of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from jaxsft import __main__ as cli
from jaxsft.rft import data as data_lib
from jaxsft.rft import keep as keep_lib
from jaxsft.rft import loop, report
from jaxsft.rft import verifiers as V

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def addition_files(root: Path, n_train: int = 8, n_eval: int = 8) -> tuple[Path, Path]:
    from jaxsft.testing import addition_problems

    chat = lambda q: [{"role": "user", "content": q}]  # noqa: E731
    train = write_jsonl(root / "train.jsonl", [{"prompt": chat(q), "answer": a} for q, a in addition_problems(n_train, 1)])
    held = write_jsonl(root / "eval.jsonl", [{"prompt": chat(q), "answer": a} for q, a in addition_problems(n_eval, 2)])
    return train, held


# ---------------------------------------------------------------------------- data
@pytest.mark.parametrize("line, message", [
    ("not json", "line 2: not JSON"),
    ('{"prompt": "hi"}', "line 2: missing 'answer'"),
    ('{"answer": "1"}', "line 2: missing 'prompt'"),
    ('{"prompt": "hi", "answer": 3}', '"answer" must be a string, got 3; write it in quotes'),
    ('{"prompt": [{"role": "user"}], "answer": "3"}', 'string "role" and "content"'),
    ('{"prompt": "", "answer": "3"}', '"prompt" must be a non-empty string'),
    ("[1, 2]", "each line must be a JSON object"),
])
def test_bad_data_lines_are_named(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"}, line])
    with pytest.raises(data_lib.DataError) as err:
        data_lib.load_jsonl(path, "--data")
    assert str(err.value).startswith(f"--data {path} line 2") and message in str(err.value)


def test_data_reads_strings_and_chats(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2=", "answer": "4"}, "", {"prompt": chat, "answer": "4"}])
    examples = data_lib.load_jsonl(path, "--eval")
    assert [e.prompt for e in examples] == ["2+2=", chat] and [e.answer for e in examples] == ["4", "4"]
    with pytest.raises(data_lib.DataError, match="holds no examples"):
        data_lib.load_jsonl(write_jsonl(tmp_path / "empty.jsonl", [""]), "--eval")


# ---------------------------------------------------------------------------- verifiers
@pytest.mark.parametrize("spec, reply, answer, expected", [
    ("exact", " 42. ", "42", 1.0), ("exact", "42 apples", "42", 0.0),
    ("last-number", "23 + 45 = 68", "68", 1.0), ("last-number", "The answer is 67", "68", 0.0),
    ("last-number", "It costs 1,234.50 dollars", "1234.5", 1.0), ("last-number", "no digits", "3", 0.0),
    ("contains", "I think Paris is right", "Paris", 1.0), ("contains", "London", "Paris", 0.0),
    ("regex:answer: (\\w+)", "so answer: blue, done", "blue", 1.0), ("regex:answer: (\\w+)", "blue", "blue", 0.0),
    ("regex:\\d+", "x 17 y 18", "17", 1.0),
])
def test_built_in_verifiers(spec, reply, answer, expected):
    assert V.reward(V.get_verifier(spec), reply, answer) == expected


def test_cut_replies_never_pass_and_rewards_must_be_numbers():
    assert V.reward(V.get_verifier("contains"), "Paris", "Paris", finish_reason="length") == 0.0
    with pytest.raises(TypeError, match="must return a bool or a number"):
        V.reward(lambda r, a: "yes", "x", "y")


def test_user_verifier_module(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text("def score(reply, answer):\n    return 0.5 if answer in reply else 0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    f = V.get_verifier("my_checks:score")
    assert V.reward(f, "it is 7", "7") == 0.5 and V.reward(f, "8", "7") == 0.0
    for spec, message in [("my_checks:nope", "has no function 'nope'"), ("no_such_mod:f", "cannot import 'no_such_mod'"),
                          ("regex:(", "not a regular expression"), ("fuzzy", "unknown verifier")]:
        with pytest.raises(V.VerifierError, match=message):
            V.get_verifier(spec)


# ---------------------------------------------------------------------------- keep rules
def test_keep_rules():
    replies = ["5", "5.", "6", "7", " 7 "]
    rewards = [1.0, 1.0, 0.0, 2.0, 2.0]
    assert keep_lib.select(("all", 0), replies, rewards, set()) == [0, 3]  # "5." is "5"; " 7 " is "7"
    assert keep_lib.select(("first", 1), replies, rewards, set()) == [0]
    assert keep_lib.select(("top", 1), replies, rewards, set()) == [3]
    assert keep_lib.select(("top", 2), replies, rewards, set()) == [3, 0]
    seen = {"5"}  # kept in an earlier round: never again
    assert keep_lib.select(("all", 0), replies, rewards, seen) == [3] and seen == {"5", "7"}
    assert keep_lib.parse_keep("top:3") == ("top", 3)
    for bad in ("top:0", "top:x", "best"):
        with pytest.raises(keep_lib.KeepRuleError):
            keep_lib.parse_keep(bad)


# ---------------------------------------------------------------------------- CLI: checked before loading
@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(loop, "load_model", refuse)
    monkeypatch.setattr(loop, "run", refuse)


@pytest.mark.parametrize("extra, message", [
    (["--rounds", "0"], "--rounds 0: must be at least 1"),
    (["--samples", "0"], "--samples 0: must be at least 1"),
    (["--keep", "top:0"], "--keep top:0: top:K needs a whole number K >= 1"),
    (["--verifier", "regex:("], "--verifier regex:(: the pattern '(' is not a regular expression"),
    (["--verifier", "nosuchmodule:f"], "--verifier nosuchmodule:f: cannot import 'nosuchmodule'"),
    (["--temperature", "-1"], "--temperature -1.0: must be a number >= 0"),
    (["--learning-rate", "0"], "--learning-rate 0.0: must be a number > 0"),
    (["--patience", "-1"], "--patience -1: must be 0"),
    (["--prompts-per-round", "0"], "--prompts-per-round 0: must be at least 1"),
    (["--model", "/no/such/folder"], "--model /no/such/folder: no such folder"),
])
def test_rft_arguments_fail_at_once_in_one_line(tmp_path, extra, message, no_loading, capsys):
    train, held = addition_files(tmp_path)
    argv = ["rft", "--data", str(train), "--eval", str(held), "--output-dir", str(tmp_path / "out"), *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m jaxsft rft: error: ") and message in err, err


def test_rft_data_and_output_dir_checked_before_loading(tmp_path, no_loading, capsys):
    train, held = addition_files(tmp_path)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "answer": "two"}])
    base = ["rft", "--data", str(train), "--eval", str(held), "--output-dir", str(tmp_path / "out")]
    assert cli.main(["rft", "--data", str(tmp_path / "none.jsonl"), *base[3:]]) == 2
    assert "--data " in capsys.readouterr().err
    assert cli.main([*base[:3], "--eval", str(bad), *base[5:], "--verifier", "last-number"]) == 2
    assert "the answer 'two' has no number" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text(json.dumps({"config": {}, "rounds": []}))
    assert cli.main(base) == 2
    assert "already holds a run" in capsys.readouterr().err and "--resume" in capsys.readouterr().err + "--resume"
    assert cli.main([*base, "--resume"]) == 2
    assert "resume with the run's own settings" in capsys.readouterr().err


# ---------------------------------------------------------------------------- report, notice
def test_plot_draws_a_one_standard_error_band():
    from matplotlib.collections import PolyCollection

    history = [report.RoundResult(0, 0.25, report.standard_error(0.25, 64)),
               report.RoundResult(1, 0.5, report.standard_error(0.5, 64))]
    assert history[1].stderr == pytest.approx(0.0625)
    fig = report.figure(history, "t")
    bands = [c for c in fig.axes[0].collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(25 - 100 * history[0].stderr) and ys.max() == pytest.approx(56.25)


def test_backend_notice_hints_at_an_idle_gpu():
    from jaxsft.infra import accelerator

    assert accelerator.notice("gpu", ["NVIDIA H100"], gpu_visible=True) == "JAX backend: gpu, 1 device (NVIDIA H100)"
    line = accelerator.notice("cpu", ["cpu"], gpu_visible=True)
    assert line.startswith("JAX backend: cpu, 1 device (cpu); an NVIDIA GPU is visible") and "jaxsft[cuda]" in line
    assert "NVIDIA" not in accelerator.notice("cpu", ["cpu", "cpu"], gpu_visible=False)
    assert accelerator.notice().startswith("JAX backend: cpu")  # this machine's real JAX


# ---------------------------------------------------------------------------- end to end on the tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_chat_model):
    root = tmp_path_factory.mktemp("rft")
    return tiny_chat_model, *addition_files(root)


def rft_config(tiny, out, **kw):
    model, train, held = tiny
    base = dict(model=model, data=str(train), eval=str(held), output_dir=str(out), verifier="last-number",
                rounds=2, samples=4, max_new_tokens=6, learning_rate=2e-4, max_length=64, quiet=True, patience=0)
    base.update(kw)
    return loop.RFTConfig(**base)


def saved_weights(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tiny, tmp_path):
    whole = loop.run(rft_config(tiny, tmp_path / "whole"))
    assert whole["finished"] and [r["round"] for r in whole["rounds"]] == [0, 1, 2]
    assert any(r["kept"] for r in whole["rounds"][1:])

    def stop_after_round_1(h):
        if h.round == 1:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(loop.RunInterrupted) as stop:
        loop.run(rft_config(tiny, out), on_round_end=stop_after_round_1)
    assert str(stop.value) == f"stopped after round 1; partial results in {out}"
    partial = json.loads((out / "results.json").read_text())  # round 1 is on disk as it ended
    assert [r["round"] for r in partial["rounds"]] == [0, 1] and not partial["finished"]
    assert (out / "results.md").read_text().count("\n") == 4 and (out / "model" / "config.json").exists()
    assert {r["round"] for r in map(json.loads, (out / "kept_samples.jsonl").read_text().splitlines())} <= {1}

    checkpoint = next((out / "checkpoints" / "round-1").iterdir())
    (checkpoint / "moved").mkdir()  # a damaged checkpoint is refused in one error naming --resume, nothing changed
    for item in list(checkpoint.iterdir()):
        if item.name != "moved":
            item.rename(checkpoint / "moved" / item.name)
    with pytest.raises(loop.ResumeError, match="--resume: cannot continue from"):
        loop.run(rft_config(tiny, out, resume=True))
    for item in list((checkpoint / "moved").iterdir()):
        item.rename(checkpoint / item.name)
    (checkpoint / "moved").rmdir()
    resumed = loop.run(rft_config(tiny, out, resume=True))
    for a, b in zip(whole["rounds"], resumed["rounds"], strict=True):
        assert {k: a[k] for k in ("round", "accuracy", "kept", "trained_on", "loss")} == \
               {k: b[k] for k in ("round", "accuracy", "kept", "trained_on", "loss")}
    assert (out / "kept_samples.jsonl").read_text() == (tmp_path / "whole" / "kept_samples.jsonl").read_text()
    a, b = saved_weights(tmp_path / "whole" / "model"), saved_weights(out / "model")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not (out / "checkpoints").exists()  # a finished run keeps no resume state
    assert loop.run(rft_config(tiny, out, resume=True)) == json.loads((out / "results.json").read_text())  # done
    with pytest.raises(ValueError, match="finished after round 2 and keeps no checkpoint"):
        loop.check_resume(rft_config(tiny, out, resume=True, rounds=3))


@pytest.mark.slow
def test_lora_top_k_and_a_user_verifier(tiny, tmp_path, monkeypatch):
    (tmp_path / "checks.py").write_text(
        "import re\n\ndef reward(reply, answer):\n"
        "    nums = re.findall(r'-?\\d+', reply)\n"
        "    return 2.0 - len(reply) / 100 if nums and nums[-1] == answer else 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    summary = loop.run(rft_config(tiny, tmp_path / "out", verifier="checks:reward", keep="top:1", lora=True, lora_r=4,
                                  rounds=1))
    kept = [json.loads(line) for line in (tmp_path / "out" / "kept_samples.jsonl").read_text().splitlines()]
    prompts = [k["prompt_key"] for k in kept]
    assert kept and len(prompts) == len(set(prompts))  # top:1: one sample per prompt at most
    assert all(1.9 < k["reward"] <= 2.0 for k in kept)
    assert summary["rounds"][1]["trained_on"] == len(kept)
    from transformers import AutoConfig

    AutoConfig.from_pretrained(tmp_path / "out" / "model")  # the best round's model, LoRA merged, as a HF folder


@pytest.mark.slow
def test_reset_each_round_without_replay_and_early_stop(tiny, tmp_path):
    summary = loop.run(rft_config(tiny, tmp_path / "out", reset_each_round=True, replay=False, rounds=2,
                                  prompts_per_round=4, learning_rate=3e-3, patience=1))
    assert all(r["kept"] for r in summary["rounds"][1:]), "the test needs kept samples in every round"
    rounds = summary["rounds"]
    for r in rounds[1:]:
        assert r["trained_on"] == r["kept"]  # no replay: this round's samples only
        assert r["sampled"] == 4 * 4  # 4 prompts a round, 4 samples each
        # reset before training: the step count is this round's updates only (batch 8), not a running total
        assert r["global_step"] == -(-r["trained_on"] // 8)
    if len(rounds) == 2:  # round 1 did not beat round 0 and --patience 1 stopped the run
        assert summary["stopped_early"] and rounds[1]["accuracy"] <= rounds[0]["accuracy"]


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_exits_130(tiny, tmp_path):
    from xla_settings import child_env

    model, train, held = tiny
    out = tmp_path / "out"
    env = child_env(REPO)
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxsft", "rft", "--model", model, "--data", str(train), "--eval", str(held),
         "--output-dir", str(out), "--verifier", "last-number", "--rounds", "50", "--samples", "2",
         "--max-new-tokens", "6", "--patience", "0", "--quiet"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (out / "results.json").exists():  # round 0 is on disk: stop the run in the middle of round 1
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    done = json.loads((out / "results.json").read_text())["rounds"][-1]["round"]
    assert stderr.strip().splitlines() == [
        f"python -m jaxsft rft: stopped after round {done}; partial results in {out} (continue with --resume)"]


def test_an_interrupt_swallowed_by_python_still_stops_the_run():
    """Python prints and drops a KeyboardInterrupt raised inside a garbage-collection callback (JAX registers
    one); the run's SIGINT handler remembers the request and stops at the next phase boundary instead."""
    stop = loop.StopRequest()
    before, handler_before = sys.unraisablehook, signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job
    with stop.installed():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs here and raises
        except KeyboardInterrupt:
            pass  # as if swallowed elsewhere
        with pytest.raises(KeyboardInterrupt):
            stop.check()
        # What Python does with an exception raised in a weakref or GC callback: the unraisable hook, which would
        # print a traceback; the remembered interrupt is not printed, anything else still is.
        seen = []
        outer, sys.unraisablehook = sys.unraisablehook, seen.append
        try:
            with stop.installed():
                sys.unraisablehook(types.SimpleNamespace(exc_value=KeyboardInterrupt()))
                sys.unraisablehook(types.SimpleNamespace(exc_value=ValueError("other")))
        finally:
            sys.unraisablehook = outer
        assert [type(u.exc_value) for u in seen] == [ValueError]
    assert signal.getsignal(signal.SIGINT) is handler_before  # the previous handler is back
    assert sys.unraisablehook is before  # and the previous unraisable hook
