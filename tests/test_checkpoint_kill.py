"""SIGKILL during saves: a process that trains and saves is killed at random points, ten times.

After every kill the newest complete checkpoint loads (all-or-nothing restore, checksums verified) and
training continues from it, here and in the next process, which resumes from it. No staging folder or
orbax temporary survives a later save (each completed save's listing is checked). Bounded in time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import checkpoint_kill_worker as worker
import tiny
from xla_settings import child_env

REPO = Path(__file__).resolve().parents[1]
KILLS = 10
DEBRIS = (".orbax-checkpoint-tmp", ".jaxsft-resave-", ".previous")


def _read_line(proc, deadline):
    line = proc.stdout.readline()
    if not line or time.monotonic() > deadline:
        raise AssertionError(f"worker stopped or stalled (exit {proc.poll()})")
    return line.strip()


@pytest.mark.slow
def test_sigkill_during_saves_never_loses_the_newest_complete_checkpoint(tmp_path):
    import jaxsft
    from jaxsft.infra import checkpoint as ckpt

    model_dir = tmp_path / "model"
    tiny.tiny_torch_model("llama", vocab_size=256, num_key_value_heads=4).save_pretrained(model_dir)
    ckpt_dir = tmp_path / "ckpts"
    env = child_env(REPO, REPO / "tests")  # one device; this run's compile cache: restarts load, not compile
    rng = np.random.default_rng(0)
    checker = worker.make_trainer(jaxsft, str(model_dir))
    last_step, save_seconds, listings = 0, 0.5, []
    deadline = time.monotonic() + 600
    for kill in range(KILLS):
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "checkpoint_kill_worker.py"), "--dir", str(ckpt_dir),
             "--model", str(model_dir), "--seed", str(kill)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        try:
            resumed = int(_read_line(proc, deadline).split()[1])
            assert resumed == last_step  # the new process resumed from the newest complete checkpoint
            saves_before_kill = int(rng.integers(1, 4))
            for _ in range(saves_before_kill):
                assert _read_line(proc, deadline) == "saving"
                started = time.monotonic()
                line = _read_line(proc, deadline)
                save_seconds = time.monotonic() - started
                assert line.startswith("saved ")
                listings.append(json.loads(line[len("saved "):]))
            assert _read_line(proc, deadline) == "saving"
            time.sleep(float(rng.uniform(0, 1.2 * save_seconds)))  # somewhere inside the next save
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        latest = ckpt.latest_checkpoint(str(ckpt_dir))
        assert latest is not None
        checker.restore_checkpoint(latest)
        last_step = checker.state.global_step
        assert last_step >= kill + 1
        stats = checker.step(input_ids=[np.arange(3, 12)] * 4)  # training continues from it
        assert stats["num_updates"] == 1 and np.isfinite(stats["loss"])

    # Every completed save left only checkpoints: debris of the killed saves was cleaned by the next one.
    assert listings and all(not any(mark in name for mark in DEBRIS for name in names) for names in listings)
    assert all(len(names) <= 2 for names in listings)  # keep_last=2
    checker.restore_checkpoint(ckpt.latest_checkpoint(str(ckpt_dir)))
    checker.save_checkpoint(str(ckpt_dir), keep_last=2)
    assert not any(mark in name for mark in DEBRIS for name in os.listdir(ckpt_dir))
