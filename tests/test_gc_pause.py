"""The cyclic collector is held off while programs are lowered, and given back as the caller had it.

Why it matters: held off, the collector's passes no longer lengthen lowering on a first step's critical path
(benchmarks/RESULTS.md, nineteenth session); a pause that leaked would leave a user's process without
cycle collection, and one that re-enabled a collector the user had turned off would override the user.
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

import jaxsft
from jaxsft.generation import engine
from jaxsft.infra.gc_pause import paused_gc
from jaxsft.training import objectives

import tiny


@pytest.fixture(autouse=True)
def collector_on():
    gc.enable()
    yield
    gc.enable()


def test_paused_inside_and_back_after_even_on_an_error():
    with paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), paused_gc():
        raise RuntimeError("a failed lowering")
    assert gc.isenabled()


def test_a_caller_that_turned_the_collector_off_keeps_it_off():
    gc.disable()
    with paused_gc():
        pass
    assert not gc.isenabled()


def test_nested_and_concurrent_pauses_end_with_the_last():
    inner_done, release = threading.Event(), threading.Event()

    def other_thread():
        with paused_gc():
            inner_done.set()
            release.wait(10)

    worker = threading.Thread(target=other_thread)
    with paused_gc():
        with paused_gc():
            pass
        assert not gc.isenabled()  # the inner exit did not end the outer pause
        worker.start()
        inner_done.wait(10)
    assert not gc.isenabled()  # the other thread's pause is still in progress
    release.set()
    worker.join(10)
    assert gc.isenabled()


def _recording(monkeypatch, owner, name, seen: list):
    """Wrap ``owner.name`` (a function run while a program is traced) to record the collector's state then."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        seen.append(gc.isenabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def test_training_and_generation_lower_with_the_collector_off(monkeypatch, tmp_path):
    model = jaxsft.from_pretrained(tiny.tiny_torch_model("qwen2"))
    tokenizer = tiny.load_tokenizer(tiny.tokenizer_dir(str(tmp_path)))
    trainer = jaxsft.IterativeSFTTrainer(
        model, jaxsft.TrainConfig(max_length=32, per_device_train_batch_size=2, disable_tqdm=True, logging_steps=0),
        tokenizer,
    )
    traced_loss: list[bool] = []
    _recording(monkeypatch, objectives.CausalSFT, "loss", traced_loss)
    ids = [np.arange(3, 3 + n, dtype=np.int32) for n in (5, 9, 12, 7)]
    trainer.step(input_ids=ids, labels=ids)
    assert traced_loss and not any(traced_loss)  # the update programs' loss was traced with the collector off
    assert gc.isenabled()

    traced_steps: list[bool] = []
    make_decode = engine.make_decode

    def recording_make_decode(*args, **kwargs):
        step = make_decode(*args, **kwargs)

        def recorded(*a, **k):
            traced_steps.append(gc.isenabled())
            return step(*a, **k)

        return recorded

    monkeypatch.setattr(engine, "make_decode", recording_make_decode)
    trainer.generate(["the quick brown fox"], max_new_tokens=4)
    assert traced_steps and not any(traced_steps)  # the decode program was traced with the collector off
    assert gc.isenabled()
