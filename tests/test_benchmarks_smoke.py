"""The benchmarks still run: each GPU benchmark's CPU smoke setting, in a fresh interpreter, as a user starts it.

Why: the benchmarks are what the GPU figures in benchmarks/RESULTS.md come from, and a device session is short
and scarce; a script that fails at import (``bench_fused.py`` did, through an import cycle) or on an argument
costs a device call. Each case runs the script on this CPU at its smallest setting and checks what it printed,
not only its exit status (slow tier); one static check reads the GPU call plan, ``run_engine_gpu.sh`` (fast tier).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 240) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's machine has
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _results(out: str) -> list[dict]:
    return [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]


@pytest.mark.slow
def test_roof_probes_print_a_peak_and_a_bandwidth():
    out = _run("benchmarks/roof.py", "--small")
    assert "bf16 matmul peak" in out and "TB/s" in out


@pytest.mark.slow
def test_bench_fused_times_both_forms_both_passes():
    out = _run("benchmarks/bench_fused.py", "--rows", "64", "--hidden", "96", "--repeats", "2", "--inner", "2")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert {(r["form"], r["pass"]) for r in rows} == {
        (form, p) for form in ("xla", "pallas") for p in ("forward", "forward+backward")}
    assert all(r["us"] > 0 for r in rows)


@pytest.mark.slow
def test_bench_generate_quick_with_the_fused_norm():
    (row,) = _results(_run("benchmarks/bench_generate.py", "--quick", "--skip-hf", "--norm-implementation", "pallas"))
    assert row["side"] == "jaxsft" and row["tok_s"] > 0 and row["mean_len"] == 32.0


@pytest.mark.slow
def test_bench_loop_runs_a_round_on_the_tiny_shape():
    (row,) = _results(_run("benchmarks/bench_loop.py", "--impl", "jaxsft", "--shape", "tiny", "--prompts", "4",
                           "--samples", "2", "--prompt-len", "16", "--new", "16", "--rounds", "1"))
    assert row["kept"] == 2 and row["round_s"] > 0 and row["generate_s"] > 0 and row["train_s"] > 0


@pytest.mark.slow
def test_first_step_host_breaks_the_compile_into_xla_phases(tmp_path):
    out = _run("benchmarks/first_step_host.py", "--shape", "tiny", "--trace", str(tmp_path / "trace"), "--top", "50",
               "--profile-lowering", "60")
    profile = out.split("Python profile of the calls")[1].split("XLA's host phases")[0]
    assert "lower_fused" in profile  # the lowering's Python is among the profiled functions
    table = out.split("XLA's host phases")[1]
    phases = {line.split(" | ")[0].strip("| ") for line in table.splitlines() if line.startswith("| ")}
    assert "backend_compile_and_load" in phases  # the compiler's own phases are read from the trace
    assert not any(name.startswith("$") for name in phases)  # Python frames (tracing, lowering) are left out


@pytest.mark.slow
def test_first_step_host_lowers_the_gpus_programs_on_a_cpu():
    """``--lower-for-gpu`` times the GPU's lowering on this host: every program must carry the GPU's kernels (the
    fused norm's Triton modules, cuDNN's attention), or it would be timing the CPU's programs under the GPU's name."""
    out = _run("benchmarks/first_step_host.py", "--shape", "tiny", "--lower-for-gpu")
    lowered = [line for line in out.splitlines() if line.startswith("# lowered for CUDA:")]
    assert len(lowered) == 3, out[-2000:]  # the first ragged call's three layouts
    for line in lowered:
        triton, cudnn = (int(word) for word in line.split(":")[-1].split() if word.isdigit())
        assert triton == 2 and cudnn > 0, line  # one forward and one backward norm module; attention on cuDNN


@pytest.mark.slow
def test_bench_speed_runs_a_model_option_variant_with_the_same_losses():
    """The A/B form the fused-norm measurement uses (``--variants`` with a model option): both rows come back,
    and the kernel (interpret mode here) gives the XLA form's losses."""
    out = _run("benchmarks/bench_speed.py", "--cpu", "--shapes", "tiny", "--impls", "jaxsft", "--workloads", "fixed",
               "--variants", json.dumps({"fused": [{}, {"norm_implementation": "pallas"}]}), timeout=400)
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 11 and cells[0] == "tiny":
            rows[cells[2]] = cells
    assert set(rows) == {"jaxsft", "fused"}, out[-2000:]
    assert rows["fused"][8:10] == rows["jaxsft"][8:10]  # first and last loss, to four places


def _gpu_plan_calls() -> list[tuple[str, str]]:
    """(script, argument text) of every ``$B/<script>.py`` call in run_engine_gpu.sh, ``${VAR:-default}`` read as
    its default."""
    import re

    plan = (ROOT / "benchmarks" / "run_engine_gpu.sh").read_text()
    plan = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", plan)
    return re.findall(r"\$B/(\w+\.py)([^;>|&]*)", plan)


def test_every_gpu_section_names_existing_scripts_and_their_flags():
    """``benchmarks/run_engine_gpu.sh`` is what a device call runs: a section naming a script that is gone, or a
    flag its script does not define (renamed, misspelt), would fail only on the GPU, after a start that costs
    minutes. Each ``$B/<script>.py`` named must exist, and each ``--flag`` after it must be one of that script's
    ``add_argument`` flags (static: nothing runs)."""
    import re

    calls = _gpu_plan_calls()
    assert len(calls) > 30  # the sections' calls were found
    problems = []
    for script, args in calls:
        path = ROOT / "benchmarks" / script
        if not path.exists():
            problems.append(f"{script}: no such benchmark")
            continue
        defined = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", path.read_text()))
        problems += [f"{script} {flag}: not a flag it defines" for flag in re.findall(r"(--[\w-]+)", args)
                     if flag not in defined]
    assert problems == []


def test_every_gpu_section_names_shapes_and_variants_its_scripts_know(monkeypatch):
    """A shape a script does not define (``smollm2`` where bench_speed calls it ``smol``), or a variant whose
    TrainConfig overrides and model options are swapped, each cost a device call in the seventeenth session:
    bench_speed's own plan check (``plan_problems``, which also refuses them at start-up) and gen_common's shapes
    must accept every section's."""
    import re
    import shlex

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_speed
    import gen_common

    assert len(bench_speed.plan_problems(["smollm2"], {"v": [{"norm_implementation": "auto"}, {}]})) == 2
    calls = [args for script, args in _gpu_plan_calls() if script == "bench_speed.py"]
    assert len(calls) >= 3
    problems, variants_seen = [], 0
    for args in calls:
        words = shlex.split(args)
        flags = {word: value for word, value in zip(words, words[1:] + [""])
                 if word.startswith("--") and not value.startswith("--")}
        shapes = [s for s in flags.get("--shapes", bench_speed.DEFAULT_SHAPES).split(",") if s]
        variants = json.loads(flags.get("--variants", "{}"))
        variants_seen += len(variants)
        problems += bench_speed.plan_problems(shapes, variants)
    assert variants_seen >= 3  # the sections' variants were read
    on_gen_common = ("bench_generate.py", "bench_loop.py", "profile_decode.py", "bench_decode_gemms.py",
                     "bench_decode_kernel.py")
    for script, args in _gpu_plan_calls():
        if script in on_gen_common:
            problems += [f"{script} --shape {shape}" for shape in re.findall(r"--shape\s+(\S+)", args)
                         if not shape.startswith("$") and shape not in gen_common.SHAPES]
    assert problems == []
