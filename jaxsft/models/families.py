"""The family registry: one record per Hugging Face ``model_type``, the one place a family is named.

A record holds what differs between families: the spec builder (HF config -> the family-independent
spec the models read), the weight table (HF names <-> our parameters: load, save, the torch sync and
the decay mask all read it) and the LoRA sites (PEFT module names). Everything that used to switch on
``model_type`` asks :func:`family_of` instead. Adding a decoder family: see docs/ARCHITECTURE.md,
"Adding a decoder family".
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Union

from jaxsft.models import hf_keys, seq2seq_spec, spec as decoder_spec
from jaxsft.models.lora_sites import GPT2_SITES, LLAMA_SITES, Site
from jaxsft.models.seq2seq_spec import Seq2SeqSpec
from jaxsft.models.spec import ModelSpec, UnsupportedModelError
from jaxsft.models.weights import WeightTable

AnySpec = Union[ModelSpec, Seq2SeqSpec]


@dataclasses.dataclass(frozen=True)
class Family:
    """One supported ``model_type``: how its config becomes a spec, its weight table and its LoRA sites."""

    model_type: str
    build_spec: Callable[[Any], AnySpec]  # HF config -> spec (refuses options it would get wrong)
    weight_table: Callable[[AnySpec], WeightTable]  # spec -> table (a family may have variants, e.g. T5 v1.0/v1.1)
    lora_sites: tuple[Site, ...] = ()  # modules that can carry an adapter; () = LoRA not offered
    note: str = ""  # shown in the "not supported" message (e.g. "SmolLM2 is model_type 'llama'")

    @property
    def encoder_decoder(self) -> bool:
        return self.build_spec in (seq2seq_spec.t5_spec, seq2seq_spec.bart_spec)


def _table(table: WeightTable) -> Callable[[AnySpec], WeightTable]:
    return lambda spec: table


REGISTRY: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", decoder_spec.llama_like_spec, _table(hf_keys.LLAMA), LLAMA_SITES, "SmolLM2 is model_type 'llama'"),
        Family("mistral", decoder_spec.llama_like_spec, _table(hf_keys.LLAMA), LLAMA_SITES),
        Family("qwen2", decoder_spec.llama_like_spec, _table(hf_keys.LLAMA), LLAMA_SITES, "Qwen2.5 is 'qwen2'"),
        Family("qwen3", decoder_spec.llama_like_spec, _table(hf_keys.LLAMA), LLAMA_SITES),
        Family("gemma2", decoder_spec.gemma_spec, _table(hf_keys.GEMMA), LLAMA_SITES),
        Family("gemma3_text", decoder_spec.gemma_spec, _table(hf_keys.GEMMA), LLAMA_SITES,
               "Gemma 3 text models (Gemma3ForCausalLM) are 'gemma3_text'"),
        Family("gpt2", decoder_spec.gpt2_spec, _table(hf_keys.GPT2), GPT2_SITES),
        Family("t5", seq2seq_spec.t5_spec, lambda s: hf_keys.T5_GATED if s.mlp == "gated" else hf_keys.T5),
        Family("bart", seq2seq_spec.bart_spec, _table(hf_keys.BART)),
    )
}

# model_types refused with a pointer to what to load instead.
REFUSED: dict[str, str] = {
    "gemma3": (
        "model_type 'gemma3' is Gemma 3's multimodal model (Gemma3ForConditionalGeneration), which jaxsft does not "
        "train; load its text-only model instead: a Gemma3ForCausalLM (model_type 'gemma3_text') folder or instance."
    ),
}

DECODER_MODEL_TYPES = tuple(t for t, f in REGISTRY.items() if not f.encoder_decoder)
SEQ2SEQ_MODEL_TYPES = tuple(t for t, f in REGISTRY.items() if f.encoder_decoder)


def family_of(model_type: Any) -> Family:
    """The registry record of ``model_type`` (a config's or a spec's), or a clear refusal naming the supported ones."""
    family = REGISTRY.get(model_type)
    if family is not None:
        return family
    if model_type in REFUSED:
        raise UnsupportedModelError(REFUSED[model_type])
    notes = "; ".join(f.note for f in REGISTRY.values() if f.note)
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported by jaxsft; supported families: "
        f"{', '.join(DECODER_MODEL_TYPES)} (decoders), {', '.join(SEQ2SEQ_MODEL_TYPES)} (encoder-decoders). "
        f"({notes}.)"
    )


def spec_from_hf_config(config: Any) -> AnySpec:
    """The jaxsft spec of a transformers config (4.56+ or 5.x), through its family's builder."""
    return family_of(getattr(config, "model_type", None)).build_spec(config)


def table_for(spec: AnySpec) -> WeightTable:
    """The weight table of ``spec``'s family."""
    return family_of(spec.model_type).weight_table(spec)


def lora_sites(spec: AnySpec) -> tuple[Site, ...]:
    """Every module of ``spec``'s family that can carry an adapter (the one table of LoRA names)."""
    return family_of(spec.model_type).lora_sites
