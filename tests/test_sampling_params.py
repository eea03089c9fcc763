"""SamplingParams: one value for every generate signature, checked once at construction, before any work."""

from __future__ import annotations

import dataclasses

import pytest

import jaxsft
import tiny
from jaxsft.generation import Sampler, SamplingParams, compiled_programs
from test_generate import PROMPTS, models


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny.load_tokenizer(tiny.tokenizer_dir(str(tmp_path_factory.mktemp("tok"))))


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", 0), ("temperature", -1.0), ("temperature", float("nan")), ("top_k", 0), ("top_p", 1.5),
    ("num_return_sequences", 0), ("seed", 1.5), ("stop", [""]), ("eos_token_ids", [-1]), ("eos_token_ids", "2"),
    ("eos_token_ids", list(range(9))), ("skip_special_tokens", "yes"), ("stop_check_every", 0),
])
def test_construction_refuses_each_field_by_name(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams: {field}="):
        SamplingParams(**{field: value})


def test_values_are_normalised_and_hashable():
    a = SamplingParams(stop="###", eos_token_ids=[2, 3], temperature=1)
    assert a.stop == ("###",) and a.eos_token_ids == (2, 3) and isinstance(a.temperature, float)
    assert a == SamplingParams(stop=("###",), eos_token_ids=(2, 3), temperature=1.0) and hash(a)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.temperature = 0.5  # type: ignore[misc]
    assert jaxsft.SamplingParams is SamplingParams


def test_of_builds_from_keywords_or_takes_the_value_and_refuses_conflicts():
    given = SamplingParams(temperature=0.7, top_k=5)
    assert SamplingParams.of(None, dict(temperature=0.7, top_k=5)) == given
    assert SamplingParams.of(given, {}) is given
    assert SamplingParams.of(given, dict(top_k=5)) is given  # the same value in both places agrees
    with pytest.raises(ValueError, match=r"generate\(\): top_k=6 conflicts with sampling=SamplingParams\(.*top_k=5"):
        SamplingParams.of(given, dict(top_k=6))
    with pytest.raises(TypeError, match="temprature"):
        SamplingParams.of(None, dict(temprature=0.5))
    with pytest.raises(ValueError, match=r"^trainer.generate\(\): top_p=0"):  # the call it came through is named
        SamplingParams.of(None, dict(top_p=0), where="trainer.generate()")


@pytest.mark.slow
def test_generate_takes_sampling_or_keywords_alike_and_refuses_before_any_work(tok):
    _, model = models("llama")
    kw = dict(max_new_tokens=4, temperature=1.0, num_return_sequences=2, seed=3, eos_token_ids=[])
    sampler = Sampler(model, tok)
    by_keywords = sampler.generate(PROMPTS[:2], **kw)
    assert sampler.generate(PROMPTS[:2], sampling=SamplingParams(**kw)) == by_keywords
    assert jaxsft.generate(model, tok, PROMPTS[:2], sampling=SamplingParams(**kw)) == by_keywords
    before = compiled_programs()
    with pytest.raises(ValueError, match="seed=4 conflicts"):
        sampler.generate(PROMPTS[:2], sampling=SamplingParams(**kw), seed=4)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        jaxsft.generate(model, tok, PROMPTS[:2], max_new_tokens=2, temprature=1.0)
    assert compiled_programs() == before


def test_trainer_generate_with_sampling_advances_its_seed_unless_given(tok):
    _, model = models("llama")
    trainer = jaxsft.IterativeSFTTrainer(model, jaxsft.TrainConfig(max_length=32, disable_tqdm=True), tok)
    sampling = SamplingParams(max_new_tokens=4, temperature=1.0, num_return_sequences=2, eos_token_ids=())
    first = trainer.generate(PROMPTS[:2], sampling=sampling)
    second = trainer.generate(PROMPTS[:2], sampling=sampling)
    assert first != second and trainer.state.generate_calls == 2  # seed None: fresh samples per call
    fixed = dataclasses.replace(sampling, seed=9)
    assert trainer.generate(PROMPTS[:2], sampling=fixed) == jaxsft.generate(model, tok, PROMPTS[:2], sampling=fixed)
    assert trainer.state.generate_calls == 2  # an explicit seed does not advance the count
