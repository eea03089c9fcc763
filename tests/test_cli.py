"""python -m jaxsft: arguments checked before any model loads, one-line errors, help, --version."""

from __future__ import annotations

import re

import pytest

from jaxsft import __main__ as cli
from jaxsft.rft import demo
from jaxsft.rft import loop


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model or running the demo."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(demo, "run", refuse)
    monkeypatch.setattr(loop, "load_model", refuse)
    monkeypatch.setattr(loop, "run", refuse)


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds 0: must be at least 1"),
    (["demo", "--samples-per-prompt", "0"], "--samples-per-prompt 0: must be at least 1"),
    (["--eval-prompts", "-1"], "--eval-prompts -1: must be at least 1"),
    (["--temperature", "-0.5"], "--temperature -0.5: must be a number >= 0"),
    (["--temperature", "nan"], "--temperature nan"),
    (["--top-p", "0"], "--top-p 0.0: must lie in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    (["--learning-rate", "0"], "--learning-rate 0.0: must be a number > 0"),
    (["--model", "/no/such/folder"], "--model /no/such/folder: no such folder"),
])
def test_bad_arguments_fail_at_once_in_one_line(argv, message, no_loading, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m jaxsft demo: error: ") and message in err


def test_folder_without_config_is_named(tmp_path, no_loading, capsys):
    assert cli.main(["--model", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_unknown_task_is_refused_by_the_parser(no_loading, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--task", "nope"])
    assert exit_.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_help_describes_tasks_and_shows_each_default_once(capsys):
    from jaxsft.rft.tasks import TASKS

    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, task in TASKS.items():
        assert f"{name}: {task.description}" in text
    options = re.split(r" (?=--[a-z])", text.split("options:")[1])
    for option in options:
        assert option.count("default") <= 1, option
    assert "expert-iteration rounds (default: 5)" in text


def test_version(capsys):
    import jaxsft

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"jaxsft {jaxsft.__version__}"


def test_demo_refuses_an_output_dir_holding_a_run_unless_resumed(tmp_path, no_loading, capsys):
    (tmp_path / "results.json").write_text('{"config": {}, "rounds": []}')
    assert cli.main(["--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run" in err and "--resume" in err
    assert cli.main(["--output-dir", str(tmp_path), "--resume"]) == 2
    assert "resume with the run's own settings" in capsys.readouterr().err  # a run of other settings


def test_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys):
    from jaxsft.rft import RunInterrupted

    def interrupted(cfg):
        raise RunInterrupted(2, cfg.output_dir)

    monkeypatch.setattr(demo, "run", interrupted)
    assert cli.main(["--output-dir", "somewhere", "--quiet"]) == 130
    assert capsys.readouterr().err == ("\npython -m jaxsft demo: stopped after round 2; partial results in somewhere "
                                       "(continue with --resume)\n")


def test_export_help_names_the_python_helpers(capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "jaxsft.rft.bundled.export(dir)" in out and "jaxsft.rft.bundled.torch_model()" in out
