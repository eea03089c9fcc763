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

    # 1. A setting that differs between processes: a ValueError naming it, on both.
    for report in reports:
        kind, is_value_error, message = report["mismatch"]
        assert is_value_error and "gradient_accumulation_steps" in message, message
    # 2-3. A bad input on process 1 only: both raise ValueError naming input_ids; nothing changed anywhere.
    for pid, report in enumerate(reports):
        kind, is_value_error, message = report["bad_input"]
        assert is_value_error and "input_ids[0] contains the negative id -7" in message, message
        if pid == 0:
            assert "refused on process 1" in message
        assert report["unchanged_after_bad_input"] and report["step_after_bad_input"] == 1
        # 4. Still paired: the retry trained on both.
        assert report["step_after_retry"] == 2
    # 5. A dead peer: TimeoutError within the bound (plus slack for a loaded machine), not a hang.
    kind, _, message = reports[0]["dead_peer"]
    assert kind == "TimeoutError" and "process 1 did not reach this call" in message, message
    assert worker.TIMEOUT_S <= reports[0]["dead_peer_seconds"] < worker.TIMEOUT_S + 30
    assert reports[0]["step_after_dead_peer"] == 2
