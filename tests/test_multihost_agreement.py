"""Cross-process agreement before any collective (two processes on localhost, bounded by a timeout).

A bad input or a differing setting on one process raises the same clear error on every process and
changes nothing anywhere; the processes stay paired for the next call; a dead peer gives TimeoutError
within the configured bound instead of hanging in a collective. See tests/multihost_agree_worker.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import multihost_agree_worker as worker
import tiny
from xla_settings import child_env

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_processes_agree_on_verdicts_and_settings(tmp_path):
    model_dir = tmp_path / "model"
    tiny.tiny_torch_model("llama", vocab_size=256).save_pretrained(model_dir)
    coordinator = f"127.0.0.1:{_free_port()}"
    env = child_env(REPO, REPO / "tests")  # each worker sets its own device count
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    procs = []
    for pid in range(2):
        log = open(tmp_path / f"worker{pid}.log", "w")
        cmd = [sys.executable, str(REPO / "tests" / "multihost_agree_worker.py"), "--process-id", str(pid),
               "--coordinator", coordinator, "--model", str(model_dir), "--out", str(tmp_path)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    logs = "\n".join(f"--- worker {i}\n" + (tmp_path / f"worker{i}.log").read_text()[-3000:] for i in range(2))
    reports = []
    for pid in range(2):
        path = tmp_path / f"agree{pid}.json"
        assert path.exists(), logs
        reports.append(json.loads(path.read_text()))

    # 1. A setting that differs between processes: a ValueError naming it, on both (issue 26: the learning
    #    rate and optimizer too, which used to train and leave the "replicated" weights different).
    for report in reports:
        for case, named in (("mismatch", "gradient_accumulation_steps"), ("lr_mismatch", "config.learning_rate"),
                            ("optim_mismatch", "config.optim"), ("transformation_mismatch", "optimizer_state")):
            kind, is_value_error, message = report[case]
            assert is_value_error and named in message, (case, message)
    # 2-3. A bad input on process 1 only: both raise ValueError naming input_ids; nothing changed anywhere.
    for pid, report in enumerate(reports):
        kind, is_value_error, message = report["bad_input"]
        assert is_value_error and "input_ids[0] contains the negative id -7" in message, message
        if pid == 0:
            assert "refused on process 1" in message
        assert report["unchanged_after_bad_input"] and report["step_after_bad_input"] == 1
        # 3b. A failure of another type (len() raising RuntimeError) on process 1 only: both raise it.
        kind, _, message = report["runtime_input"]
        assert kind == "RuntimeError" and "cannot tell its length" in message, message
        assert report["unchanged_after_runtime_input"]
        # 4. Still paired: the retry trained on both.
        assert report["step_after_retry"] == 2
        # 5. Checkpoints agree first: a bad path, a missing folder, a save against a step(): raised on both.
        kind, _, message = report["save_none"]
        assert kind == "TypeError" and "directory=None" in message, message
        kind, _, message = report["restore_missing"]
        assert kind == "FileNotFoundError" and "-missing" in message, message
        kind, _, message = report["save_vs_step"]
        assert kind == "RuntimeError" and "same sequence of trainer calls" in message, message
        assert report["step_after_checkpoints"] == 2
    # 6. A dead peer: TimeoutError within the bound (plus slack for a loaded machine), not a hang, from
    #    step(), save_checkpoint() and restore_checkpoint(); then the survivor exits normally, code 0.
    for case in ("dead_peer", "dead_peer_save", "dead_peer_restore"):
        kind, _, message = reports[0][case]
        assert kind == "TimeoutError" and "process 1 did not reach this call" in message, (case, message)
        assert worker.TIMEOUT_S <= reports[0][f"{case}_seconds"] < worker.TIMEOUT_S + 30
    assert reports[0]["step_after_dead_peer"] == 2
    assert procs[0].returncode == 0, logs
