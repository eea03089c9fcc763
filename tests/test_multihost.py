"""Multi-process training on localhost equals single-process training on the union of the examples.

Two worker processes (``tests/multihost_worker.py``), 4 CPU devices each, join
JAX's distributed runtime through ``jaxsft.infra.distributed.initialize`` (CPU
collectives: gloo, jax's default on CPU) and train a tiny Llama on a
data x fsdp x tensor = (1, 2, 4) mesh: the batch and every FSDP-sharded weight are
split across the two processes, heads/MLP across each process's 4 devices.
Each process passes its own examples to ``step()``; calls cover different
lengths per process (bucket agreement), unequal micro-batch counts and a process
with no examples at all (zero-weight filler rows and micro-batches). The test
process meanwhile trains the same model on one device with every call's union
and compares per-update losses and final weights (rtol 1e-5), checks that only
process 0 logs and writes ``save_pretrained``'s folder, and that the folder loads
in transformers with the trained weights.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import multihost_worker as worker
import tiny
from xla_settings import child_env

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
MESH = (1, 2, 4)
LOCAL_DEVICES = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("multihost") / "init"
    tiny.tiny_torch_model("llama", vocab_size=worker.VOCAB, num_key_value_heads=4).save_pretrained(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_workers(model_dir: Path, out: Path, num_processes: int = 2) -> list[tuple[subprocess.Popen, Path]]:
    """Start the workers; their output goes to files (a full pipe nobody drains would stall a collective)."""
    coordinator = f"127.0.0.1:{_free_port()}"
    env = child_env(REPO, REPO / "tests")  # each worker sets its own device count
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"  # fewer SPMD warnings in the output we may print
    workers = []
    for pid in range(num_processes):
        cmd = [
            sys.executable, str(REPO / "tests" / "multihost_worker.py"),
            "--process-id", str(pid), "--num-processes", str(num_processes), "--coordinator", coordinator,
            "--local-devices", str(LOCAL_DEVICES), "--mesh", ",".join(map(str, MESH)),
            "--model", str(model_dir), "--out", str(out),
        ]  # fmt: skip
        log = out / f"worker{pid}.log"
        with open(log, "w") as handle:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True)
        workers.append((proc, log))
    return workers


def _finish_workers(workers: list[tuple[subprocess.Popen, Path]], timeout: float) -> None:
    """Wait for every worker; on a failure or timeout kill them all and fail with their output."""
    deadline = time.monotonic() + timeout
    notes = [""] * len(workers)
    for pid, (proc, _) in enumerate(workers):
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            notes[pid] = f" (killed after {timeout}s: a collective probably hung)"
            for other, _ in workers:
                if other.poll() is None:
                    other.kill()
            proc.wait()
    if any(proc.returncode != 0 for proc, _ in workers):
        noise = ("[Gloo]", "spmd_partitioner", "UserWarning", "warnings.warn")
        report = []
        for pid, (proc, log) in enumerate(workers):
            lines = [line for line in log.read_text(errors="replace").splitlines() if not any(n in line for n in noise)]
            report.append(f"--- worker {pid}: exit code {proc.returncode}{notes[pid]}\n" + "\n".join(lines)[-6000:])
        pytest.fail("multi-process workers failed:\n" + "\n".join(report), pytrace=False)


def _single_process_reference(model_dir: Path):
    """One process, one device, 8 rows per micro-batch: every call trains on its union of examples."""
    import jaxsft
    from jaxsft.models.hf_io import hf_state_dict

    mesh = jaxsft.single_device_mesh()
    trainer = jaxsft.IterativeSFTTrainer(
        jaxsft.from_pretrained(str(model_dir), mesh=mesh), worker.train_config(per_device=8), mesh=mesh
    )
    losses, steps = [], []
    for call in worker.make_calls():
        out = trainer.step(input_ids=worker.union(call))
        losses += out["update_losses"]
        steps.append(out)
    return np.asarray(losses), hf_state_dict(trainer.model), steps, trainer.state.log_history


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.slow
def test_two_processes_train_like_one_process_on_the_union(model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    workers = _start_workers(model_dir, out)
    try:
        ref_losses, ref_weights, ref_steps, ref_log = _single_process_reference(model_dir)  # while workers run
    finally:
        _finish_workers(workers, TIMEOUT_S)

    reports = [json.loads((out / f"proc{pid}.json").read_text()) for pid in range(2)]
    result = np.load(out / "result.npz")

    # The runtime really had two processes, with the mesh split across them and params sharded over both.
    for pid, report in enumerate(reports):
        assert (report["process_index"], report["process_count"]) == (pid, 2)
        owners = [p for _, p in report["mesh_devices"]]
        assert owners == [0] * LOCAL_DEVICES + [1] * LOCAL_DEVICES
        # q_proj [layers=2, embed=64 / fsdp 2, q_heads=4 / tensor 4, head_dim=16]: no process holds all of it.
        assert report["q_proj_shard_shape"] == [2, 32, 1, 16]
        assert report["q_proj_fully_addressable"] is False
        assert report["cpu_collectives"] == "gloo"
        assert "is held by processes [0, 1]" in report["bad_mesh_error"]

    # Same per-update losses as one process on the union, reported identically on both processes.
    multi_losses = result["__losses__"]
    assert len(multi_losses) == len(ref_losses) == len(worker.make_calls())
    np.testing.assert_allclose(multi_losses, ref_losses, rtol=1e-5)
    assert reports[0]["steps"] == reports[1]["steps"]
    for mine, ref in zip(reports[0]["steps"], ref_steps):
        assert mine["num_tokens"] == ref["num_tokens"]  # global label counts, summed over processes
        assert mine["global_step"] == ref["global_step"]
    # the call where process 0 had 8 examples and process 1 two: 2 agreed micro-batches, one update
    assert reports[0]["steps"][2]["num_microbatches"] == 2

    # Same final weights (per tensor, relative to its norm).
    weights = {k: result[k] for k in result.files if k != "__losses__"}
    assert set(weights) == set(ref_weights)
    worst = max(_rel(weights[k], ref_weights[k]) for k in ref_weights)
    assert worst <= 1e-5, worst

    # Logging only on process 0 (process 0 logs even the update it contributed no examples to).
    assert [entry["step"] for entry in reports[0]["log_history"]] == [1, 2, 3, 4, 5]
    assert reports[1]["log_history"] == []
    for mine, ref in zip(reports[0]["log_history"], ref_log):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-4)  # logged losses are rounded to 4 places

    # save_pretrained: every process called it, only process 0 wrote; the folder loads in transformers.
    assert not (out / "saved_1").exists()
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out / "saved_0", local_files_only=True)
    state = {k: v.detach().numpy() for k, v in loaded.state_dict().items()}
    for key, value in weights.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)
