"""Programs compiled side by side: the helper's rules, and that a first generate() call compiles what it runs first
(init, the first prefill, decode) in one batch, beside each other, as the trainer compiles a call's layouts."""

from __future__ import annotations

import gc
import os
import threading
import time

import jaxsft
from jaxsft.generation import api
from jaxsft.infra import side_by_side

import tiny


def test_compiles_overlap_and_come_back_in_order_lowered_on_the_calling_thread_with_the_collector_off():
    main = threading.current_thread()
    lowered_on, spans = [], {}

    def lowering(name):
        def lower():
            lowered_on.append((name, threading.current_thread() is main, gc.isenabled()))
            return name
        return lower

    def compile_one(lowered):
        started = time.perf_counter()
        time.sleep(0.4)  # longer than the next lowering: a serial compile could not overlap it
        spans[lowered] = (started, time.perf_counter())
        return lowered.upper()

    out = side_by_side.compile_side_by_side({k: lowering(k) for k in ("b", "a", "c")}, compile_one)
    assert list(out.items()) == [("b", "B"), ("a", "A"), ("c", "C")]
    assert lowered_on == [(k, True, False) for k in ("b", "a", "c")]
    assert gc.isenabled()
    # At most one compile per core at a time: on any host of two or more cores the first two overlap.
    if (os.cpu_count() or 1) > 1:
        (start_b, end_b), (start_a, end_a) = spans["b"], spans["a"]
        assert start_a < end_b  # the second began before the first finished: side by side


def test_meanwhile_runs_once_while_compiling_and_also_when_nothing_is_missing():
    calls = []
    side_by_side.compile_side_by_side({}, lambda lowered: lowered, meanwhile=lambda: calls.append("empty"))
    side_by_side.compile_side_by_side({"k": lambda: 1}, lambda lowered: lowered, meanwhile=lambda: calls.append("one"))
    assert calls == ["empty", "one"]


def test_a_first_generate_call_compiles_init_prefill_and_decode_together(monkeypatch, tmp_path):
    model = jaxsft.from_pretrained(tiny.tiny_torch_model("llama"))
    tokenizer = tiny.load_tokenizer(tiny.tokenizer_dir(str(tmp_path)))
    batches = []
    real = api.compile_side_by_side

    def recording(lowerings, compile_one, meanwhile=None):
        batches.append(sorted(key[0] for key in lowerings))
        return real(lowerings, compile_one, meanwhile)

    monkeypatch.setattr(api, "compile_side_by_side", recording)
    sampler = api.Sampler(model, tokenizer)
    first = sampler.generate(["the quick brown fox", "one two"], max_new_tokens=5, temperature=0.0)
    assert batches[0] == ["decode", "init", "prefill"]
    programs = sampler.compiled_programs
    again = sampler.generate(["the quick brown fox", "one two"], max_new_tokens=5, temperature=0.0)
    assert again == first and sampler.compiled_programs == programs  # the second call compiles nothing
    assert batches[1:] == [[]]
    assert len(first) == 2
